"""The simulated world around the engine: upstream, auth server, clients' HTTP stacks, store.

Everything here runs inside the engine's own trio run (mock clock, no sockets):

* ``SimTransport``: one per client generation, an ``httpx`` transport that answers the
  upstream backend, the scheduler's calls and the auth server from the schedule, and
  watches how the engine uses it (requests after close, streams left open, replays).
* ``AuthServer``: refresh tokens are single use and the server rotates a token the moment
  it processes a request, whether or not the answer gets back (as the real one does).
* ``FlakyStore``: the in-memory store whose n-th call of a method fails, as a full disk
  or a locked database would make it fail.

Whatever breaks an invariant is written to ``World.violations`` on the spot, with the
mock time, so a failing schedule says what went wrong where.
"""

from __future__ import annotations

import errno
import inspect
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
import trio.testing
import trio_websocket

from actors.accounts import Account, InMemoryAccountStore, TokenSet
from service.store import StoreError
from tests.fakes.jwt import mint_jwt
from tests.sim import schedule as s

BASE_WALL = 1_800_000_000.0
UPSTREAM_HOST = "upstream.sim"
AUTH_HOST = "auth.sim"
BASE_URL = f"http://{UPSTREAM_HOST}/backend-api"
AUTH_URL = f"http://{AUTH_HOST}"
REQUEST_ID_HEADER = "x-sim-request"
NAMESPACE = "https://api.openai.com/auth"
TOKEN_LIFETIME = 3600.0
HEDGE_AFTER = 2.0  # a streamed call whose headers are this late gets a hedge (actors/hedge.py)


@dataclass(slots=True)
class GenerationLog:
    """One client the engine built. Keyed by build order: each host's pool numbers its own."""

    key: int
    number: int  # the generation number its ClientManager gave it
    created_at: float
    closed_at: float | None = None
    open_streams: int = 0
    failed: bool = False  # a transport fault was injected on this generation
    late: bool = False  # a request on it waited long enough for headers to start a hedge
    path_died_at: float | None = None  # a route change or wake killed its connections
    hosts: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        host = ",".join(sorted(self.hosts)) or "unused"
        return f"generation {self.number} ({host}, client #{self.key})"


@dataclass(slots=True)
class RequestLog:
    """What happened to one client request, seen from both ends."""

    plan: s.RequestPlan
    upstream_calls: int = 0
    sent_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    first_byte_seq: int | None = None  # when the client got the answer's first byte
    events: list[str] = field(default_factory=list)
    error: Exception | None = None
    left: bool = False


@dataclass(slots=True)
class SessionLog:
    """One client WebSocket session: what each turn brought back to the client."""

    plan: s.SessionPlan
    upgrade_calls: int = 0
    sent_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    mode: str = ""
    turns: list[list[str]] = field(default_factory=list)
    after_close: list[str] = field(default_factory=list)
    error: Exception | None = None
    sockets_open: int = 0
    server_turns: int = 0
    last_frame: str | bytes = ""


@dataclass(slots=True)
class AuthAccount:
    account_id: str
    index: int
    current: str  # the one refresh token the server accepts
    spent: set[str] = field(default_factory=set)  # rotated away: presenting one is a replay
    issued: int = 0
    in_flight: int = 0
    permanent_code: str | None = None  # the server declared the login dead
    answer_lost: bool = False  # a rotated token's answer died with its network path


