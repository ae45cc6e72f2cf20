"""The fault-schedule simulation of the whole engine (issue 8): see tests/sim/run.py.

hypothesis generates schedules of faults (per request, per refresh, per store call, per
WebSocket upgrade and turn, and network changes, wakes and admin rotations at random
times); each runs the real actors under trio's mock clock against the simulated world and
must break no invariant. ``SIM_SCHEDULES`` sets how many schedules run (default 200).
Every failing schedule hypothesis found and shrank is kept below as an ``@example``; the
last tests show that the checks do catch an engine that breaks the rules.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, example, given, settings

from actors import client_manager
from tests.sim.run import describe, simulate
from tests.sim.schedule import (
    ADMIN_ROTATE,
    REFRESH_CONNECT_ERROR,
    REFRESH_RESET,
    REFRESH_SILENCE,
    REFRESH_SLOW,
    RESET_AFTER_COMPLETED,
    STATUS_429,
    UPGRADE_REFUSED,
    AccountPlan,
    Fault,
    RequestPlan,
    Schedule,
    SessionPlan,
    StoreFault,
    WorldEvent,
    schedules,
)

SCHEDULES = int(os.environ.get("SIM_SCHEDULES", "200"))

# trio warns when an async generator is collected unfinished: httpx's chain of body
# iterators is, whenever a stream stops early (a silent upstream, a client that left), even
# though the response itself is closed. Closing is what the simulation checks itself: every
# upstream response and socket must be closed by the end of a run.
pytestmark = pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")


@settings(
    max_examples=SCHEDULES,
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=True,  # the same schedules on every run: CI cannot flake on a new draw
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schedule=schedules)
# A header byte that is not ASCII crashed the ProxyHandler (and every stream with it).
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=0.0, bad_header=True),)))
# A failing list_accounts while picking an account crashed the ProxyHandler.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=0.0), RequestPlan(at=0.0)),
                           store=(StoreFault(method="list_accounts", nth=4),)))
# A failing list_accounts in its background loop crashed the TokenRefresher.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=0.0),),
                           store=(StoreFault(method="list_accounts", nth=1),)))
# A failing set_cooldown after a 429 crashed the ProxyHandler.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=7200.0),) * 2,
                           requests=(RequestPlan(at=0.0, faults=(Fault(STATUS_429, 30.0),)),),
                           store=(StoreFault(method="set_cooldown", nth=1),)))
# A failing store read inside ensure_fresh crashed the TokenRefresher.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=7200.0),),
                           requests=(RequestPlan(at=0.0),),
                           store=(StoreFault(method="get", nth=1),)))
# A failed token write dropped the new triple; the spent refresh token was presented again.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=0.0),),
                           store=(StoreFault(method="save_tokens", nth=1),)))
# A token endpoint answering in 20 s was given up on after 15 s and the spent token replayed.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=200.0),),
                           refreshes=(Fault(REFRESH_SLOW, 20.0),)))
# An unclean close after response.completed added a response.failed behind it.
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=7200.0),),
                           requests=(RequestPlan(at=0.0, faults=(Fault(RESET_AFTER_COMPLETED),)),)))
# While a refresh's outcome was unknown, every usage sweep rotated the client on the
# held-back refresh's error, which names no generation (found after the i8fix changes).
@example(schedule=Schedule(accounts=(AccountPlan(120.0), AccountPlan(7200.0)),
                           requests=(RequestPlan(at=200.0),),
                           refreshes=(Fault(REFRESH_SILENCE), Fault(REFRESH_SILENCE))))
# One refused connect to the auth server, then a fresh generation answering, proved the old
# generation's path dead and cut a slow refresh on it to 3 s: the rotated token was lost.
@example(schedule=Schedule(accounts=(AccountPlan(120.0), AccountPlan(120.0)),
                           requests=(RequestPlan(at=200.0),),
                           refreshes=(Fault(REFRESH_SLOW, 10.0), Fault(REFRESH_CONNECT_ERROR))))
# A refresh that failed on the auth server's pool made the scheduler rotate the backend's
# pool with the auth pool's generation number (found after the pools were split).
@example(schedule=Schedule(accounts=(AccountPlan(expires_in=120.0),),
                           requests=(RequestPlan(at=0.0, bad_header=True),),
                           refreshes=(Fault(REFRESH_RESET), Fault(REFRESH_CONNECT_ERROR))))
# A refused WebSocket connect made generation 1 suspect; the next answer on generation 2
# marked it dead and cut a healthy slow stream on it (answered after 119 s, bound 110 s).
@example(schedule=Schedule(accounts=(AccountPlan(7200.0), AccountPlan(7200.0)),
                           requests=(RequestPlan(at=0.0, event_delay=20.0),),
                           sessions=(SessionPlan(at=3.0, upgrades=(UPGRADE_REFUSED,)),)))
def test_no_fault_schedule_breaks_an_invariant(schedule: Schedule) -> None:
    world = simulate(schedule)
    assert not world.violations, describe(world)


# --- the checks have teeth -----------------------------------------------------------------


def test_the_simulation_catches_a_refresh_timeout_shorter_than_the_auth_server() -> None:
    # The auth server rotates the token at once and answers in 20 s; an engine that gives
    # up after 15 s never learns the new token and later presents the spent one.
    schedule = Schedule(accounts=(AccountPlan(expires_in=120.0),),
                        requests=(RequestPlan(at=200.0),),
                        refreshes=(Fault(REFRESH_SLOW, 20.0),))
    assert simulate(schedule).violations == []
    broken = simulate(schedule, upstream={"token_header_timeout": 15.0})
    assert any("presented again" in v for v in broken.violations), describe(broken)
    assert any("left active" in v for v in broken.violations), describe(broken)


def test_the_simulation_catches_a_generation_closed_under_its_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow stream (20 s between events) outlives an admin rotation at t=5 s: its
    # generation must drain, not close.
    schedule = Schedule(accounts=(AccountPlan(expires_in=7200.0),),
                        requests=(RequestPlan(at=0.0, event_delay=20.0),),
                        events=(WorldEvent(at=5.0, kind=ADMIN_ROTATE),))
    assert simulate(schedule).violations == []

    def retire_without_draining(generation: client_manager._Generation) -> None:
        generation.retired.set()
        generation.drained.set()

    monkeypatch.setattr(client_manager._Generation, "retire", retire_without_draining)
    broken = simulate(schedule)
    assert any("closed under 1 open stream" in v for v in broken.violations), describe(broken)
