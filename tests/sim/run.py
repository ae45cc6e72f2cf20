"""Run one schedule against the real engine under trio's mock clock, then check invariants.

``simulate(schedule)`` starts the engine exactly as the server does (``open_actors``:
ClientManager, network watcher, TokenRefresher, RefreshScheduler, ProxyHandler, under
their supervisors) with three seams replaced: the client factory builds httpx clients
over the simulated world, the network watcher's route probe and wall clock read the
world, and the store is the flaky in-memory one. Clients then send the schedule's
requests at their times while the machine sleeps, changes networks and gets admin
rotations; afterwards the engine is wound down as the server does it and every
invariant of issue 8 is checked. It returns the World, whose ``violations`` must be empty.
"""

from __future__ import annotations

import json
import logging
import random
import re
import types
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
import trio.testing

from actors import proxy_websocket, refresh_scheduler, token_refresher, ws_session
from actors.accounts import AccountStatus
from actors.errors import CodexLBError
from actors.messages import RotationReason
from actors.proxy_handler import ProxyRequest
from actors.supervisor import CrashLoop, Engine, open_actors
from actors.upstream import TERMINAL_EVENT_TYPES, parse_event_json
from service.config import Config, with_overrides
from tests.sim import schedule as s
from tests.sim.world import (
    AUTH_URL,
    BASE_URL,
    REQUEST_ID_HEADER,
    RequestLog,
    SessionLog,
    World,
)

HEADER_TIMEOUT = 15.0
TOKEN_TIMEOUT = 60.0  # the token endpoint's header timeout (DESIGN.md §2)
IDLE_TIMEOUT = 240.0
DEAD_PATH_SILENCE = 3.0
TOKEN_SPACING = 2.0
SETTLE = IDLE_TIMEOUT + 20  # after the last client: a left stream may stay silent that long
RUN_LIMIT = 6 * 3600.0  # mock seconds: a run that needs more has hung
CODEX_BODY = {"model": "gpt-5-codex", "instructions": "", "input": [], "stream": True,
              "store": False}
BAD_HEADER = "x-codex-turn-metadata"
HEDGE_REASON = "hedge"
ROTATION_EVENTS = {
    RotationReason.NETWORK_CHANGE: s.ROUTE_CHANGE,
    RotationReason.WAKE: s.WAKE,
    RotationReason.ADMIN: s.ADMIN_ROTATE,
}


def simulate(schedule: s.Schedule, **config: dict[str, Any]) -> World:
    """One whole engine life under the mock clock; the World says what went wrong.

    ``config`` overrides sections of the engine's Config, e.g. ``upstream={...}``.
    """
    world = World(schedule)
    world.config = config
    with (_captured_logs() as logs, _seeded_engine_randomness(schedule.seed),
          _upstream_websockets(world)):
        try:
            trio.run(_run, world, clock=trio.testing.MockClock(autojump_threshold=0))
        except BaseException as exc:  # noqa: BLE001 - any escape is a finding, not a crash
            world.violations.append(f"the engine's trio run ended with "
                                    f"{type(exc).__name__}: {exc}")
    world.log_tail = [f"t={getattr(r, 'sim_time', -1.0):.1f}s {r.name} {r.getMessage()}"
                      for r in logs.records]
    for record in logs.crashes:
        world.violations.append(f"actor crash: {record.getMessage()}")
    for message in logs.token_leaks:
        world.violations.append(f"a token in a log line: {message}")
    return world


# --- bounds ------------------------------------------------------------------------------


def session_bounds(schedule: s.Schedule, plan: s.SessionPlan) -> tuple[float, float]:
    """How long a WebSocket session may take to open, and to end after its last turn."""
    pool, _ = bounds(schedule, s.RequestPlan(at=plan.at))
    opened = pool + 2 * len(plan.upgrades)
    turns = sum(IDLE_TIMEOUT + 5 if t == s.TURN_SILENCE_MID else 5 for t in plan.turns)
    return opened, opened + turns + pool  # a fallback turn may wait on the pool again


