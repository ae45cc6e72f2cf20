"""Codex's Responses-over-WebSocket, relayed by the ProxyHandler (split from it for size).

One downstream socket maps to one upstream socket (trio-websocket), held under one
client lease for the socket's life. Each turn is a ``response.create`` text frame up
and a run of event frames down, ending with a terminal event. If the upstream
refuses the upgrade (426/404), the session serves every turn over upstream HTTP SSE
instead, turning each SSE event into one frame, so the client never notices.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
import trio_websocket

from actors.client_manager import keepalive_socket_options
from actors.errors import CodexLBError
from actors.upstream import (
    TERMINAL_EVENT_TYPES,
    UpstreamFailure,
    classify_response,
    classify_stream_error_event,
    failed_event,
    parse_event_json,
    upstream_headers,
    usage_from_rate_limits_event,
)

if TYPE_CHECKING:
    from actors.accounts import Usage
    from actors.client_manager import Lease
    from actors.proxy_handler import Exchange

log = logging.getLogger("codex_lb_trio.proxy.ws")

FRAME_BUFFER = 8
MAX_FRAME_BYTES = 16 * 1024 * 1024
WS_BETA = "responses_websockets=2026-02-06"
USE_HTTP_STATUSES = frozenset({404, 426})


@dataclass(slots=True, kw_only=True)
class WebSocketSession:
    """What the route gets: send client frames in, read frames for the client out.

    Close ``to_upstream`` when the client goes away; ``from_upstream`` ends when the
    session is over. ``mode`` is "websocket" or "http" (the fallback). ``headers`` are
    the upstream upgrade answer's headers Codex reads, for the client's upgrade answer.
    """

    to_upstream: trio.MemorySendChannel[str | bytes]
    from_upstream: trio.MemoryReceiveChannel[str]
    account_id: str
    mode: str
    headers: dict[str, str] = field(default_factory=dict)


# Upgrade answer headers Codex reads (turn-state affinity, catalog etag, reasoning, model).
FORWARDED_UPGRADE_HEADERS = ("x-codex-turn-state", "x-models-etag", "x-reasoning-included",
                             "openai-model")
# The backend caps a socket's age (60 min); this code says "open a new socket", not "fail".
CONNECTION_LIMIT_CODE = "websocket_connection_limit_reached"
# Opening events held back (like HTTP streams) so a failure right behind them can still
# fail over: nothing has reached the client yet.
PREAMBLE_TYPES = frozenset({"response.created", "response.in_progress", "codex.rate_limits"})
HOLD_FRAMES = 8
# How often one turn may go out again on a fresh socket of the same account before its
# first event (a socket that died between turns, the 60-minute limit).
MAX_SAME_ACCOUNT_RESENDS = 2


def invalid_frame_event(message: str) -> str:
    return json.dumps({
        "type": "error",
        "status": 400,
        "error": {"type": "invalid_request_error", "code": "invalid_frame", "message": message},
    })


def error_frame(status: int, code: str, message: str, type_: str = "upstream_error") -> str:
    return json.dumps({"type": "error", "status": status,
                       "error": {"type": type_, "code": code, "message": message}})


def frame_type(frame: str | bytes) -> str:
    """The frame's ``type``, or raise ValueError saying why the frame is malformed.

    Well-formed means: a text frame, within the size limit, holding a JSON object
    with a string ``type``. Anything else of that shape is relayed as it is.
    """
    if isinstance(frame, bytes):
        raise ValueError("binary frames are not accepted: send JSON text frames")
    if len(frame) > MAX_FRAME_BYTES:
        raise ValueError(f"frame is larger than {MAX_FRAME_BYTES} bytes")
    try:
        payload = json.loads(frame)
    except (ValueError, RecursionError):
        raise ValueError("frame is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("frame must be a JSON object")
    kind = payload.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("frame has no string \"type\"")
    return kind


def parse_client_frame(frame: str | bytes) -> dict[str, Any] | str:
    """The client's response.create payload, or a message saying why the frame is bad."""
    try:
        kind = frame_type(frame)
    except ValueError as exc:
        return str(exc)
    if kind != "response.create":
        return f"frame type {kind!r} is only relayed over an upstream websocket"
    payload: dict[str, Any] = json.loads(frame)
    return payload


def websocket_url(base_url: str, path: str) -> str:
    if base_url.startswith("https://"):
        return "wss://" + base_url.removeprefix("https://").rstrip("/") + path
    return "ws://" + base_url.removeprefix("http://").rstrip("/") + path


