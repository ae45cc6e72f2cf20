"""One client WebSocket session relayed over replaceable upstream sockets.

``SessionRelay`` waits on one merged stream of events (client frames, upstream frames, an
upstream socket's end, its path proven dead), so a turn can react to all of them. Each
upstream socket runs in its own task under its own lease (``serve_link``): a session can
replace its socket between turns, or move a turn that has not reached the client yet to
another account, without touching the client's socket. Not an actor: the ProxyHandler runs
it inside a request task and supplies the account plumbing (``SessionHooks``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from actors.client_manager import keepalive_socket_options
from actors.errors import CodexLBError
from actors.proxy_websocket import (
    CONNECTION_LIMIT_CODE,
    HOLD_FRAMES,
    MAX_SAME_ACCOUNT_RESENDS,
    PREAMBLE_TYPES,
    TYPE_AT_START,
    error_frame,
    frame_type,
    invalid_frame_event,
    open_upstream_websocket,
    single_leaf,
)
from actors.upstream import (
    TERMINAL_EVENT_TYPES,
    UpstreamFailure,
    classify_stream_error_event,
    failed_event,
    usage_from_rate_limits_event,
)

if TYPE_CHECKING:
    from actors.accounts import Usage
    from actors.client_manager import Lease
    from actors.request_record import RequestStats

log = logging.getLogger("codex_lb_trio.proxy.ws")


# --- the upstream socket of a session ----------------------------------------------------


@dataclass(slots=True, kw_only=True)
class UpstreamLink:
    """One upstream socket of a session, served by its own task (which holds the lease).

    ``close()`` cancels that task: the socket closes and the lease is released. A session
    may go through several links (a socket closed between turns, a turn failed over).
    """

    account_id: str
    connection: trio_websocket.WebSocketConnection
    lease: Lease
    headers: dict[str, str]
    cancel_scope: trio.CancelScope
    alive: bool = True

    def close(self) -> None:
        self.alive = False
        self.cancel_scope.cancel()


class LinkOpenFailed(Exception):
    """Opening an upstream socket failed; ``error`` is why, ``lease`` the (released) lease."""

    def __init__(self, error: BaseException, lease: Lease) -> None:
        super().__init__(str(error))
        self.error = error
        self.lease = lease


# What the session loop waits for: one merged stream, so a turn can react to the client,
# the upstream socket and the path's health alike. Internal to a session, not actor messages.


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientFrame:
    text: str | bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientGone:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamFrame:
    link: UpstreamLink
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamClosed:
    link: UpstreamLink
    reason: str
    code: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PathDead:
    link: UpstreamLink


SessionEvent = ClientFrame | ClientGone | UpstreamFrame | UpstreamClosed | PathDead


def upgrade_headers(connection: trio_websocket.WebSocketConnection) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in connection.handshake_headers}


async def serve_link(
    *, account_id: str, url: str, extra_headers: list[tuple[bytes, bytes]],
    connect_timeout: float, lease: Lease, events: trio.MemorySendChannel[SessionEvent],
    task_status: trio.TaskStatus[UpstreamLink] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open one upstream socket under ``lease`` and pump its frames into ``events``.

    Reports the link through ``task_status``; a failure to open raises LinkOpenFailed
    from ``nursery.start``. Afterwards it never raises: the socket's end is posted as
    UpstreamClosed. Cancelling it (``link.close()``) closes the socket, bounded.
    """
    started = False
    try:
        async with trio.open_nursery() as nursery:
            async with open_upstream_websocket(
                url, extra_headers, connect_timeout=connect_timeout,
                socket_options=keepalive_socket_options(lease.settings),
                register=lease.register_socket,
            ) as connection:
                link = UpstreamLink(account_id=account_id, connection=connection, lease=lease,
                                    headers=upgrade_headers(connection),
                                    cancel_scope=nursery.cancel_scope)
                task_status.started(link)
                started = True
                nursery.start_soon(_watch_path, link, events)
                await _pump_upstream(link, events)
                nursery.cancel_scope.cancel()
    except Exception as exc:
        if not started:
            raise LinkOpenFailed(single_leaf(exc), lease) from None
        leaf = single_leaf(exc)
        if not isinstance(leaf, trio.BrokenResourceError | trio.ClosedResourceError):
            log.info("upstream websocket account=%s generation=%d ended: %r",
                     account_id, lease.generation, leaf)