class World:
    def __init__(self, schedule: s.Schedule) -> None:
        self.schedule = schedule
        self.violations: list[str] = []
        self.log_tail: list[str] = []
        self.config: dict[str, Any] = {}
        self.seq = 0
        self.wall_offset = 0.0
        self.address = "192.0.2.10"
        self.generations: dict[int, GenerationLog] = {}
        self.requests: dict[str, RequestLog] = {
            f"r{i}": RequestLog(plan) for i, plan in enumerate(schedule.requests)
        }
        self.sessions: dict[str, SessionLog] = {
            f"w{i}": SessionLog(plan) for i, plan in enumerate(schedule.sessions)
        }
        self.refresh_faults = list(schedule.refreshes)
        self.scheduler_faults = list(schedule.scheduler_calls)
        self.auth: dict[str, AuthAccount] = {}
        self.token_owner: dict[str, str] = {}
        self.refreshes_answered = 0
        self.open_streams: set[SimStream] = set()
        self._current_call = ""
        self.store = FlakyStore(self)

    # --- bookkeeping -----------------------------------------------------------------

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return BASE_WALL + trio.current_time() + self.wall_offset

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def violate(self, what: str) -> None:
        self.violations.append(f"t={self.now():.1f}s {what}")

    def path_died(self) -> None:
        """A route change or a wake: every connection open now is dead for real."""
        for gen in self.generations.values():
            if gen.closed_at is None and gen.path_died_at is None:
                gen.path_died_at = self.now()

    def client_factory(self, generation: int) -> httpx.AsyncClient:
        """Build a client for one generation of either pool (backend or auth server)."""
        key = len(self.generations) + 1
        self.generations[key] = GenerationLog(key, generation, self.now())
        return SimClient(self, key, transport=SimTransport(self, key),
                         follow_redirects=False, trust_env=False)

    # --- accounts ----------------------------------------------------------------------

    def mint(self, account: AuthAccount) -> tuple[TokenSet, float]:
        account.issued += 1
        expires = self.wall() + TOKEN_LIFETIME
        return self._tokens(account, account.issued, expires), expires

    def _tokens(self, account: AuthAccount, n: int, expires: float) -> TokenSet:
        claims = {NAMESPACE: {"chatgpt_account_id": f"chatgpt-{account.index}",
                              "chatgpt_plan_type": "plus"}}
        refresh = f"rt-{account.index}-{n}"
        self.token_owner[refresh] = account.account_id
        return TokenSet(
            access_token=mint_jwt({"exp": int(expires), **claims}),
            refresh_token=refresh,
            id_token=mint_jwt({"email": f"a{account.index}@example.com", "exp": int(expires),
                               **claims}),
        )

    def seed_accounts(self) -> None:
        for index, plan in enumerate(self.schedule.accounts):
            account_id = f"acc_{index}"
            auth = AuthAccount(account_id, index, current="")
            expires = self.wall() + plan.expires_in
            tokens = self._tokens(auth, 0, expires)
            auth.current = tokens.refresh_token
            self.auth[account_id] = auth
            self.store.inner._accounts[account_id] = Account(
                id=account_id, email=f"a{index}@example.com",
                chatgpt_account_id=f"chatgpt-{index}", plan="plus", tokens=tokens,
                access_expires_at=expires, created_at=BASE_WALL + index,
            )

    # --- the auth server ------------------------------------------------------------------

    async def token_endpoint(self, request: httpx.Request, generation: int) -> httpx.Response:
        body = json.loads(request.content)
        token = body.get("refresh_token", "")
        owner = self.token_owner.get(token)
        if owner is None:
            self.violate(f"refresh with a token the auth server never issued: {token!r}")
            return _json(401, {"error": {"code": "refresh_token_invalidated"}})
        account = self.auth[owner]
        account.in_flight += 1
        try:
            if account.in_flight > 1:
                self.violate(f"{owner}: {account.in_flight} refreshes in flight at once")
            if token in account.spent:
                if not account.answer_lost:  # else no client could have known the new one
                    self.violate(f"{owner}: refresh token {token} presented again after the "
                                 "server rotated it (the account's login is lost)")
                return _json(401, {"error": {"code": "refresh_token_reused",
                                             "message": "refresh token already used"}})
            if account.permanent_code is not None:
                return _json(401, {"error": {"code": account.permanent_code}})
            fault = self.refresh_faults.pop(0) if self.refresh_faults else s.Fault(s.REFRESH_OK)
            match fault.kind:
                case s.REFRESH_CONNECT_ERROR:
                    self.generations[generation].failed = True
                    raise httpx.ConnectError("connection refused", request=request)
                case s.REFRESH_RESET:
                    self.generations[generation].failed = True
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response.", request=request)
                case s.REFRESH_5XX:
                    return _json(503, {"error": "temporarily_unavailable"})
                case s.REFRESH_SILENCE:
                    self.generations[generation].failed = True
                    await trio.sleep_forever()
                case s.REFRESH_PERMANENT | s.REFRESH_DEACTIVATED:
                    code = ("invalid_grant" if fault.kind == s.REFRESH_PERMANENT
                            else "account_deactivated")
                    account.permanent_code = code
                    return _json(400 if code == "invalid_grant" else 401,
                                 {"error": {"code": code, "message": "log in again"}})
            # ok or slow: the token rotates the moment the server processes the request
            account.spent.add(token)
            tokens, _ = self.mint(account)
            account.current = tokens.refresh_token
            if fault.kind == s.REFRESH_SLOW:
                gen = self.generations[generation]
                sent_at = self.now()
                try:
                    await trio.sleep(fault.delay)
                except trio.Cancelled:
                    gen.failed = True
                    if gen.path_died_at is not None and gen.path_died_at >= sent_at:
                        account.answer_lost = True  # the engine gave up on a dead path
                    raise
                if gen.path_died_at is not None and gen.path_died_at >= sent_at:
                    # The laptop slept or changed networks while the server was answering:
                    # the answer goes nowhere, as it would over a real network.
                    account.answer_lost = True
                    gen.failed = True
                    raise httpx.ReadError("connection lost with its network path")
            self.refreshes_answered += 1
            return _json(200, {"access_token": tokens.access_token,
                               "refresh_token": tokens.refresh_token,
                               "id_token": tokens.id_token, "expires_in": TOKEN_LIFETIME})
        finally:
            account.in_flight -= 1

    # --- the upstream backend -------------------------------------------------------------

    async def responses(self, request: httpx.Request, generation: int) -> httpx.Response:
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        try:
            metadata = json.loads(request.content).get("client_metadata") or {}
        except (ValueError, AttributeError):
            metadata = {}
        if isinstance(metadata, dict) and metadata.get(REQUEST_ID_HEADER):
            rid = str(metadata[REQUEST_ID_HEADER])  # a WebSocket session's turn over HTTP
            self.requests.setdefault(rid, RequestLog(s.RequestPlan(at=0.0)))
        log = self.requests.get(rid)
        if log is None:
            self.violate(f"an upstream /codex/responses call without a known request id {rid!r}")
            return _json(400, {"error": {"code": "bad_request"}})
        seq = self.tick()
        if log.first_byte_seq is not None and seq > log.first_byte_seq:
            self.violate(f"{rid}: replayed upstream (call {log.upstream_calls + 1}) after its "
                         "first byte reached the client")
        attempt = log.upstream_calls
        log.upstream_calls += 1
        plan = log.plan
        fault = plan.faults[attempt] if attempt < len(plan.faults) else None
        kind = fault.kind if fault else None
        gen = self.generations[generation]
        if kind in s.TRANSPORT_FAULTS:
            gen.failed = True
        match kind:
            case s.CONNECT_ERROR:
                raise httpx.ConnectError("connection refused", request=request)
            case s.RESET_BEFORE_HEADERS:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            case s.SILENCE:
                await trio.sleep_forever()
            case s.SLOW_HEADERS:
                if fault.delay >= HEDGE_AFTER:  # type: ignore[union-attr]
                    gen.late = True
                try:
                    await trio.sleep(fault.delay)  # type: ignore[union-attr]
                except trio.Cancelled:
                    gen.failed = True
                    raise
            case s.STATUS_429:
                return self._stream_response(generation, 429, [json.dumps({"error": {
                    "type": "usage_limit_reached", "message": "limit reached",
                    "resets_in_seconds": fault.delay}}).encode()], json_body=True)  # type: ignore[union-attr]
            case s.STATUS_401:
                return self._stream_response(generation, 401, [json.dumps({"error": {
                    "code": "token_expired_access", "message": "bad token"}}).encode()],
                    json_body=True)
            case s.STATUS_5XX:
                return self._stream_response(generation, 502, [b"<html>bad gateway</html>"],
                                             json_body=False)
        rid_tag = f"resp_{rid}_{attempt}"
        events: list[bytes] = [
            _sse("response.created", {"type": "response.created",
                                      "response": {"id": rid_tag, "status": "in_progress"}}),
            _sse("response.in_progress", {"type": "response.in_progress",
                                          "response": {"id": rid_tag, "status": "in_progress"}}),
        ]
        if kind == s.IN_STREAM_LIMIT:
            events.append(_sse("response.failed", {"type": "response.failed", "response": {
                "id": rid_tag, "status": "failed", "error": {
                    "code": "usage_limit_reached", "message": "limit", "resets_in_seconds": 120}}}))
            return self._stream_response(generation, 200, events, delay=plan.event_delay)
        if plan.rate_limits_event:
            events.append(_sse("codex.rate_limits", {"type": "codex.rate_limits", "rate_limits": {
                "primary": {"used_percent": 42.0, "window_minutes": 300,
                            "reset_at": int(self.wall()) + 3600}}}))
        events.append(_sse("response.output_text.delta",
                           {"type": "response.output_text.delta", "delta": "hello "}))
        tail: str | None = None
        match kind:
            case s.RESET_MID_STREAM:
                tail = "reset"
            case s.SILENCE_MID_STREAM:
                tail = "silence"
            case s.IN_STREAM_FAILED:
                events.append(_sse("response.failed", {"type": "response.failed", "response": {
                    "id": rid_tag, "status": "failed",
                    "error": {"code": "server_error", "message": "the model broke"}}}))
            case _:
                events.append(_sse("response.output_text.delta",
                                   {"type": "response.output_text.delta", "delta": "world"}))
                events.append(_sse("response.completed", {
                    "type": "response.completed", "response": {
                        "id": rid_tag, "status": "completed",
                        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}}))
                if kind == s.RESET_AFTER_COMPLETED:
                    tail = "reset"
        return self._stream_response(generation, 200, events, delay=plan.event_delay, tail=tail,
                                     headers={"x-codex-primary-used-percent": "12.5"})

    async def scheduler_call(self, request: httpx.Request, generation: int) -> httpx.Response:
        fault = self.scheduler_faults.pop(0) if self.scheduler_faults else None
        kind = fault.kind if fault else None
        gen = self.generations[generation]
        if kind in s.TRANSPORT_FAULTS:
            gen.failed = True
        match kind:
            case s.CONNECT_ERROR:
                raise httpx.ConnectError("connection refused", request=request)
            case s.RESET_BEFORE_HEADERS:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            case s.SILENCE:
                await trio.sleep_forever()
            case s.SLOW_HEADERS:
                if fault.delay >= HEDGE_AFTER:  # type: ignore[union-attr]
                    gen.late = True
                try:
                    await trio.sleep(fault.delay)  # type: ignore[union-attr]
                except trio.Cancelled:
                    gen.failed = True
                    raise
            case s.STATUS_401:
                return self._stream_response(generation, 401, [b'{"detail":"bad token"}'],
                                             json_body=True)
            case s.STATUS_5XX:
                return self._stream_response(generation, 503, [b"busy"], json_body=False)
        if request.url.path.endswith("/codex/models"):
            body: dict[str, Any] = {"models": [{"slug": "gpt-5-codex", "display_name": "GPT-5"}]}
        else:
            body = {"plan_type": "plus", "rate_limit": {"primary_window": {
                "used_percent": 10, "reset_at": int(self.wall()) + 3600,
                "limit_window_seconds": 18000}}}
        return self._stream_response(generation, 200, [json.dumps(body).encode()],
                                     json_body=True)

    def _stream_response(
        self, generation: int, status: int, chunks: list[bytes], *, json_body: bool = False,
        delay: float = 0.0, tail: str | None = None, headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        content_type = "application/json" if json_body else (
            "text/html" if status >= 400 else "text/event-stream")
        stream = SimStream(self, generation, chunks, delay=delay, tail=tail)
        stream.what = f"HTTP {status} {self._current_call} at t={self.now():.1f}s"
        return httpx.Response(status, headers={"content-type": content_type, **(headers or {})},
                              stream=stream)


    # --- the upstream's WebSocket side (replaces actors.proxy_websocket's opener) ----------

    @asynccontextmanager
    async def open_upstream_websocket(
        self, url: str, extra_headers: list[tuple[bytes, bytes]], *, connect_timeout: float,
        socket_options: Sequence[tuple[int, int, int]] = (),
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """An upstream socket over an in-memory stream, answered by ``_ws_server``."""
        headers = {k.decode().lower(): v.decode() for k, v in extra_headers}
        sid = headers.get(REQUEST_ID_HEADER, "")
        log = self.sessions.get(sid)
        if log is None:
            self.violate(f"an upstream WebSocket without a known session id {sid!r}")
            raise OSError(errno.ECONNREFUSED, "unknown session")
        attempt = log.upgrade_calls
        log.upgrade_calls += 1
        plan = log.plan
        kind = plan.upgrades[attempt] if attempt < len(plan.upgrades) else s.UPGRADE_ACCEPT
        if kind == s.UPGRADE_REFUSED:
            # The socket is opened under a lease on the backend's newest generation.
            backend = [g for g in self.generations.values() if AUTH_HOST not in g.hosts]
            if backend:
                backend[-1].failed = True
            raise OSError(errno.ECONNREFUSED, "connection refused")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        log.sockets_open += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_server, server_stream, sid, log, kind)
                try:
                    with trio.fail_after(connect_timeout):
                        connection = await trio_websocket.wrap_client_stream(
                            nursery, client_stream, UPSTREAM_HOST,  # type: ignore[arg-type]
                            "/backend-api/codex/responses", extra_headers=extra_headers,
                            message_queue_size=8)
                    try:
                        yield connection
                    finally:
                        with trio.move_on_after(2, shield=True):
                            await connection.aclose()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            log.sockets_open -= 1
            with trio.move_on_after(2, shield=True):
                await client_stream.aclose()

    def _turn_arrived(self, frame: str | bytes) -> str:
        """Count a turn reaching the upstream socket; a replay after its first byte is wrong."""
        try:
            metadata = json.loads(frame).get("client_metadata") or {}
            rid = str(metadata.get(REQUEST_ID_HEADER) or "")
        except (ValueError, AttributeError):
            rid = ""
        log = self.requests.setdefault(rid, RequestLog(s.RequestPlan(at=0.0)))
        if log.first_byte_seq is not None and self.tick() > log.first_byte_seq:
            self.violate(f"{rid}: turn sent upstream again after its first frame reached the "
                         "client")
        log.upstream_calls += 1
        return rid

    async def _ws_server(self, stream: Any, sid: str, log: SessionLog, kind: str) -> None:
        try:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(nursery, stream)
                if kind == s.UPGRADE_USE_HTTP:
                    await request.reject(426, body=b"upgrade not supported")
                    return
                if kind == s.UPGRADE_429:
                    limit = {"error": {"type": "usage_limit_reached", "message": "limit",
                                       "resets_in_seconds": 120}}
                    await request.reject(429, body=json.dumps(limit).encode(),
                                         extra_headers=[(b"content-type", b"application/json")])
                    return
                if kind == s.UPGRADE_5XX:
                    await request.reject(503, body=b"busy")
                    return
                socket = await request.accept()
                while True:
                    frame = await socket.get_message()
                    index = log.server_turns  # turns count per session, across its sockets
                    log.server_turns += 1
                    fault = log.plan.turns[index] if index < len(log.plan.turns) else s.TURN_OK
                    rid = self._turn_arrived(frame)
                    await socket.send_message(json.dumps({"type": "response.created",
                                                          "response": {"id": rid}}))
                    if fault == s.TURN_CLOSE_MID:
                        await socket.aclose()
                        return
                    if fault == s.TURN_SILENCE_MID:
                        await trio.sleep_forever()
                    await socket.send_message(json.dumps(
                        {"type": "response.output_text.delta", "delta": str(len(frame))}))
                    await socket.send_message(json.dumps({"type": "response.completed",
                                                          "response": {"id": rid}}))
                    if fault == s.TURN_CLOSE_AFTER:
                        await socket.aclose()
                        return
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                trio.ClosedResourceError):
            pass  # the proxy closed its side
        finally:
            with trio.move_on_after(2, shield=True):
                await stream.aclose()


