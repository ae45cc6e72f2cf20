"""Codex's Responses-over-WebSocket: frames, the upstream socket, the HTTP fallback.

Split from the ProxyHandler for size; the session loop itself is in actors/ws_session.py.
A downstream session is relayed over upstream sockets (trio-websocket), each held under
its own client lease. Each turn is a ``response.create`` text frame up and a run of event
frames down, ending with a terminal event. If the upstream refuses the upgrade (426/404),
the session serves every turn over upstream HTTP SSE instead, turning each SSE event into
one frame, so the client never notices.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
import trio_websocket

from actors.errors import CodexLBError
from actors.upstream import (
    classify_response,
    parse_event_json,
    upstream_headers,
)

if TYPE_CHECKING:
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
# A frame's type where the backend writes it, first in the object: read without parsing.
TYPE_AT_START = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]+)"')
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


@functools.cache
def _system_tls_context() -> ssl.SSLContext:
    """The system's CAs, loaded once for every upstream socket (not once per connection)."""
    return ssl.create_default_context()


@asynccontextmanager
async def open_upstream_websocket(
    url: str, extra_headers: list[tuple[bytes, bytes]], *, connect_timeout: float,
    socket_options: Sequence[tuple[int, int, int]] = (),
    register: Callable[[Any], Callable[[], None]] | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Open the upstream socket over a stream we own.

    trio-websocket's open_websocket_url leaks its socket when the upgrade is refused;
    owning the stream lets us close it on every path. ``register`` (a lease's
    ``register_socket``) puts the socket under address evidence while it is open.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(connect_timeout):
        if secure:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=_system_tls_context())
            tcp = stream.transport_stream  # type: ignore[attr-defined]
        else:
            stream = tcp = await trio.open_tcp_stream(host, port)
    forget = register(tcp.socket) if register is not None else (lambda: None)
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
        forget()
        with trio.move_on_after(2, shield=True):
            await stream.aclose()


def single_leaf(exc: BaseException) -> BaseException:
    """trio-websocket may wrap one failure in an exception group: unwrap it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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
                            # The event's own JSON when it names its type, else with the type
                            # its SSE event line gave it.
                            await self.send_client(event.data if TYPE_AT_START.match(event.data)
                                                   else json.dumps(payload))
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