def handshake_extra(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    extra = [(k.encode(), v.encode()) for k, v in headers.items()]
    if "openai-beta" not in headers:
        extra.append((b"openai-beta", WS_BETA.encode()))
    return extra


@asynccontextmanager
async def open_upstream_websocket(
    url: str, extra_headers: list[tuple[bytes, bytes]], *, connect_timeout: float,
    socket_options: Sequence[tuple[int, int, int]] = (),
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Open the upstream socket over a stream we own.

    trio-websocket's open_websocket_url leaks its socket when the upgrade is refused;
    owning the stream lets us close it on every path.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(connect_timeout):
        if secure:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context())
            tcp = stream.transport_stream  # type: ignore[attr-defined]
        else:
            stream = tcp = await trio.open_tcp_stream(host, port)
    try:
        for level, option, value in socket_options:
            tcp.setsockopt(level, option, value)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                connection = await trio_websocket.wrap_client_stream(
                    nursery, stream, host if parts.port is None else f"{host}:{port}", resource,
                    extra_headers=extra_headers, message_queue_size=FRAME_BUFFER,
                    max_message_size=MAX_FRAME_BYTES,
                )
            try:
                yield connection
            finally:
                with trio.move_on_after(2, shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(2, shield=True):
            await stream.aclose()


def single_leaf(exc: BaseException) -> BaseException:
    """trio-websocket may wrap one failure in an exception group: unwrap it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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


@dataclass(slots=True, kw_only=True)
class SessionHooks:
    """What the relay needs from the ProxyHandler (accounts, cooldowns, usage)."""

    reconnect: Callable[[str], Awaitable[UpstreamLink]]  # a fresh socket on that account
    fail_over: Callable[[set[str]], Awaitable[UpstreamLink]]  # a socket on another account
    cool_down: Callable[[str, UpstreamFailure], Awaitable[None]]
    note_usage: Callable[[str, Usage], None]
    wall_clock: Callable[[], float]
    max_failovers: int = 3


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
            while True:
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
        self._turn = _Turn(raw=raw, last_frame_at=trio.current_time(), tried={self.account_id})
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
        if kind in TERMINAL_EVENT_TYPES:
            self._turn = None

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
# writes it).
_PARSED_TYPES = frozenset({"error", "response.failed", "codex.rate_limits"})
_TYPE_AT_START = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]+)"')


def _peek(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """The frame's type, and its parsed body only for the few types the relay acts on."""
    match = _TYPE_AT_START.match(text)
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


# --- the HTTP fallback ---------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class TurnRelay:
    """Serves a session's turns over upstream HTTP SSE when the upstream refuses sockets."""

    client_in: trio.MemoryReceiveChannel[str | bytes]
    client_out: trio.MemorySendChannel[str]
    http_turn: Callable[[dict[str, Any]], Awaitable[Exchange]]

    async def send_client(self, frame: str) -> None:
        await self.client_out.send(frame)

    async def next_turn(self) -> dict[str, Any] | None:
        """The next response.create from the client (bad frames are answered)."""
        async for frame in self.client_in:
            try:
                kind = frame_type(frame)
            except ValueError as exc:
                await self.send_client(invalid_frame_event(str(exc)))
                continue
            if kind != "response.create":
                continue  # control frames (response.processed) mean nothing to HTTP turns
            payload: dict[str, Any] = json.loads(frame)
            return payload
        return None

    async def relay_http(self, first_turn: dict[str, Any] | None = None) -> None:
        """Each turn becomes one upstream HTTP SSE exchange."""
        turn = first_turn if first_turn is not None else await self.next_turn()
        while turn is not None:
            if turn.get("generate") is False:
                # A prewarm: over a socket it warms the upstream's cache for free, but
                # as an HTTP call it would be a whole billed turn. Answer it here.
                for event in prewarm_events(turn):
                    await self.send_client(json.dumps(event))
                turn = await self.next_turn()
                continue
            body = {k: v for k, v in turn.items() if k != "type"}
            body["stream"] = True
            try:
                exchange = await self.http_turn(body)
            except CodexLBError as exc:
                await self.send_client(error_frame(exc.http_status, exc.code, exc.message))
            else:
                assert exchange.events is not None
                with exchange.events:
                    async for event in exchange.events:
                        payload = parse_event_json(event)
                        if payload is not None:
                            await self.send_client(json.dumps(payload))
            turn = await self.next_turn()


def prewarm_events(turn: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of an empty, completed response for a ``generate: false`` frame."""
    response = {
        "id": "resp_prewarm_" + secrets.token_hex(8),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": turn.get("model"),
        "output": [],
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
    }
    return [
        {"type": "response.created", "response": {**response, "status": "in_progress"}},
        {"type": "response.completed", "response": response},
    ]


def refused_failure(refused: trio_websocket.ConnectionRejected, now: float) -> Any:
    """Classify a refused upgrade like any other failed answer (429 → cool down, …)."""
    headers = {k.decode().lower(): v.decode() for k, v in (refused.headers or [])}
    return classify_response(refused.status_code or 502, refused.body or b"", headers, now)


def handshake_headers(client_headers: tuple[tuple[str, str], ...], access_token: str,
                      chatgpt_account_id: str) -> dict[str, str]:
    headers = upstream_headers(client_headers, access_token=access_token,
                               chatgpt_account_id=chatgpt_account_id)
    headers.pop("accept", None)
    headers.pop("content-type", None)
    return headers


