"""What one simulated run does: the accounts, the client requests and every fault, as data.

A ``Schedule`` is plain frozen data so that hypothesis can generate, shrink and print it,
and so that a shrunk failure can be pasted back as an ``@example``. The fake world
(tests/sim/world.py) reads it; nothing in it is random at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

# --- faults of one upstream answer (a client request's attempt, or a scheduler call) ---

CONNECT_ERROR = "connect_error"  # refused before anything was sent
RESET_BEFORE_HEADERS = "reset_before_headers"  # the request went out; no answer came back
SLOW_HEADERS = "slow_headers"  # the answer comes after ``delay`` seconds
SILENCE = "silence"  # no answer, ever (a black hole)
STATUS_429 = "429"  # usage_limit_reached with resets_in_seconds = ``delay``
STATUS_401 = "401"  # the access token is rejected
STATUS_5XX = "5xx"
RESET_MID_STREAM = "reset_mid_stream"  # 200, a few events, then the connection dies
SILENCE_MID_STREAM = "silence_mid_stream"  # 200, a few events, then nothing
IN_STREAM_LIMIT = "in_stream_limit"  # 200, then response.failed usage_limit_reached
IN_STREAM_FAILED = "in_stream_failed"  # 200, a delta, then response.failed server_error
RESET_AFTER_COMPLETED = "reset_after_completed"  # response.completed, then an unclean close

REQUEST_FAULTS = (
    CONNECT_ERROR, RESET_BEFORE_HEADERS, SILENCE, STATUS_429, STATUS_401, STATUS_5XX,
    RESET_MID_STREAM, SILENCE_MID_STREAM, IN_STREAM_LIMIT, IN_STREAM_FAILED,
    RESET_AFTER_COMPLETED,
)
SCHEDULER_FAULTS = (CONNECT_ERROR, RESET_BEFORE_HEADERS, SILENCE, STATUS_401, STATUS_5XX)
# The answer of a request whose engine-side wait ended first proves the path dead.
TRANSPORT_FAULTS = frozenset({
    CONNECT_ERROR, RESET_BEFORE_HEADERS, SILENCE, RESET_MID_STREAM, SILENCE_MID_STREAM,
    RESET_AFTER_COMPLETED,
})

# --- faults of one token refresh (consumed in the order refreshes reach the auth server) ---

REFRESH_OK = "ok"
REFRESH_CONNECT_ERROR = "connect_error"  # never reached the server: nothing rotated
REFRESH_RESET = "reset"  # the server dropped it before processing: nothing rotated
REFRESH_5XX = "5xx"  # transient: nothing rotated
REFRESH_SILENCE = "silence"  # lost on the way: nothing rotated, no answer ever
REFRESH_SLOW = "slow"  # the server rotated the token at once and answers after ``delay``
REFRESH_PERMANENT = "permanent"  # invalid_grant: the account needs a new login
REFRESH_DEACTIVATED = "deactivated"  # account_deactivated

REFRESH_FAULTS = (
    REFRESH_CONNECT_ERROR, REFRESH_RESET, REFRESH_5XX, REFRESH_SILENCE, REFRESH_PERMANENT,
    REFRESH_DEACTIVATED,
)
PERMANENT_REFRESH = frozenset({REFRESH_PERMANENT, REFRESH_DEACTIVATED})

# --- WebSocket sessions: how each upgrade is answered, what each turn meets -------------------

UPGRADE_ACCEPT = "accept"
UPGRADE_USE_HTTP = "426"  # the upstream does not speak WebSockets: turns go over HTTP SSE
UPGRADE_429 = "429"
UPGRADE_5XX = "5xx"
UPGRADE_REFUSED = "connect_error"
UPGRADE_FAULTS = (UPGRADE_USE_HTTP, UPGRADE_429, UPGRADE_5XX, UPGRADE_REFUSED)

TURN_OK = "ok"
TURN_CLOSE_MID = "close_mid_turn"  # the upstream socket closes after the first event
TURN_SILENCE_MID = "silence_mid_turn"  # the upstream socket goes quiet mid-turn
TURN_CLOSE_AFTER = "close_after_turn"  # the socket closes between this turn and the next
TURN_FAULTS = (TURN_OK, TURN_CLOSE_MID, TURN_SILENCE_MID, TURN_CLOSE_AFTER)

# --- store methods whose n-th call may fail -------------------------------------------------

STORE_METHODS = (
    "save_tokens", "set_status", "set_cooldown", "set_usage", "list_accounts", "get",
)

# --- things that happen to the machine -------------------------------------------------------

ROUTE_CHANGE = "route_change"  # the route to the upstream now leaves from another address
WAKE = "wake"  # the laptop slept ``amount`` seconds
ADMIN_ROTATE = "admin_rotate"  # POST /api/clients/rotate
REFRESH_NOW = "refresh_now"  # POST /api/refresh (models + usage)
WORLD_EVENTS = (ROUTE_CHANGE, WAKE, ADMIN_ROTATE, REFRESH_NOW)


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """One client request: when it starts and what each of its upstream attempts meets.

    Attempts past ``faults`` succeed. ``leave_after``: the client goes away after that many
    events (0: right after the answer). ``bad_header``: one header carries a byte that is
    not ASCII, as Quart hands it over (latin-1 decoded).
    """

    at: float
    faults: tuple[Fault, ...] = ()
    event_delay: float = 0.0
    rate_limits_event: bool = False
    leave_after: int | None = None
    bad_header: bool = False
    session: str | None = None


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """One client WebSocket: its upgrades (per attempt; then accepted) and its turns."""

    at: float
    upgrades: tuple[str, ...] = ()
    turns: tuple[str, ...] = (TURN_OK,)


@dataclass(frozen=True, slots=True)
class AccountPlan:
    expires_in: float  # seconds from start until the account's access token expires


@dataclass(frozen=True, slots=True)
class StoreFault:
    method: str
    nth: int  # the n-th call of ``method`` (1-based) raises


@dataclass(frozen=True, slots=True)
class WorldEvent:
    at: float
    kind: str
    amount: float = 0.0


@dataclass(frozen=True, slots=True)
class Schedule:
    accounts: tuple[AccountPlan, ...]
    requests: tuple[RequestPlan, ...]
    refreshes: tuple[Fault, ...] = ()
    scheduler_calls: tuple[Fault, ...] = ()
    store: tuple[StoreFault, ...] = ()
    events: tuple[WorldEvent, ...] = ()
    seed: int = 0
    sessions: tuple[SessionPlan, ...] = ()


# --- hypothesis strategies ------------------------------------------------------------------

_slow_delays = st.sampled_from([1.0, 5.0, 14.0, 16.0, 40.0])


def _rarely(p_in_ten: int = 1) -> st.SearchStrategy[bool]:
    return st.integers(0, 9).map(lambda n: n < p_in_ten)


request_faults = st.one_of(
    st.sampled_from(REQUEST_FAULTS).map(Fault),
    st.builds(Fault, st.just(SLOW_HEADERS), _slow_delays),
    st.builds(Fault, st.just(STATUS_429), st.sampled_from([30.0, 400.0])),
)
scheduler_faults = st.one_of(
    st.sampled_from(SCHEDULER_FAULTS).map(Fault),
    st.builds(Fault, st.just(SLOW_HEADERS), _slow_delays),
)
refresh_faults = st.one_of(
    st.sampled_from(REFRESH_FAULTS).map(Fault),
    st.just(Fault(REFRESH_OK)),
    st.builds(Fault, st.just(REFRESH_SLOW), st.sampled_from([1.0, 10.0, 20.0, 45.0])),
)
request_plans = st.builds(
    RequestPlan,
    at=st.integers(0, 120).map(float),
    faults=st.lists(request_faults, max_size=4).map(tuple),
    event_delay=st.sampled_from([0.0, 0.0, 0.5, 20.0]),
    rate_limits_event=st.booleans(),
    leave_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 3)),
    bad_header=_rarely(),
    session=st.sampled_from([None, None, "s1", "s2"]),
)
account_plans = st.builds(
    AccountPlan,
    # inside the refresh margin at once, due during the run, or far away
    expires_in=st.sampled_from([120.0, 700.0, 900.0, 7200.0]),
)
store_faults = st.builds(StoreFault, st.sampled_from(STORE_METHODS), st.integers(1, 6))
world_events = st.builds(
    WorldEvent,
    at=st.integers(0, 150).map(float),
    kind=st.sampled_from(WORLD_EVENTS),
    amount=st.sampled_from([30.0, 900.0, 4000.0]),
)
session_plans = st.builds(
    SessionPlan,
    at=st.integers(0, 120).map(float),
    upgrades=st.lists(st.sampled_from(UPGRADE_FAULTS), max_size=2).map(tuple),
    turns=st.lists(st.sampled_from(TURN_FAULTS), min_size=1, max_size=3).map(tuple),
)
schedules = st.builds(
    Schedule,
    accounts=st.lists(account_plans, min_size=1, max_size=3).map(tuple),
    requests=st.lists(request_plans, min_size=1, max_size=6).map(tuple),
    refreshes=st.lists(refresh_faults, max_size=4).map(tuple),
    scheduler_calls=st.lists(scheduler_faults, max_size=3).map(tuple),
    store=st.lists(store_faults, max_size=3).map(tuple),
    events=st.lists(world_events, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
    sessions=st.lists(session_plans, max_size=2).map(tuple),
)