def bounds(schedule: s.Schedule, plan: s.RequestPlan) -> tuple[float, float]:
    """How long (mock seconds) the request may take to be answered, and to end.

    Every wait the schedule can cause is counted at its own bound: a header wait at the
    header timeout, a silent stream at the idle timeout, a token refresh at what its faults
    cost plus the spacing between refreshes. Anything longer is a wait without a bound.
    """
    # Every planned attempt is counted, even past one that could have answered: a hedge
    # (a second send after 2 s without headers) may take the next fault and lose or win.
    cost = 0.0
    for fault in plan.faults:
        match fault.kind:
            case s.SILENCE:
                cost += HEADER_TIMEOUT + 2
            case s.SLOW_HEADERS:
                cost += min(fault.delay, HEADER_TIMEOUT) + 2
            case _:
                cost += 2 + 4 * plan.event_delay
    tokens = TOKEN_SPACING * (len(schedule.accounts) + len(schedule.refreshes) + 3)
    for fault in schedule.refreshes:
        match fault.kind:
            case s.REFRESH_SILENCE:
                tokens += TOKEN_TIMEOUT + 2
            case s.REFRESH_SLOW:
                tokens += fault.delay + 2
            case _:
                tokens += 2
    store = 10.0 * len(schedule.store)
    # A route change or a wake ends the exchanges on the old path; one not yet committed is
    # retried, so it may lose what it had waited so far (at most a header wait or the
    # held-back opening events) plus the dead path's silence.
    path_deaths = sum(1 for e in schedule.events if e.kind in (s.ROUTE_CHANGE, s.WAKE))
    restarts = path_deaths * (max(HEADER_TIMEOUT, 4 * plan.event_delay) + DEAD_PATH_SILENCE + 2)
    answer = 20 + cost + tokens + store + restarts + 4 * plan.event_delay
    end = answer + 8 * plan.event_delay + 5
    if any(f.kind == s.SILENCE_MID_STREAM for f in plan.faults):
        end += IDLE_TIMEOUT
    return answer, end


# --- the run -------------------------------------------------------------------------------


async def _run(world: World) -> None:
    world.seed_accounts()
    sections = dict(world.config)
    sections["upstream"] = {"base_url": BASE_URL, "auth_base_url": AUTH_URL,
                            **sections.get("upstream", {})}
    config = with_overrides(Config(), **sections)

    async def route_probe() -> str | None:
        return world.address

    stats: Any = None
    try:
        with trio.fail_after(RUN_LIMIT):
            async with open_actors(
                config, world.store, client_factory=world.client_factory,  # type: ignore[arg-type]
                route_probe=route_probe, wall_clock=world.wall,
            ) as engine:
                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for rid, log in world.requests.items():
                        nursery.start_soon(_client, engine, world, rid, log, start)
                    for sid, session in world.sessions.items():
                        nursery.start_soon(_session, engine, world, sid, session, start)
                    for event in world.schedule.events:
                        nursery.start_soon(_world_event, engine, world, event, start)
                # Wind down as the server does, checking the leases once nothing runs.
                await trio.sleep(SETTLE)
                await engine.scheduler.shutdown()
                await engine.tokens.shutdown()
                await trio.sleep(1)
                pools = [engine.clients, getattr(engine, "auth_clients", None)]
                stats = [await pool.stats() for pool in pools if pool is not None]
                for pool_stats in stats:
                    _check_leases(world, pool_stats)
    except* CrashLoop as group:
        for exc in group.exceptions:
            world.violate(f"crash loop: {exc}")
    _check_after(world, stats)


