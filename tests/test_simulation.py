"""The fault-schedule simulation of the whole engine (issue 8): see tests/sim/run.py.

hypothesis generates schedules of faults (per request, per refresh, per store call, and
network changes, wakes and admin rotations at random times); each runs the real actors
under trio's mock clock against the simulated world and must break no invariant.
``SIM_SCHEDULES`` sets how many schedules run (default 200); a failing schedule is
shrunk by hypothesis, and every one found so far is kept below as an ``@example``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings

from tests.sim.run import describe, simulate
from tests.sim.schedule import Schedule, schedules

SCHEDULES = int(os.environ.get("SIM_SCHEDULES", "200"))


@settings(
    max_examples=SCHEDULES,
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=True,  # the same schedules on every run: CI cannot flake on a new draw
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schedule=schedules)
def test_no_fault_schedule_breaks_an_invariant(schedule: Schedule) -> None:
    world = simulate(schedule)
    assert not world.violations, describe(world)