async def _pump_upstream(link: UpstreamLink, events: trio.MemorySendChannel[SessionEvent]) -> None:
    reason, code = "closed", None
    try:
        while True:
            frame = await link.connection.get_message()
            text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
            await events.send(UpstreamFrame(link=link, text=text))
    except trio_websocket.ConnectionClosed as closed:
        close = closed.reason
        if close is not None:
            reason = f"code {close.code}" + (f": {close.reason}" if close.reason else "")
            if close.reason and CONNECTION_LIMIT_CODE in close.reason:
                code = CONNECTION_LIMIT_CODE
    link.alive = False
    try:
        await events.send(UpstreamClosed(link=link, reason=reason, code=code))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the session is over


async def _watch_path(link: UpstreamLink, events: trio.MemorySendChannel[SessionEvent]) -> None:
    """Wake the session when the generation's path is proven dead: its deadline shrinks."""
    await link.lease.path_dead.wait()
    try:
        await events.send(PathDead(link=link))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def pump_client(
    client_in: trio.MemoryReceiveChannel[str | bytes], events: trio.MemorySendChannel[SessionEvent],
) -> None:
    """Feed the client's frames into the session loop; ClientGone when it leaves."""
    with client_in:
        try:
            async for frame in client_in:
                await events.send(ClientFrame(text=frame))
            await events.send(ClientGone())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# --- the session loop ----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Turn:
    raw: str  # the client's response.create text, as it came
    last_frame_at: float
    held: list[str] = field(default_factory=list)
    committed: bool = False  # an event of this turn reached the client: never replay
    resends: int = 0
    failovers: int = 0
    tried: set[str] = field(default_factory=set)
    stats: RequestStats | None = None  # for the request log


@dataclass(slots=True, kw_only=True)
class SessionHooks:
    """What the relay needs from the ProxyHandler (accounts, cooldowns, usage)."""

    reconnect: Callable[[str], Awaitable[UpstreamLink]]  # a fresh socket on that account
    fail_over: Callable[[set[str]], Awaitable[UpstreamLink]]  # a socket on another account
    cool_down: Callable[[str, UpstreamFailure], Awaitable[None]]
    note_usage: Callable[[str, Usage], None]
    wall_clock: Callable[[], float]
    max_failovers: int = 3
    # The request log (optional): stats for a new turn, and where a finished turn's go.
    turn_started: Callable[[str], RequestStats | None] = lambda raw: None
    turn_done: Callable[[RequestStats], None] = lambda stats: None