async def _client(engine: Engine, world: World, rid: str, log: RequestLog, start: float) -> None:
    plan = log.plan
    await trio.sleep_until(start + plan.at)
    headers = [(REQUEST_ID_HEADER, rid), ("accept", "text/event-stream")]
    if plan.session:
        headers.append(("session-id", plan.session))
    if plan.bad_header:
        headers.append((BAD_HEADER, '{"note":"caf\xe9"}'))  # latin-1 decoded, as Quart does
    request = ProxyRequest(path="/codex/responses", headers=tuple(headers), body=CODEX_BODY,
                           sticky_key=plan.session)
    answer_bound, end_bound = bounds(world.schedule, plan)
    log.sent_at = trio.current_time()
    with trio.move_on_after(end_bound + 60):
        try:
            exchange = await engine.proxy.forward(request)
        except CodexLBError as err:
            log.error, log.answered_at = err, trio.current_time()
            return
        except Exception as err:  # noqa: BLE001 - the handle must only raise CodexLBError
            log.error, log.answered_at = err, trio.current_time()
            world.violate(f"{rid}: forward raised {type(err).__name__}: {err}")
            return
        log.answered_at = trio.current_time()
        log.first_byte_seq = world.tick()
        if exchange.events is None:
            world.violate(f"{rid}: a streamed request was answered without a stream")
            return
        with exchange.events:
            if plan.leave_after == 0:
                log.left = True
                return
            async for event in exchange.events:
                payload = parse_event_json(event) or {}
                log.events.append(str(payload.get("type") or event.event))
                if plan.leave_after is not None and len(log.events) >= plan.leave_after:
                    log.left = True
                    return
        log.ended_at = trio.current_time()


async def _session(engine: Engine, world: World, sid: str, log: SessionLog,
                   start: float) -> None:
    """A Codex-like WebSocket client: its turns in sequence, then it closes."""
    plan = log.plan
    await trio.sleep_until(start + plan.at)
    request = ProxyRequest(path="/codex/responses", method="GET",
                           headers=((REQUEST_ID_HEADER, sid),), body=None)
    _, end_bound = session_bounds(world.schedule, plan)
    log.sent_at = trio.current_time()
    with trio.move_on_after(end_bound + 60):
        try:
            session = await engine.proxy.open_websocket(request)
        except CodexLBError as err:
            log.error, log.answered_at = err, trio.current_time()
            return
        log.answered_at, log.mode = trio.current_time(), session.mode
        with session.to_upstream, session.from_upstream:
            for index in range(len(plan.turns)):
                rid = f"{sid}_{index}"
                frame = {"type": "response.create", **CODEX_BODY,
                         "client_metadata": {REQUEST_ID_HEADER: rid}}
                try:
                    await session.to_upstream.send(json.dumps(frame))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break  # the session ended after the previous turn's terminal event
                frames: list[str] = []
                log.turns.append(frames)
                async for raw in session.from_upstream:
                    if not frames and rid in world.requests:
                        world.requests[rid].first_byte_seq = world.tick()
                    frames.append(str(json.loads(raw).get("type")))
                    log.last_frame = raw
                    if frames[-1] in TERMINAL_EVENT_TYPES:
                        break
                else:
                    break  # the session ended mid-turn: the check says so
            session.to_upstream.close()
            async for raw in session.from_upstream:
                log.after_close.append(str(json.loads(raw).get("type")))
        log.ended_at = trio.current_time()


async def _world_event(engine: Engine, world: World, event: s.WorldEvent, start: float) -> None:
    await trio.sleep_until(start + event.at)
    match event.kind:
        case s.ROUTE_CHANGE:
            world.path_died()
            world.address = f"198.51.100.{world.tick() % 250 + 1}"
        case s.WAKE:
            world.path_died()
            world.wall_offset += event.amount
        case s.ADMIN_ROTATE:
            await engine.clients.rotate(reason=RotationReason.ADMIN)
        case s.REFRESH_NOW:
            await engine.scheduler.refresh_now()


# --- invariants ---------------------------------------------------------------------------


def _check_leases(world: World, stats: Any) -> None:
    held = {g: n for g, n in stats.leases.items() if n}
    if held:
        world.violate(f"leases still held after every request ended: {held}")
    if stats.retired:
        world.violate(f"retired generations not closed after draining: {list(stats.retired)}")
    if stats.force_closes:
        world.violate(f"{stats.force_closes} generation(s) force-closed (a lease was never "
                      "released within the drain bound)")


