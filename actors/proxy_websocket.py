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
import secrets
import time
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
import trio_websocket

from actors.errors import CodexLBError
from actors.upstream import (
    TERMINAL_EVENT_TYPES,
    classify_response,
    failed_event,
    parse_event_json,
    upstream_headers,
)

if TYPE_CHECKING:
    from actors.proxy_handler import Exchange
    from actors.request_record import RequestStats

log = logging.getLogger("codex_lb_trio.proxy.ws")

FRAME_BUFFER = 8
MAX_FRAME_BYTES = 16 * 1024 * 1024
WS_BETA = "responses_websockets=2026-02-06"
USE_HTTP_STATUSES = frozenset({404, 426})


@dataclass(slots=True, kw_only=True)
class WebSocketSession:
    """What the route gets: send client frames in, read frames for the client out.

    Close ``to_upstream`` when the client goes away; ``from_upstream`` ends when the
    session is over. ``mode`` is "websocket" or "http" (the fallback).
    """

    to_upstream: trio.MemorySendChannel[str]
    from_upstream: trio.MemoryReceiveChannel[str]
    account_id: str
    mode: str


def invalid_frame_event(message: str) -> str:
    return json.dumps({
        "type": "error",
        "status": 400,
        "error": {"type": "invalid_request_error", "code": "invalid_frame", "message": message},
    })


def parse_client_frame(frame: str | bytes) -> dict[str, Any] | str:
    """The client's response.create payload, or a message saying why the frame is bad."""
    if isinstance(frame, bytes):
        return "binary frames are not accepted: send response.create as a JSON text frame"
    try:
        payload = json.loads(frame)
    except ValueError:
        return "frame is not valid JSON"
    if not isinstance(payload, dict):
        return "frame must be a JSON object"
    if payload.get("type") != "response.create":
        return f"unsupported frame type {payload.get('type')!r}: expected response.create"
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


@dataclass(slots=True, kw_only=True)
class TurnRelay:
    """Relays the turns of one session; the ProxyHandler supplies the account plumbing."""

    client_in: trio.MemoryReceiveChannel[str]
    client_out: trio.MemorySendChannel[str]
    account_id: str
    idle_timeout: Callable[[], float]
    http_turn: Callable[[dict[str, Any]], Awaitable[Exchange]]
    # The request log: stats for a turn (None: not logging), and where a finished turn goes.
    turn_stats: Callable[[dict[str, Any]], RequestStats | None] = lambda turn: None
    turn_done: Callable[[RequestStats], None] = lambda stats: None
    generation: int = 0  # the client generation of the upstream socket, for the log

    async def send_client(self, frame: str) -> None:
        await self.client_out.send(frame)

    async def next_turn(self) -> dict[str, Any] | None:
        """The next valid response.create from the client (bad frames are answered)."""
        async for frame in self.client_in:
            parsed = parse_client_frame(frame)
            if isinstance(parsed, str):
                await self.send_client(invalid_frame_event(parsed))
                continue
            return parsed
        return None

    async def relay_websocket(self, upstream: trio_websocket.WebSocketConnection) -> None:
        """Turns over the upstream socket until the client leaves or the socket dies."""
        while (turn := await self.next_turn()) is not None:
            stats = self.turn_stats(turn)
            try:
                await upstream.send_message(json.dumps(turn))
                while True:
                    with trio.fail_after(self.idle_timeout()):
                        frame = await upstream.get_message()
                    await self.send_client(frame if isinstance(frame, str) else frame.decode())
                    if stats is not None:
                        stats.mark_first_event(trio.current_time())
                    if (kind := _frame_type(frame)) in TERMINAL_EVENT_TYPES:
                        if stats is not None:
                            stats.note_terminal(kind, _frame_json(frame))
                        break
            except trio.TooSlowError:
                _lost(stats)
                await self.send_client(json.dumps(failed_event(
                    "upstream_connection_lost", "upstream websocket went silent")))
                return
            except trio_websocket.ConnectionClosed as exc:
                _lost(stats)
                await self.send_client(json.dumps(failed_event(
                    "upstream_connection_lost", f"upstream websocket closed: {exc.reason}")))
                return
            finally:
                if stats is not None:
                    self.turn_done(stats)

    async def relay_http(self, first_turn: dict[str, Any] | None = None) -> None:
        """The fallback: each turn becomes one upstream HTTP SSE exchange."""
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
                await self.send_client(json.dumps({
                    "type": "error", "status": exc.http_status,
                    "error": {"type": "upstream_error", "code": exc.code, "message": exc.message},
                }))
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


def _lost(stats: RequestStats | None) -> None:
    if stats is not None:
        stats.terminal, stats.error_code = "response.failed", "upstream_connection_lost"


def _frame_json(frame: str | bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(frame)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _frame_type(frame: str | bytes) -> str | None:
    try:
        payload = json.loads(frame)
    except ValueError:
        return None
    return payload.get("type") if isinstance(payload, dict) else None


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