class SessionRelay:
    """Relays one client session over upstream sockets, turn by turn.

    Every well-formed client frame goes up as the client wrote it (only ``type`` is read);
    every upstream frame comes down as the upstream wrote it. A ``response.create`` opens
    a turn: until its first event reaches the client it may go out again, on a fresh
    socket of the same account (the socket closed, the 60-minute limit) or on another
    account (a usage limit, an overload). Afterwards a failure ends the turn with one
    terminal event. A socket that closes between turns is replaced on the next turn.
    """

    def __init__(self, *, link: UpstreamLink, events: trio.MemoryReceiveChannel[SessionEvent],
                 client_out: trio.MemorySendChannel[str], hooks: SessionHooks) -> None:
        self.link: UpstreamLink | None = link
        self.account_id = link.account_id
        self._events = events
        self._client_out = client_out
        self._hooks = hooks
        self._turn: _Turn | None = None
        self._waiting: deque[str] = deque()
        self.counters: Counter[str] = Counter()

    async def run(self) -> None:
        """Until the client leaves. Cancel-safe; the caller closes the links' nursery."""
        try:
            await self._loop()
        finally:
            if self._turn is not None and self._turn.stats is not None:
                self._turn.stats.terminal = "client_closed"  # the turn never ended
                self._log_turn(self._turn, None)

    async def _loop(self) -> None:
        try:
            while True:
                try:  # a frame already queued needs no timer (a cancel scope per frame)
                    event = self._events.receive_nowait()
                except trio.WouldBlock:
                    with trio.move_on_at(self._deadline()) as timer:
                        event = await self._events.receive()
                    if timer.cancelled_caught:
                        await self._turn_went_silent()
                        continue
                match event:
                    case ClientGone():
                        return
                    case ClientFrame(text=text):
                        await self._on_client_frame(text)
                    case UpstreamFrame(link=link, text=text) if link is self.link:
                        await self._on_upstream_frame(text)
                    case UpstreamClosed(link=link) if link is self.link:
                        await self._on_upstream_closed(event)
                    case _:
                        pass  # a stale link's leftovers, or PathDead: the deadline is re-read
                while self._turn is None and self._waiting:
                    await self._start_turn(self._waiting.popleft())
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            return  # the client went away

    def _deadline(self) -> float:
        if self._turn is None or self.link is None:
            return math.inf
        # Re-read on every wake-up: once the path is proven dead, idle_timeout() shrinks
        # to dead_path_silence, still counted from the last frame.
        return self._turn.last_frame_at + self.link.lease.idle_timeout()

    async def _send_client(self, frame: str) -> None:
        await self._client_out.send(frame)

    # --- the client's side

    async def _on_client_frame(self, text: str | bytes) -> None:
        try:
            kind = frame_type(text)
        except ValueError as exc:
            await self._send_client(invalid_frame_event(str(exc)))
            return
        assert isinstance(text, str)
        if kind == "response.create":
            if self._turn is None:
                await self._start_turn(text)
            else:
                self._waiting.append(text)  # one turn at a time per socket
            return
        # Control frames (response.processed, …) belong to the socket they refer to.
        if self.link is not None and self.link.alive:
            await self._send_upstream(text)
        else:
            log.debug("websocket account=%s dropped a %s frame: no live upstream socket",
                      self.account_id, kind)

    async def _send_upstream(self, text: str) -> bool:
        assert self.link is not None
        try:
            await self.link.connection.send_message(text)
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                trio.ClosedResourceError):
            self._drop_link()
            return False
        return True

    # --- a turn

    async def _start_turn(self, raw: str) -> None:
        self._turn = _Turn(raw=raw, last_frame_at=trio.current_time(), tried={self.account_id},
                           stats=self._hooks.turn_started(raw))
        await self._dispatch()

    async def _dispatch(self) -> None:
        """Send the current turn on the current socket, opening a fresh one if need be."""
        turn = self._turn
        assert turn is not None
        for _ in range(MAX_SAME_ACCOUNT_RESENDS + 1):
            if self.link is None or not self.link.alive:
                if not await self._reconnect():
                    return
            turn.last_frame_at = trio.current_time()
            if await self._send_upstream(turn.raw):
                if turn.stats is not None and self.link is not None:
                    turn.stats.generation = self.link.lease.generation
                return
        await self._end_turn(error_frame(
            502, "upstream_connection_lost",
            f"the upstream websocket of account {self.account_id} closed again at once"))

    async def _reconnect(self) -> bool:
        """A fresh socket on the session's account; else answer the turn with why not."""
        self._drop_link()
        try:
            self.link = await self._hooks.reconnect(self.account_id)
        except CodexLBError as exc:
            self.counters["reconnect_failures"] += 1
            await self._end_turn(error_frame(
                exc.http_status if 400 <= exc.http_status < 600 else 503, "account_unavailable",
                f"the upstream websocket of this session closed and its account "
                f"{self.account_id} cannot open a new one ({exc.code}: {exc.message}); "
                "start a new session to continue on another account"))
            return False
        self.counters["reconnects"] += 1
        log.info("websocket account=%s: fresh upstream socket generation=%d",
                 self.account_id, self.link.lease.generation)
        return True

    def _drop_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    async def _end_turn(self, terminal: str) -> None:
        """End the turn with exactly one terminal frame (after anything held back)."""
        turn, self._turn = self._turn, None
        if turn is not None:
            for frame in turn.held:
                await self._send_client(frame)
        await self._send_client(terminal)
        if turn is not None:
            self._log_turn(turn, terminal)

    def _log_turn(self, turn: _Turn, terminal: str | None) -> None:
        """Hand a finished turn's stats to the request log (once)."""
        stats, turn.stats = turn.stats, None
        if stats is None:
            return
        if terminal is not None:
            try:
                payload = json.loads(terminal)
            except (ValueError, RecursionError):
                payload = None
            if isinstance(payload, dict):
                stats.note_terminal(str(payload.get("type") or ""), payload)
        stats.account_id = self.account_id
        stats.failovers = turn.failovers
        stats.attempts = 1 + turn.failovers + turn.resends
        self._hooks.turn_done(stats)

    async def _turn_went_silent(self) -> None:
        assert self.link is not None
        dead = self.link.lease.path_dead.is_set()
        self._drop_link()  # a silent socket is suspect: the next turn opens a fresh one
        self.counters["silent_turns"] += 1
        await self._end_turn(json.dumps(failed_event(
            "upstream_connection_lost",
            "upstream websocket went silent" + (" after its network path died" if dead else ""))))

    # --- the upstream's side

    async def _on_upstream_frame(self, text: str) -> None:
        kind, payload = _peek(text)
        now = self._hooks.wall_clock()
        if kind == "codex.rate_limits" and payload is not None:
            usage = usage_from_rate_limits_event(payload, now)
            if usage is not None:
                self._hooks.note_usage(self.account_id, usage)
        turn = self._turn
        if turn is None:
            if kind == "error" and _error_code(payload) == CONNECTION_LIMIT_CODE:
                self._drop_link()  # aged out between turns: the next turn opens a new one
                return
            await self._send_client(text)  # an answer to a control frame, say
            return
        turn.last_frame_at = trio.current_time()
        failure = (classify_stream_error_event(payload, now)
                   if payload is not None and kind in ("error", "response.failed") else None)
        if failure is not None and failure.kind in ("rate_limited", "quota"):
            await self._hooks.cool_down(self.account_id, failure)
        if not turn.committed:
            if kind == "error" and _error_code(payload) == CONNECTION_LIMIT_CODE:
                turn.resends += 1
                if turn.resends <= MAX_SAME_ACCOUNT_RESENDS:
                    self._drop_link()
                    turn.held.clear()
                    await self._dispatch()
                    return
            if (failure is not None and failure.kind != "client"
                    and turn.failovers < self._hooks.max_failovers):
                if await self._fail_over(failure):
                    return
            if kind in PREAMBLE_TYPES and len(turn.held) < HOLD_FRAMES:
                turn.held.append(text)
                return
            turn.committed = True
            held, turn.held = turn.held, []
            for frame in held:
                await self._send_client(frame)
        await self._send_client(text)
        if turn.stats is not None:
            turn.stats.mark_first_event(trio.current_time())
        if kind in TERMINAL_EVENT_TYPES:
            self._turn = None
            self._log_turn(turn, text)

    async def _fail_over(self, failure: UpstreamFailure) -> bool:
        """Replay the uncommitted turn on another account. False: none could take it."""
        turn = self._turn
        assert turn is not None
        turn.failovers += 1
        try:
            link = await self._hooks.fail_over(set(turn.tried))
        except CodexLBError as exc:
            log.info("websocket account=%s turn failed (%s); no other account: %s",
                     self.account_id, failure.code, exc.message)
            return False  # the client gets the upstream's own error frame
        log.info("websocket account=%s turn failed (%s): replaying on account=%s",
                 self.account_id, failure.code, link.account_id)
        self.counters["turn_failovers"] += 1
        self._drop_link()
        self.link, self.account_id = link, link.account_id
        turn.tried.add(link.account_id)
        turn.held.clear()
        await self._dispatch()
        return True

    async def _on_upstream_closed(self, closed: UpstreamClosed) -> None:
        self._drop_link()
        turn = self._turn
        if turn is None:
            log.info("websocket account=%s: upstream socket closed between turns (%s)",
                     self.account_id, closed.reason)
            return  # the next turn opens a fresh one
        if not turn.committed and turn.resends < MAX_SAME_ACCOUNT_RESENDS:
            turn.resends += 1
            turn.held.clear()
            log.info("websocket account=%s: upstream socket closed before the turn's first "
                     "event (%s): sending it again on a fresh socket", self.account_id,
                     closed.reason)
            await self._dispatch()
            return
        self.counters["turns_cut"] += 1
        await self._end_turn(json.dumps(failed_event(
            "upstream_connection_lost", f"upstream websocket closed: {closed.reason}")))


# The only upstream frame types whose body the relay reads; every other frame is relayed
# after reading its type, found without parsing when it leads the object (as the backend
# writes it: TYPE_AT_START).
_PARSED_TYPES = frozenset({"error", "response.failed", "codex.rate_limits"})


def _peek(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """The frame's type, and its parsed body only for the few types the relay acts on."""
    match = TYPE_AT_START.match(text)
    if match is not None and match.group(1) not in _PARSED_TYPES:
        return match.group(1), None
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(payload, dict):
        return None, None
    kind = payload.get("type")
    if not isinstance(kind, str):
        return None, None
    return kind, (payload if kind in _PARSED_TYPES else None)


def _error_code(payload: dict[str, Any] | None) -> str | None:
    if payload is None:
        return None
    err = payload.get("error")
    if payload.get("type") == "response.failed":
        response = payload.get("response")
        err = response.get("error") if isinstance(response, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return code if isinstance(code, str) else None
    return None