def _check_after(world: World, stats: Any) -> None:
    schedule = world.schedule
    for index in range(len(schedule.requests)):
        _check_request(world, f"r{index}", world.requests[f"r{index}"])
    for sid, session in world.sessions.items():
        _check_session(world, sid, session)
    for stream in list(world.open_streams):
        gen = world.generations[stream.generation]
        world.violate(f"an upstream response ({stream.what}) on {gen.label} was never closed")
    for number, gen in world.generations.items():
        if gen.closed_at is None:
            world.violate(f"generation {number}'s client was never closed")
    for account_id, auth in world.auth.items():
        account = world.store.inner._accounts[account_id]
        if account.status in (AccountStatus.REAUTH_REQUIRED, AccountStatus.DEACTIVATED) and (
                auth.permanent_code is None and not auth.answer_lost):
            world.violate(f"{account_id} left active ({account.status}, "
                          f"{account.status_reason!r}) though the auth server never answered a "
                          "permanent code")
    if stats is None:
        return
    rotations: Counter[str] = Counter()
    for pool_stats in stats:
        rotations.update(pool_stats.rotations)
    # Each pool rotates by compare-and-swap on the generation that failed (or was late, for
    # a hedge): at most one rotation per generation that really met such a fault.
    failed = sum(1 for g in world.generations.values() if g.failed or g.late)
    made = sum(rotations.get(str(r), 0) for r in (RotationReason.TRANSPORT, HEDGE_REASON))
    if made > failed:
        world.violate(f"{made} transport/hedge rotations but only {failed} generation(s) met a "
                      f"transport fault or late headers (a rotation storm): {dict(rotations)}")
    for reason, kind in ROTATION_EVENTS.items():
        made = rotations.get(str(reason), 0)
        # one per event and pool: a route change or wake is seen by both hosts' watchers
        per_event = 1 if reason is RotationReason.ADMIN else len(stats)
        allowed = per_event * sum(1 for e in schedule.events if e.kind == kind)
        if made > allowed:
            world.violate(f"{made} {reason} rotations for {allowed} such event(s)")


def _check_session(world: World, sid: str, log: SessionLog) -> None:
    opened_bound, end_bound = session_bounds(world.schedule, log.plan)
    if log.answered_at is None or log.sent_at is None:
        world.violate(f"{sid}: WebSocket session not opened or refused within "
                      f"{end_bound + 60:.0f}s")
        return
    if log.answered_at - log.sent_at > opened_bound:
        world.violate(f"{sid}: session answered after {log.answered_at - log.sent_at:.1f}s, "
                      f"bound {opened_bound:.1f}s")
    if log.error is not None:
        return
    if log.ended_at is None:
        world.violate(f"{sid}: session did not end within {end_bound + 60:.0f}s of opening "
                      f"(turns {log.turns})")
        return
    if log.ended_at - log.sent_at > end_bound:
        world.violate(f"{sid}: session ended after {log.ended_at - log.sent_at:.1f}s, bound "
                      f"{end_bound:.1f}s")
    for index, frames in enumerate(log.turns):
        if not frames and index == len(log.turns) - 1:
            continue  # the session had ended: this turn never reached the upstream
        terminals = [f for f in frames if f in TERMINAL_EVENT_TYPES]
        if len(terminals) != 1 or frames[-1] not in TERMINAL_EVENT_TYPES:
            world.violate(f"{sid}: turn {index} ({log.mode}) brought {frames}: not exactly one "
                          "terminal event at its end")
    if log.after_close:
        world.violate(f"{sid}: frames after the client's last turn: {log.after_close}")
    if log.sockets_open:
        world.violate(f"{sid}: {log.sockets_open} upstream socket(s) left open")