class SimStream(httpx.AsyncByteStream):
    """A response body the fake controls chunk by chunk; knows whether it was closed."""

    def __init__(self, world: World, generation: int, chunks: list[bytes], *, delay: float,
                 tail: str | None) -> None:
        self.world = world
        self.generation = generation
        self.chunks = chunks
        self.delay = delay
        self.tail = tail
        self.closed = False
        self.what = ""
        world.generations[generation].open_streams += 1
        world.open_streams.add(self)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        gen = self.world.generations[self.generation]
        for chunk in self.chunks:
            if self.delay:
                await trio.sleep(self.delay)
            if gen.closed_at is not None:
                self.world.violate(f"a stream on {gen.label} read after its client was "
                                   "closed")
                raise httpx.ReadError("client closed")
            yield chunk
        if self.tail == "reset":
            raise httpx.ReadError("connection reset by peer")
        if self.tail == "silence":
            await trio.sleep_forever()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.world.generations[self.generation].open_streams -= 1
            self.world.open_streams.discard(self)


class SimTransport(httpx.AsyncBaseTransport):
    def __init__(self, world: World, generation: int) -> None:
        self.world = world
        self.generation = generation

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        world = self.world
        gen = world.generations[self.generation]
        if gen.closed_at is not None:
            world.violate(f"a request was sent on {gen.label} after its client was closed")
            raise RuntimeError("client closed")
        await request.aread()  # bodies may be streamed
        gen.hosts.add(request.url.host)
        world._current_call = f"{request.method} {request.url.path}"
        if request.url.host == AUTH_HOST and request.url.path == "/oauth/token":
            return await world.token_endpoint(request, self.generation)
        if request.url.host == UPSTREAM_HOST and request.url.path == "/backend-api/codex/responses":
            return await world.responses(request, self.generation)
        if request.url.host == UPSTREAM_HOST and request.url.path in (
                "/backend-api/codex/models", "/backend-api/wham/usage"):
            return await world.scheduler_call(request, self.generation)
        world.violate(f"an unexpected upstream call {request.method} {request.url}")
        return _json(404, {"error": {"code": "not_found"}})

    async def aclose(self) -> None:
        gen = self.world.generations[self.generation]
        if gen.closed_at is None:
            gen.closed_at = self.world.now()
            if gen.open_streams:
                self.world.violate(f"{gen.label} closed under {gen.open_streams} open "
                                   "stream(s)")


class SimClient(httpx.AsyncClient):
    """An AsyncClient that reports being used after close instead of only raising."""

    def __init__(self, world: World, generation: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sim_world = world
        self._sim_generation = generation

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        if self.is_closed:
            gen = self._sim_world.generations[self._sim_generation]
            self._sim_world.violate(f"a request used {gen.label}'s client after it was closed")
        return await super().send(request, **kwargs)


class FlakyStore:
    """The in-memory store, except that the n-th call of some methods raises StoreError."""

    def __init__(self, world: World) -> None:
        self.inner = InMemoryAccountStore()
        self.calls: Counter[str] = Counter()
        self.failures: dict[str, set[int]] = defaultdict(set)
        for fault in world.schedule.store:
            self.failures[fault.method].add(fault.nth)
        self.failed: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self.calls[name] in self.failures.get(name, ()):
                self.failed[name] += 1
                raise StoreError(f"simulated store failure in {name}: disk I/O error")
            return await target(*args, **kwargs)

        return call


def _json(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()