def _check_request(world: World, rid: str, log: RequestLog) -> None:
    plan = log.plan
    if log.sent_at is None:
        world.violate(f"{rid}: never sent (the run ended early)")
        return
    answer_bound, end_bound = bounds(world.schedule, plan)
    if log.answered_at is None:
        world.violate(f"{rid}: not answered within {end_bound + 60:.0f}s")
        return
    took = log.answered_at - log.sent_at
    if took > answer_bound:
        world.violate(f"{rid}: answered after {took:.1f}s, bound {answer_bound:.1f}s")
    if plan.bad_header:
        # The client's 400 naming the header, unless the pool answered first (all accounts
        # cooling down, a failing store, no usable token): never relayed, never a crash.
        status = getattr(log.error, "http_status", None)
        if log.error is None or log.upstream_calls:
            world.violate(f"{rid}: a header with a non-ASCII byte was relayed upstream")
        elif status == 400 and BAD_HEADER not in str(log.error):
            world.violate(f"{rid}: a header with a non-ASCII byte was answered with "
                          f"{status} {log.error!r}, a 400 that does not name the header")
        return
    if log.error is not None:
        return  # an error answer is an answer; its kind is the failover tests' business
    if log.left:
        return
    if log.ended_at is None:
        world.violate(f"{rid}: stream did not end within {end_bound + 60:.0f}s "
                      f"(events {log.events})")
        return
    if log.ended_at - log.sent_at > end_bound:
        world.violate(f"{rid}: stream ended after {log.ended_at - log.sent_at:.1f}s, "
                      f"bound {end_bound:.1f}s")
    terminals = [e for e in log.events if e in TERMINAL_EVENT_TYPES]
    if len(terminals) != 1:
        world.violate(f"{rid}: {len(terminals)} terminal events in {log.events}")
    elif log.events[-1] not in TERMINAL_EVENT_TYPES:
        world.violate(f"{rid}: events after the terminal one: {log.events}")


# --- harness ---------------------------------------------------------------------------------


# What the fake's tokens look like: refresh tokens rt-<account>-<n>, JWTs base64 of '{"'.
_TOKEN_SHAPE = re.compile(r"\brt-\d+-\d+\b|eyJ[A-Za-z0-9_-]{8,}")


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: deque[logging.LogRecord] = deque(maxlen=80)
        self.crashes: list[logging.LogRecord] = []
        self.token_leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.sim_time = trio.current_time()
        except RuntimeError:  # outside the run (setup or teardown)
            record.sim_time = -1.0
        self.records.append(record)
        if record.name.endswith(".supervisor") and record.levelno >= logging.ERROR:
            self.crashes.append(record)
        message = record.getMessage()
        if _TOKEN_SHAPE.search(message):
            self.token_leaks.append(message)


@contextmanager
def _captured_logs() -> Iterator[_LogCapture]:
    """The engine's log lines go to a ring buffer (for the failure report), not to pytest."""
    logger = logging.getLogger("codex_lb_trio")
    capture = _LogCapture()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextmanager
def _upstream_websockets(world: World) -> Iterator[None]:
    """The ProxyHandler's upstream sockets open onto the world instead of the network."""
    # The opener lives in proxy_websocket; ws_session imports it by name.
    modules = [m for m in (proxy_websocket, ws_session) if hasattr(m, "open_upstream_websocket")]
    saved = [m.open_upstream_websocket for m in modules]
    for module in modules:
        module.open_upstream_websocket = world.open_upstream_websocket  # type: ignore[assignment]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.open_upstream_websocket = original  # type: ignore[assignment]


@contextmanager
def _seeded_engine_randomness(seed: int) -> Iterator[None]:
    """Jitter in the refresher and the scheduler drawn from the schedule's seed.

    A schedule then replays exactly (hypothesis needs that to shrink); trio's own
    scheduling order is seeded by pytest-trio's hypothesis hook.
    """
    rng = random.Random(seed)
    shim = types.SimpleNamespace(
        Random=lambda *args: random.Random(rng.random()),
        **{name: getattr(rng, name) for name in ("random", "uniform", "randint", "choice",
                                                   "shuffle", "expovariate")},
    )
    modules = (token_refresher, refresh_scheduler)
    saved = [m.random for m in modules]
    for module in modules:
        module.random = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.random = original  # type: ignore[attr-defined]


def describe(world: World) -> str:
    """A failing run, for the assertion message: violations, then the last log lines."""
    lines = ["invariants violated:", *(f"  - {v}" for v in world.violations),
             "last engine log lines:", *(f"    {line}" for line in world.log_tail[-40:])]
    return "\n".join(lines)

