"""The ProxyHandler actor: one client request → one upstream exchange, with failover.

``forward(request)`` answers an ``Exchange``: the upstream status and headers, and
for streams a receive channel of SSE events (small buffer: a slow client slows the
upstream read, never the other way round). Each request is a task in this actor's
nursery and holds one client lease for its whole life.

Before the first byte reaches the client a request may be retried:

* 429 / quota  → the account cools down until ``resets_at`` (or ``default_cooldown``);
  fail over to another account;
* 401          → forced token refresh, one retry on the same account, then fail over;
* 5xx          → fail over;
* transport failure before dispatch → ``rotate(seen_generation=lease.generation)`` and
  one retry on the same account, not held against it.

The first events of a 200 stream are held back until the upstream shows it is
really answering, so a ``response.failed`` carrying a rate-limit code fails over too.
After the first byte nothing is replayed: failures end the stream with a terminal
``response.failed`` that says what happened. A silent upstream ends the same way
(the lease's idle timeout), so a client never hangs.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, assert_never

import httpx
import trio
import trio_websocket

from actors import balancer
from actors import proxy_websocket as ws
from actors.accounts import Account, AccountStatus, AccountStore, StoreFailure, Usage
from actors.client_manager import ClientHandle, Lease
from actors.errors import (
    ActorUnavailable,
    AuthExpired,
    ClientError,
    CodexLBError,
    InvalidResponse,
    PermanentAuth,
    Phase,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TransportError,
    UnexpectedError,
    UpstreamError,
    classify,
)
from actors.hedge import Hedge
from actors.messages import FreshTokens, RotationReason, answer, call, close_inbox
from actors.proxy_websocket import WebSocketSession
from actors.request_record import RecordSink, RequestStats, Surface, client_label
from actors.token_refresher import TokenHandle
from actors.upstream import (
    TERMINAL_EVENT_TYPES,
    EventTooLarge,
    JsonContent,
    SSEEvent,
    SSEParser,
    SSEScanner,
    TextContent,
    classify_response,
    classify_stream_error_event,
    decode_event,
    encode_sse,
    failed_event,
    merge_usage,
    upstream_headers,
    usage_from_headers,
    usage_from_rate_limits_event,
)
from actors.usage_writer import UsageWriter
from actors.ws_session import (
    LinkOpenFailed,
    SessionEvent,
    SessionHooks,
    SessionRelay,
    UpstreamLink,
    pump_client,
    serve_link,
)

log = logging.getLogger("codex_lb_trio.proxy")

INBOX_SIZE = 256
USAGE_FLUSH_BOUND = 5.0  # shielded ceiling on writing pending usage when the actor stops
CHUNK_BUFFER = 8  # chunks queued towards the client before the upstream read waits
HOLD_EVENTS = 8  # at most this many opening events are held back before committing
MAX_ERROR_BODY = 1024 * 1024
PREAMBLE_TYPES = frozenset({"response.created", "response.in_progress"})
NEEDS_JSON = frozenset({"codex.rate_limits", *TERMINAL_EVENT_TYPES})  # all others pass unread
DRAIN_AFTER_TERMINAL = 5.0  # seconds to read (and drop) what follows a terminal event
TOKEN_REUSE = 60.0  # seconds a token the refresher answered is reused without asking again
RESPONSE_HEADER_DROP = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive",
     "set-cookie", "date", "server", "alt-svc", "strict-transport-security"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    base_url: str = "https://chatgpt.com/backend-api"
    connect_timeout: float = 8.0
    idle_timeout: float = 240.0
    max_attempts: int = 4
    default_cooldown: float = 60.0
    sticky: bool = True
    token_margin: float = 600.0  # the refresher's: a token this close to expiry is due

    @classmethod
    def from_config(cls, config: Any) -> ProxySettings:
        return cls(
            base_url=config.upstream.base_url,
            connect_timeout=config.upstream.connect_timeout,
            idle_timeout=config.upstream.stream_idle_timeout,
            max_attempts=config.routing.max_attempts,
            default_cooldown=config.routing.default_cooldown,
            sticky=config.routing.sticky,
            token_margin=config.refresh.token_margin,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyRequest:
    """What a route hands the proxy: an upstream path under base_url and its payload.

    ``body`` is the parsed JSON, for reading; ``raw_body``, when given, is the JSON text the
    client sent for that same body, and goes upstream as it came (no re-serialising).
    """

    path: str
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    body: dict[str, Any] | None = None
    raw_body: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    stream: bool = True
    sticky_key: str | None = None
    # A raw body streamed as it comes (an upload), sent instead of ``body``. It can be sent
    # once: an attempt after it was consumed fails with the iterable's own error.
    content: AsyncIterable[bytes] | None = None
    header_timeout: float | None = None  # None: the streamed-call default (compact: longer)
    surface: str = ""  # for the request log; "" derives it from the path


@dataclass(slots=True, kw_only=True)
class Exchange:
    """The answer to ``forward``. For streams, the caller must close ``events``."""

    status: int
    headers: dict[str, str]
    account_id: str
    events: EventStream | None = None
    body: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    request: ProxyRequest
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenWebSocket:
    request: ProxyRequest
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class GetProxyStats:
    reply: trio.MemorySendChannel[Any]


ProxyMessage = Forward | OpenWebSocket | GetProxyStats


@dataclass(slots=True)
class _Attempt:
    """Bookkeeping for one request's attempts."""

    tried: set[str] = field(default_factory=set)
    retry_same: str | None = None
    refreshed: set[str] = field(default_factory=set)
    transport_retried: set[str] = field(default_factory=set)
    last_error: CodexLBError | None = None
    # The access token each account's last attempt sent: a 401 names it as the stale one.
    used_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    stats: RequestStats | None = None  # what the request log will get
    # The store's view of each account when it was picked (to check a reused token against).
    listed: dict[str, Account] = field(default_factory=dict, repr=False)


class _Failover(Exception):
    """An attempt failed before the first byte; try again (maybe elsewhere)."""


class ProxyHandle:
    def __init__(self, inbox: trio.MemorySendChannel[ProxyMessage]) -> None:
        self._inbox = inbox

    async def forward(self, request: ProxyRequest, *, timeout: float = 300.0) -> Exchange:
        """Start the upstream exchange; returns once it is committed or has failed."""
        result: Exchange = await call(
            self._inbox, lambda r: Forward(request=request, reply=r), actor="proxy handler",
            timeout=timeout, on_abandoned=_close_abandoned,
        )
        return result

    async def open_websocket(self, request: ProxyRequest, *, timeout: float = 120.0) -> WebSocketSession:
        """Open a relayed Responses WebSocket session (see actors/proxy_websocket.py)."""
        result: WebSocketSession = await call(
            self._inbox, lambda r: OpenWebSocket(request=request, reply=r), actor="proxy handler",
            timeout=timeout, on_abandoned=_close_abandoned,
        )
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await call(
            self._inbox, lambda r: GetProxyStats(reply=r), actor="proxy handler", timeout=10
        )
        return result


def _close_abandoned(value: Any) -> None:
    if isinstance(value, Exchange) and value.events is not None:
        value.events.close()
    if isinstance(value, WebSocketSession):
        value.to_upstream.close()
        value.from_upstream.close()


class ProxyHandler:
    def __init__(
        self,
        *,
        store: AccountStore,
        clients: ClientHandle,
        tokens: TokenHandle,
        settings: ProxySettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_record: RecordSink | None = None,
    ) -> None:
        self._store = store
        self._on_record = on_record  # sync, non-blocking: one RequestRecord per request
        self._clients = clients
        self._tokens = tokens
        self.settings = settings or ProxySettings()
        self._wall_clock = wall_clock
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[ProxyMessage](INBOX_SIZE)
        self._in_flight: Counter[str] = Counter()
        self._sticky = balancer.StickyTable()
        self.counters: Counter[str] = Counter()
        # Faults caught at a request task's boundary, by kind (see FAULT_KINDS).
        self.faults: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self.usage = UsageWriter(store, merge_usage)
        # Tokens the refresher answered, reused until (wall clock) the time beside them.
        self._token_reuse: dict[str, tuple[FreshTokens, float]] = {}

    def close(self) -> None:
        """The actor is gone for good: queued and later requests fail at once."""
        close_inbox(self._inbox_recv)

    def handle(self) -> ProxyHandle:
        return ProxyHandle(self._inbox_send.clone())

    async def run(self, *, task_status: trio.TaskStatus[ProxyHandle] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as writer:
            writer.start_soon(self.usage.run)
            try:
                await self._serve_inbox(task_status)
            finally:
                # Requests are done (or cancelled): write the usage they left, bounded.
                writer.cancel_scope.cancel()
                with trio.move_on_after(USAGE_FLUSH_BOUND, shield=True):
                    await self.usage.flush()

    async def _serve_inbox(self, task_status: trio.TaskStatus[ProxyHandle]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.handle())
            async for message in self._inbox_recv:
                match message:
                    case Forward():
                        nursery.start_soon(self._serve, message)
                    case OpenWebSocket():
                        nursery.start_soon(self._task_boundary, "websocket", message.reply,
                                           partial(self._serve_websocket, message))
                    case GetProxyStats():
                        with message.reply:
                            answer(message.reply, {
                                "in_flight": dict(+self._in_flight),
                                "counters": dict(self.counters),
                                "request_faults": dict(self.faults),
                                "usage_batches": self.usage.batches,
                                "usage_write_failures": self.usage.failures,
                                "sticky_sessions": len(self._sticky),
                            })
                    case _:
                        assert_never(message)

    # --- one request ----------------------------------------------------------------

    async def _task_boundary(
        self, kind: str, reply: trio.MemorySendChannel[Any], work: Callable[[], Awaitable[object]],
        stats: RequestStats | None = None,
    ) -> None:
        """Run one request task so that no exception of it reaches the actor's nursery.

        A fault stays in its request: whatever ``work`` raises (a bad header byte, a store
        error, a bug) becomes this request's own answer, an error in OpenAI's shape with a
        request id, if nothing was answered yet; a stream already handed over ends with its
        own terminal event (the relay guarantees one). Either way the fault is logged once
        and counted in ``faults`` (shown on /metrics). Cancellation passes through.
        """
        request_id = stats.request_id if stats is not None else "req_" + secrets.token_hex(6)
        # Our own clone: the work may close its end of the reply before it raises.
        with reply.clone() as keep:
            try:
                await work()
            except* Exception as exc:  # Cancelled (alone or beside these) passes through
                err, fault = fault_answer(exc, request_id)
                self.faults[fault] += 1
                if stats is not None and not stats.terminal:
                    stats.status, stats.error_code = err.http_status, err.code
                answered = answer(keep, err)
                if fault == "internal":
                    log.error("request %s (%s) failed: %s answered=%s", request_id, kind,
                              err.message, answered, exc_info=exc)
                else:
                    log.warning("request %s (%s) failed (%s): %s answered=%s", request_id, kind,
                                fault, err.message, answered)
            finally:
                if stats is not None:
                    self._emit(stats)  # the request log's row, however the request ended

    async def _serve(self, message: Forward) -> None:
        stats = self._new_stats(message.request)
        await self._task_boundary("http", message.reply,
                                  partial(self._serve_http, message, stats), stats=stats)

    async def _serve_http(self, message: Forward, stats: RequestStats) -> None:
        request, reply = message.request, message.reply
        with reply:
            await self._with_failover(
                request, reply,
                lambda account_id, attempt: self._attempt(request, account_id, attempt, reply),
                stats=stats,
            )

    def _new_stats(self, request: ProxyRequest) -> RequestStats:
        body = request.body or {}
        return RequestStats(
            surface=request.surface or _surface_for(request.path), started_wall=self._wall_clock(),
            started=trio.current_time(), model=str(body.get("model") or ""),
            client=client_label(dict(request.headers).get("session-id") or request.sticky_key))

    def _turn_stats(self, request: ProxyRequest, raw: str) -> RequestStats | None:
        """Stats for one turn over an upstream WebSocket (None when nothing logs)."""
        if self._on_record is None:
            return None
        stats = self._new_stats(request)
        stats.surface, stats.status, stats.attempts = Surface.CODEX_WEBSOCKET, 101, 1
        # The relay never parses a turn's body; the model is read off its text, best effort.
        model = _MODEL_FIELD.search(raw, 0, 4096)
        stats.model = model.group(1) if model else ""
        return stats

    def _emit(self, stats: RequestStats) -> None:
        """Hand the finished request to the log sink; a sink's fault never reaches a request."""
        if self._on_record is None:
            return
        try:
            self._on_record(stats.record(trio.current_time()))
        except Exception as exc:
            log.warning("request log sink failed request_id=%s: %s", stats.request_id, exc)

    async def _with_failover(
        self, request: ProxyRequest, reply: trio.MemorySendChannel[Any],
        try_account: Callable[[str, _Attempt], Awaitable[Any]],
        stats: RequestStats | None = None,
    ) -> Any:
        """Run ``try_account`` on chosen accounts until one attempt does not fail over.

        Returns that attempt's result; or answers the caller with the final error and
        returns None.
        """
        attempt = _Attempt(stats=stats)
        for _ in range(self.settings.max_attempts + 1):  # +1: the rotation retry is free
            try:
                account_id = await self._pick(request, attempt)
            except CodexLBError as exc:
                answer(reply, _noted(attempt, attempt.last_error if _prefer_last(attempt, exc)
                                     else exc))
                return None
            self._in_flight[account_id] += 1
            if stats is not None:
                stats.account_id = account_id
                stats.attempts += 1
            try:
                result = await try_account(account_id, attempt)
                return True if result is None else result
            except _Failover:
                self.counters["failovers"] += 1
                if stats is not None:
                    stats.failovers += 1
            except CodexLBError as exc:
                answer(reply, _noted(attempt, exc))
                return None
            finally:
                self._in_flight[account_id] -= 1
        answer(reply, _noted(attempt, attempt.last_error or ServerError(
            "no upstream attempt succeeded", status=502, code="upstream_unavailable")))
        return None

    async def _pick(self, request: ProxyRequest, attempt: _Attempt) -> str:
        if attempt.retry_same is not None:
            account_id, attempt.retry_same = attempt.retry_same, None
            return account_id
        # A store failure here is this request's 503, answered at its task boundary.
        accounts = await self._store.list_accounts()
        sticky_id = self._sticky.get(request.sticky_key) if request.sticky_key else None
        try:
            choice = balancer.choose(
                accounts, now=self._wall_clock(), in_flight=self._in_flight,
                sticky_account_id=sticky_id, exclude=attempt.tried,
            )
        except balancer.NoAccounts:
            raise ActorUnavailable(
                "no accounts in the pool: add one with `codex-lb-trio accounts import` "
                "(or `accounts login`)"
            ) from None
        except balancer.AllCoolingDown as exc:
            raise RateLimited(
                "All pooled accounts have reached their usage limit.", status=429,
                code="usage_limit_reached", resets_at=exc.resets_at,
            ) from None
        except balancer.NoEligibleAccounts as exc:
            raise ActorUnavailable(f"no usable account: {exc}") from None
        if self.settings.sticky and request.sticky_key:
            self._sticky.set(request.sticky_key, choice.account.id)
        attempt.listed[choice.account.id] = choice.account
        return choice.account.id

    async def _attempt(
        self, request: ProxyRequest, account_id: str, attempt: _Attempt,
        reply: trio.MemorySendChannel[Any],
    ) -> None:
        fresh = await self._fresh_tokens(account_id, attempt)
        content = await _content(request)
        async with self._clients.lease() as lease, Hedge(self._clients, lease) as hedge:
            def build(held: Lease) -> httpx.Request:
                return held.client.build_request(
                    request.method,
                    self.settings.base_url.rstrip("/") + request.path,
                    params=list(request.query) or None,
                    headers=upstream_headers(
                        request.headers, access_token=fresh.tokens.access_token,
                        chatgpt_account_id=fresh.account.chatgpt_account_id,
                    ) | (content.headers if content is not None else {}),
                    # JSON and text content are re-iterable (a hedge sends them again); an
                    # upload is not.
                    content=request.content if request.content is not None else content,
                )
            try:  # a streamed call whose headers are late gets one hedge (actors/hedge.py)
                response = await hedge.send(build, header_timeout=request.header_timeout,
                                            hedge=request.stream and request.content is None)
            except TransportError as exc:
                await self._on_transport(exc, lease, account_id, attempt)
                raise _Failover from None
            lease = hedge.lease  # the winner's
            if attempt.stats is not None:
                attempt.stats.generation = lease.generation
            try:
                now = self._wall_clock()
                usage = usage_from_headers(response.headers, now)
                if usage is not None:  # advisory: never on the path to the first byte
                    self._note_usage(account_id, usage)
                if response.status_code >= 400:
                    await self._on_status(response, account_id, attempt, lease)
                    raise AssertionError("unreachable")  # _on_status always raises
                headers = {k: v for k, v in response.headers.items()
                           if k.lower() not in RESPONSE_HEADER_DROP}
                if not request.stream:
                    body = await _read_bounded(response, lease)
                    if attempt.stats is not None:
                        attempt.stats.status = response.status_code
                        attempt.stats.mark_first_event(trio.current_time())
                    answer(reply, Exchange(status=response.status_code, headers=headers,
                                           account_id=account_id, body=body))
                    return
                outcome = await self._relay(response, lease, account_id, attempt, headers, reply)
                if attempt.stats is not None:
                    _note_outcome(attempt.stats, outcome)
            finally:
                await response.aclose()

    async def _fresh_tokens(self, account_id: str, attempt: _Attempt) -> FreshTokens:
        """The account's tokens, or fail over: whatever went wrong (a dead login, an account
        removed meanwhile, a refresher that is restarting) is this account's problem only.

        A token the refresher answered is reused for a while without asking it again (one
        actor round trip less on the way to the upstream), see ``_reusable``.
        """
        fresh = self._reusable(account_id, attempt.listed.get(account_id))
        if fresh is not None:
            attempt.used_tokens[account_id] = fresh.tokens.access_token
            return fresh
        try:
            fresh = await self._tokens.ensure_fresh(account_id)
        except CodexLBError as exc:
            self._token_reuse.pop(account_id, None)
            attempt.tried.add(account_id)
            attempt.last_error = exc
            log.info("proxy account=%s no usable token (%s): failing over", account_id, exc.message)
            raise _Failover from None
        attempt.used_tokens[account_id] = fresh.tokens.access_token
        self._remember_tokens(fresh)
        return fresh

    def _remember_tokens(self, fresh: FreshTokens) -> None:
        now = self._wall_clock()
        until = now + TOKEN_REUSE
        expires = fresh.account.access_expires_at
        if expires is not None:
            until = min(until, expires - self.settings.token_margin)
        if until > now:
            self._token_reuse[fresh.account.id] = (fresh, until)
        else:
            self._token_reuse.pop(fresh.account.id, None)

    def _reusable(self, account_id: str, listed: Account | None) -> FreshTokens | None:
        """The tokens the refresher last answered for the account, if they may be sent again.

        Only while they are not yet due for a refresh (``token_margin`` before expiry) and at
        most TOKEN_REUSE seconds; only if the store (as listed when the account was picked)
        holds no newer triple (a login or a refresh saved since) and the account may be used.
        A 401 or a refresher failure forgets them: the next attempt asks the refresher.
        """
        entry = self._token_reuse.get(account_id)
        if entry is None or listed is None:
            return None
        fresh, until = entry
        if (self._wall_clock() >= until
                or listed.token_version > fresh.account.token_version
                or listed.status in (AccountStatus.REAUTH_REQUIRED, AccountStatus.DEACTIVATED)):
            del self._token_reuse[account_id]
            return None
        return fresh

    async def _on_transport(
        self, exc: TransportError, lease: Lease, account_id: str, attempt: _Attempt
    ) -> None:
        attempt.last_error = exc
        self.counters["transport_errors"] += 1
        if exc.pre_dispatch and account_id not in attempt.transport_retried:
            attempt.transport_retried.add(account_id)
            attempt.retry_same = account_id  # not held against the account
            new = await self._clients.rotate(
                seen_generation=lease.generation, reason=RotationReason.TRANSPORT,
                path_dead=exc.path_dead, phase=exc.phase,
            )
            log.info("proxy account=%s error=transport (%s) rotated generation=%d->%d retry=same",
                     account_id, exc.message, lease.generation, new)
        else:
            attempt.tried.add(account_id)
            log.info("proxy account=%s error=transport (%s) generation=%d: failing over",
                     account_id, exc.message, lease.generation)

    async def _on_status(
        self, response: httpx.Response, account_id: str, attempt: _Attempt, lease: Lease
    ) -> None:
        raw = await _read_bounded(response, lease)
        now = self._wall_clock()
        failure = classify_response(response.status_code, raw, response.headers, now)
        assert failure is not None
        if failure.kind == "client":
            # The request itself is wrong: failing over would fail the same way.
            raise PassThrough(response.status_code, raw, response.headers.get("content-type"))
        await self._on_failure(failure, account_id, attempt)

    async def _on_failure(self, failure: Any, account_id: str, attempt: _Attempt) -> None:
        """Act on a pre-commit upstream failure and raise _Failover (or the final error)."""
        now = self._wall_clock()
        kind, code, message = failure.kind, failure.code, failure.message
        status = failure.status
        if kind in ("rate_limited", "quota"):
            until = failure.resets_at or now + self.settings.default_cooldown
            try:
                await self._store.set_cooldown(account_id, until)
            except (StoreFailure, LookupError) as exc:  # the failover goes on without it
                log.warning("proxy account=%s cooldown not saved: %s", account_id, exc)
            self._sticky.forget_account(account_id)
            if attempt.stats is not None:
                attempt.stats.cooldowns.append(account_id)
            attempt.tried.add(account_id)
            cls = RateLimited if kind == "rate_limited" else QuotaExceeded
            attempt.last_error = (RateLimited(message, status=429, code=code, resets_at=until)
                                  if cls is RateLimited else QuotaExceeded(message, status=status, code=code))
            self.counters["rate_limited"] += 1
            log.info("proxy account=%s error=%s cooling_down_for=%.0fs: failing over",
                     account_id, code, until - now)
        elif kind == "auth":
            self._token_reuse.pop(account_id, None)
            attempt.last_error = AuthExpired(message, status=401, code=code)
            if account_id in attempt.refreshed:
                attempt.tried.add(account_id)
                log.info("proxy account=%s error=401 after a refresh: failing over", account_id)
            else:
                attempt.refreshed.add(account_id)
                try:
                    await self._tokens.ensure_fresh(
                        account_id, force=True,
                        rejected_access_token=attempt.used_tokens.get(account_id))
                    attempt.retry_same = account_id
                    log.info("proxy account=%s error=401: refreshed, retrying", account_id)
                except CodexLBError as exc:
                    attempt.tried.add(account_id)
                    attempt.last_error = exc
        elif kind == "permanent_auth":
            self._token_reuse.pop(account_id, None)
            attempt.tried.add(account_id)
            attempt.last_error = PermanentAuth(message, status=status, code=code)
        else:  # server
            attempt.tried.add(account_id)
            attempt.last_error = ServerError(message, status=status, code=code)
            self.counters["server_errors"] += 1
            log.info("proxy account=%s error=%s status=%d: failing over", account_id, code, status)
        raise _Failover

    def _note_usage(self, account_id: str, usage: Usage) -> None:
        """Record a live usage reading without waiting (never on the path to a byte).

        The reading is coalesced with others of the same account and written by the
        usage writer in one transaction per interval; it outlives the request (and is
        flushed when the actor stops). The merge with the stored reading happens in one
        place, inside the store's write.
        """
        self.usage.note(account_id, usage)

    # --- websocket sessions ------------------------------------------------------------

    async def _serve_websocket(self, message: OpenWebSocket) -> None:
        """One client session: its upstream sockets live in this task's nursery."""
        request, reply = message.request, message.reply
        in_send, in_recv = trio.open_memory_channel[str | bytes](ws.FRAME_BUFFER)
        out_send, out_recv = trio.open_memory_channel[str](ws.FRAME_BUFFER)
        events_send, events_recv = trio.open_memory_channel[SessionEvent](ws.FRAME_BUFFER)
        with reply, in_recv, out_send, events_send, events_recv:
            session = ws.WebSocketSession(to_upstream=in_send, from_upstream=out_recv,
                                          account_id="", mode="websocket")
            async with trio.open_nursery() as links:

                async def try_account(account_id: str, attempt: _Attempt) -> Any:
                    link = await self._websocket_attempt(request, account_id, attempt, links,
                                                         events_send)
                    return "use-http" if link is None else link

                stats = self._new_stats(request)
                stats.surface = Surface.CODEX_WEBSOCKET
                first = await self._with_failover(request, reply, try_account, stats=stats)
                if first is None:
                    self._emit(stats)  # the session never opened (turns log themselves)
                    links.cancel_scope.cancel()
                    return
                if first == "use-http":
                    # The upstream does not speak websockets: serve the turns over HTTP SSE.
                    self.counters["websocket_http_fallbacks"] += 1
                    session.mode = "http"
                    relay = ws.TurnRelay(client_in=in_recv, client_out=out_send,
                                         http_turn=lambda body: self._http_turn(request, body))
                    if answer(reply, session):
                        try:
                            await relay.relay_http()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # the client left
                    return
                link: UpstreamLink = first
                session.account_id = link.account_id
                session.headers = {k: v for k, v in link.headers.items()
                                   if k in ws.FORWARDED_UPGRADE_HEADERS}
                hooks = SessionHooks(
                    reconnect=lambda account_id: self._reconnect_websocket(
                        request, account_id, links, events_send),
                    fail_over=lambda tried: self._fail_over_websocket(
                        request, tried, links, events_send),
                    cool_down=self._cool_down_from_stream, note_usage=self._note_usage,
                    wall_clock=self._wall_clock, max_failovers=self.settings.max_attempts,
                    turn_started=lambda raw: self._turn_stats(request, raw),
                    turn_done=self._emit,
                )
                session_relay = SessionRelay(link=link, events=events_recv, client_out=out_send,
                                                hooks=hooks)
                try:
                    if answer(reply, session):
                        links.start_soon(pump_client, in_recv.clone(), events_send.clone())
                        await session_relay.run()
                except Exception as exc:
                    # A fault stays in its session: the client hears of it, the actor does not.
                    self.counters["websocket_session_errors"] += 1
                    log.exception("websocket session account=%s failed", session_relay.account_id)
                    with trio.move_on_after(1):
                        try:
                            await out_send.send(ws.error_frame(
                                500, "internal_error",
                                f"proxy session failed: {type(exc).__name__}"))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                finally:
                    self.counters.update({f"websocket_{name}": count
                                          for name, count in session_relay.counters.items()})
                    links.cancel_scope.cancel()

    async def _websocket_attempt(
        self, request: ProxyRequest, account_id: str, attempt: _Attempt,
        links: trio.Nursery, events_send: trio.MemorySendChannel[SessionEvent],
    ) -> UpstreamLink | None:
        """One upstream socket on ``account_id``. None: the upstream wants HTTP instead."""
        fresh = await self._fresh_tokens(account_id, attempt)
        headers = ws.handshake_headers(request.headers, fresh.tokens.access_token,
                                       fresh.account.chatgpt_account_id)
        url = ws.websocket_url(self.settings.base_url, request.path)
        try:
            link: UpstreamLink = await links.start(
                self._hold_websocket, account_id, url, ws.handshake_extra(headers), events_send)
        except LinkOpenFailed as failed:
            leaf, lease = failed.error, failed.lease
            if isinstance(leaf, trio_websocket.ConnectionRejected):
                if leaf.status_code in ws.USE_HTTP_STATUSES:
                    return None
                failure = ws.refused_failure(leaf, self._wall_clock())
                if failure is None:  # an odd 2xx/3xx instead of 101: the path is unusable
                    attempt.tried.add(account_id)
                    attempt.last_error = ServerError(
                        f"upstream answered the upgrade with HTTP {leaf.status_code}",
                        status=502, code="bad_upgrade")
                    raise _Failover from None
                if failure.kind == "client":
                    raise PassThrough(leaf.status_code or 400, leaf.body or b"", None) from None
                await self._on_failure(failure, account_id, attempt)
            err = classify(leaf, phase=Phase.CONNECT, generation=lease.generation)
            if isinstance(err, TransportError):
                await self._on_transport(err, lease, account_id, attempt)
                raise _Failover from None
            raise err from None
        self.counters["websocket_sessions" if not attempt.tried else "websocket_sockets"] += 1
        usage = usage_from_headers(link.headers, self._wall_clock())
        if usage is not None:  # the upgrade answer carries the x-codex-* headers too
            self._note_usage(account_id, usage)
        return link

    async def _hold_websocket(
        self, account_id: str, url: str, extra: list[tuple[bytes, bytes]],
        events_send: trio.MemorySendChannel[SessionEvent],
        *, task_status: trio.TaskStatus[UpstreamLink] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One upstream socket under its own lease, counted in flight while it lives."""
        async with self._clients.lease() as lease:
            self._in_flight[account_id] += 1
            try:
                await serve_link(account_id=account_id, url=url, extra_headers=extra,
                                    connect_timeout=self.settings.connect_timeout, lease=lease,
                                    events=events_send, task_status=task_status)
            finally:
                self._in_flight[account_id] -= 1

    async def _reconnect_websocket(
        self, request: ProxyRequest, account_id: str, links: trio.Nursery,
        events_send: trio.MemorySendChannel[SessionEvent],
    ) -> UpstreamLink:
        """A fresh socket on the same account (its turns may name its previous responses).

        The usual retries apply (a forced refresh after a 401, one rotation after a
        transport failure), but never another account: raises the error that stopped it.
        """
        attempt = _Attempt()
        for _ in range(3):
            try:
                link = await self._websocket_attempt(request, account_id, attempt, links,
                                                     events_send)
            except _Failover:
                if attempt.retry_same == account_id:
                    attempt.retry_same = None
                    continue
                break
            if link is None:
                raise ServerError("the upstream no longer accepts websockets", status=502,
                                  code="websocket_refused")
            return link
        raise attempt.last_error or ServerError("no fresh upstream socket", status=502,
                                                code="upstream_unavailable")

    async def _fail_over_websocket(
        self, request: ProxyRequest, tried: set[str], links: trio.Nursery,
        events_send: trio.MemorySendChannel[SessionEvent],
    ) -> UpstreamLink:
        """A socket on another account for a turn that failed before its first event."""
        reply_send, reply_recv = trio.open_memory_channel[Any](1)

        async def try_account(account_id: str, attempt: _Attempt) -> Any:
            attempt.tried.update(tried)
            if account_id in tried:
                raise _Failover  # picked before the exclusions were known
            link = await self._websocket_attempt(request, account_id, attempt, links, events_send)
            if link is None:
                attempt.tried.add(account_id)
                attempt.last_error = ServerError("the upstream refused the websocket",
                                                 status=502, code="websocket_refused")
                raise _Failover
            return link

        picker = ProxyRequest(path=request.path, headers=request.headers)  # no stickiness
        with reply_send, reply_recv:
            result = await self._with_failover(picker, reply_send, try_account)
            if isinstance(result, UpstreamLink):
                return result
            try:
                error = reply_recv.receive_nowait()
            except trio.WouldBlock:
                error = None
        raise error if isinstance(error, CodexLBError) else ServerError(
            "no other account could take the turn", status=502, code="upstream_unavailable")

    async def _cool_down_from_stream(self, account_id: str, failure: Any) -> None:
        """An in-turn usage-limit failure: the account rests until ``resets_at``."""
        until = failure.resets_at or self._wall_clock() + self.settings.default_cooldown
        try:
            await self._store.set_cooldown(account_id, until)
        except Exception as exc:  # advisory; the turn goes on
            log.info("cooldown account=%s not stored: %s", account_id, exc)
            return
        self._sticky.forget_account(account_id)
        self.counters["rate_limited"] += 1
        log.info("stream account=%s error=%s cooling_down_for=%.0fs", account_id,
                 failure.code, until - self._wall_clock())

    async def _http_turn(self, request: ProxyRequest, body: dict[str, Any]) -> Exchange:
        """One fallback turn, served like any POST /codex/responses."""
        reply_send, reply_recv = trio.open_memory_channel[Any](1)
        turn = ProxyRequest(path=request.path, headers=request.headers, body=body,
                            sticky_key=request.sticky_key, surface=Surface.CODEX_WEBSOCKET)
        self._nursery.start_soon(self._serve, Forward(request=turn, reply=reply_send))
        with reply_recv:
            try:
                result = await reply_recv.receive()
            except trio.EndOfChannel:
                raise ActorUnavailable("the proxy handler stopped during the turn") from None
        if isinstance(result, CodexLBError):
            raise result
        return result

    # --- streaming ---------------------------------------------------------------------

    async def _relay(
        self, response: httpx.Response, lease: Lease, account_id: str, attempt: _Attempt,
        headers: dict[str, str], reply: trio.MemorySendChannel[Any],
    ) -> StreamOutcome:
        """Pass a 200 stream's bytes to the client; answers what the stream did.

        ``lease.pump`` reads the body (its deadlines end silent streams) straight into a
        ``_StreamRelay``, which scans each chunk and forwards it whole: one channel hop and
        one client write per upstream read. Before the commit the bytes are held back.
        """
        out_send, out_recv = trio.open_memory_channel[bytes](CHUNK_BUFFER)
        with out_send:
            sink = _StreamRelay(self, account_id, out_send, commit=lambda: self._commit(
                reply, headers, account_id, out_recv, on_close=sink.client_left))
            errors: list[CodexLBError] = []
            with sink.stop:
                try:
                    await lease.pump(response, sink)  # type: ignore[arg-type]  # has send()
                except Exception as exc:  # any fault ends this stream, never the actor
                    errors.append(classify(exc, phase=Phase.BODY, generation=lease.generation))
            return await self._end_stream(sink, errors, lease, account_id, attempt)

    async def _end_stream(
        self, sink: _StreamRelay, errors: list[CodexLBError], lease: Lease, account_id: str,
        attempt: _Attempt,
    ) -> StreamOutcome:
        """After the pump: fail over, commit what was held, or end the stream properly."""
        outcome = sink.outcome
        if sink.client_gone:
            self.counters["client_disconnects"] += 1
            return outcome  # the client went away; the lease and response close behind us
        if sink.early_failure is not None:
            await self._on_failure(sink.early_failure, account_id, attempt)
        if sink.error is not None:
            errors.append(sink.error)
        if sink.bug is not None:  # our own bug: this stream ends, with its terminal event
            self.faults["internal"] += 1
            log.error("proxy account=%s relay failed generation=%d", account_id,
                      lease.generation, exc_info=sink.bug)
            errors.append(UnexpectedError(f"internal error: {type(sink.bug).__name__}"))
        if outcome.terminal is not None:
            if errors:  # the stream was complete: what broke after it is not the client's
                log.debug("proxy account=%s after the terminal event: %s", account_id, errors[0])
            return outcome
        if not sink.committed:
            if errors or not outcome.events:
                attempt.last_error = errors[0] if errors else InvalidResponse(
                    "upstream stream ended before any event")
                attempt.tried.add(account_id)
                raise _Failover
            sink.commit_now()
            await sink.send_held()
        err = errors[0] if errors else None
        code = "upstream_connection_lost" if isinstance(err, TransportError) else "upstream_error"
        text = err.message if err else "upstream stream ended without a terminal event"
        self.counters["streams_failed"] += 1
        log.info("proxy account=%s stream ended early generation=%d: %s",
                 account_id, lease.generation, text)
        await sink.send_quietly(encode_sse(
            "response.failed", failed_event(code, f"upstream stream failed: {text}")))
        outcome.terminal, outcome.error_code = "response.failed", code
        outcome.ended_at = trio.current_time()
        return outcome

    def _commit(
        self, reply: trio.MemorySendChannel[Any], headers: dict[str, str], account_id: str,
        chunks_recv: trio.MemoryReceiveChannel[bytes], *, on_close: Callable[[], None],
    ) -> None:
        self.counters["streams"] += 1
        events = EventStream(chunks_recv, on_close=on_close)
        if not answer(reply, Exchange(status=200, headers=headers, account_id=account_id,
                                      events=events)):
            events.close()  # the caller gave up before we answered


@dataclass(slots=True)
class StreamOutcome:
    """What one relayed stream did: for logs, and the request log's terminal usage."""

    events: int = 0
    first_byte_at: float | None = None  # trio clock: the first bytes went to the client
    terminal: str | None = None  # the terminal event's type, ours included
    usage: dict[str, Any] | None = None  # the terminal response's ``usage``, if it had one
    error_code: str = ""  # the terminal event's error code, ours included
    ended_at: float | None = None  # trio clock: the client's stream was complete


class _StreamRelay:
    """The sink ``Lease.pump`` writes upstream chunks into (it only calls ``send``).

    Each chunk is scanned (SSEScanner) for whole events and their types; JSON is decoded
    only for the types the proxy reads (NEEDS_JSON). Until the commit, events are held
    back, so that a rate-limit ``response.failed`` can still fail over; a non-preamble
    event (or HOLD_EVENTS of them) commits. Nothing follows a terminal event: its chunk is
    cut after it, the client's stream ends, and the rest of the body is read and dropped
    (at most DRAIN_AFTER_TERMINAL) so that the upstream connection stays reusable.
    Stopping early (a failure to fail over on, a broken event, the client gone) cancels
    ``stop``, which ends the pump.
    """

    def __init__(self, handler: ProxyHandler, account_id: str,
                 out_send: trio.MemorySendChannel[bytes], *, commit: Callable[[], None]) -> None:
        self._handler = handler
        self._account_id = account_id
        self._out_send = out_send
        self.stop = self._stop = trio.CancelScope()
        self._commit = commit
        self._scanner = SSEScanner()
        self.outcome = StreamOutcome()
        self.held: list[bytes] = []
        self.committed = False
        self.client_gone = False
        self.early_failure: Any = None
        self.late_failure: Any = None  # a usage-limit failure after the commit: cool down
        self.error: CodexLBError | None = None
        self.bug: Exception | None = None

    def commit_now(self) -> None:
        self.committed = True
        self._commit()

    def client_left(self) -> None:
        """The client closed its stream: stop now, not when the next upstream chunk comes
        (under a silent upstream that would be the idle timeout, lease held all along)."""
        if self.outcome.terminal is None:  # after it, the drain keeps the connection
            self.client_gone = True
            self._stop.cancel()

    async def send_held(self) -> None:
        held, self.held = b"".join(self.held), []
        await self.send_quietly(held)

    async def send_quietly(self, data: bytes) -> None:
        """Send unless the client is gone (the end of a stream that already failed)."""
        if not data:
            return
        try:
            await self._out_send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.client_gone = True

    async def send(self, chunk: bytes) -> None:
        try:
            await self._pass_on(chunk)
        except Exception as exc:  # a bug of ours: caught here, not taken for a transport error
            self.bug = exc
            self._stop.cancel()

    async def _pass_on(self, chunk: bytes) -> None:
        outcome = self.outcome
        if outcome.terminal is not None:
            return  # draining after the terminal event
        try:
            complete, marks = self._scanner.feed(chunk)
        except EventTooLarge as exc:
            self.error = InvalidResponse(str(exc))
            self._stop.cancel()
            return
        cut = len(complete)
        begin = 0
        for end, kind in marks:
            outcome.events += 1
            payload = None
            if kind in NEEDS_JSON:
                payload = decode_event(complete[begin:end])
                if payload is not None:
                    self._read(kind, payload)
            begin = end
            if not self.committed:
                if payload is not None and (failure := classify_stream_error_event(
                        payload, self._handler._wall_clock())) is not None:
                    self.early_failure = failure
                    self._stop.cancel()
                    return
                if kind not in PREAMBLE_TYPES or outcome.events >= HOLD_EVENTS:
                    self.commit_now()
            if kind in TERMINAL_EVENT_TYPES:
                outcome.terminal = kind
                cut = end
                if payload is not None and kind != "response.completed":
                    failure = classify_stream_error_event(payload, self._handler._wall_clock())
                    if failure is not None and failure.kind in ("rate_limited", "quota"):
                        self.late_failure = failure  # too late to fail over; not to rest
                break
        if not self.committed:
            self.held.append(complete)
            return
        if self.late_failure is not None:  # the pool knows before the client does
            failure, self.late_failure = self.late_failure, None
            await self._handler._cool_down_from_stream(self._account_id, failure)
        if self.held:
            complete = b"".join((*self.held, complete[:cut]))
            self.held.clear()
        elif cut < len(complete):
            complete = complete[:cut]
        if complete:
            try:
                await self._out_send.send(complete)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.client_gone = True
                self._stop.cancel()
                return
            if outcome.first_byte_at is None:
                outcome.first_byte_at = trio.current_time()
        if outcome.terminal is not None:
            self._out_send.close()  # the client's stream is complete
            outcome.ended_at = trio.current_time()
            self._stop.deadline = min(self._stop.deadline,
                                      trio.current_time() + DRAIN_AFTER_TERMINAL)

    def _read(self, kind: str | None, payload: dict[str, Any]) -> None:
        if kind == "codex.rate_limits":
            usage = usage_from_rate_limits_event(payload, self._handler._wall_clock())
            if usage is not None:
                self._handler._note_usage(self._account_id, usage)
        elif kind in TERMINAL_EVENT_TYPES:
            response = payload.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            self.outcome.usage = usage if isinstance(usage, dict) else None
            error = response.get("error") if isinstance(response, dict) else None
            if not isinstance(error, dict):
                error = payload.get("error")
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                self.outcome.error_code = error["code"]


class EventStream:
    """A streamed Exchange's body: whole SSE events, as the upstream's bytes, chunk by chunk.

    ``chunks`` is what a pass-through route writes out unchanged. Iterating the stream
    itself parses it into SSEEvents, for the routes that translate events. Close it (or
    use it as a context manager) when done: closing tells the relay at once that the
    client is gone (``on_close``), so the request ends even while the upstream is silent.
    """

    __slots__ = ("_on_close", "chunks")

    def __init__(self, chunks: trio.MemoryReceiveChannel[bytes], *,
                 on_close: Callable[[], None] | None = None) -> None:
        self.chunks = chunks
        self._on_close = on_close

    def close(self) -> None:
        self.chunks.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> _ParsedEvents:
        return _ParsedEvents(self.chunks)


class _ParsedEvents:
    __slots__ = ("_chunks", "_parser", "_pending")

    def __init__(self, chunks: trio.MemoryReceiveChannel[bytes]) -> None:
        self._chunks = chunks
        self._parser = SSEParser()
        self._pending: deque[SSEEvent] = deque()

    def __aiter__(self) -> _ParsedEvents:
        return self

    async def __anext__(self) -> SSEEvent:
        while not self._pending:
            try:
                chunk = await self._chunks.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
            self._pending.extend(self._parser.feed(chunk))
        return self._pending.popleft()


def _note_outcome(stats: RequestStats, outcome: StreamOutcome) -> None:
    """What a relayed stream did, for the request log."""
    stats.status = 200
    if outcome.first_byte_at is not None:
        stats.mark_first_event(outcome.first_byte_at)
    stats.terminal = outcome.terminal or "client_closed"
    stats.usage = outcome.usage
    if outcome.error_code:
        stats.error_code = outcome.error_code
    if outcome.ended_at is not None:
        stats.ended = outcome.ended_at


class PassThrough(CodexLBError):
    """The upstream rejected the request itself (a 4xx other than auth/limits)."""

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream rejected the request with HTTP {status}")
        self.http_status = status
        self.body = body
        self.content_type = content_type or "application/json"


def _noted(attempt: _Attempt, err: CodexLBError) -> CodexLBError:
    """The final error of a request, also written on its stats for the request log."""
    if attempt.stats is not None:
        attempt.stats.status = err.http_status
        attempt.stats.error_code = (f"upstream_http_{err.http_status}"
                                    if isinstance(err, PassThrough) else err.code)
    return err


_MODEL_FIELD = re.compile(r'"model"\s*:\s*"([^"\\]{1,200})"')
_SURFACES = {"/codex/responses": Surface.CODEX_HTTP, "/codex/responses/compact": Surface.COMPACT,
             "/codex/models": Surface.MODELS, "/transcribe": Surface.TRANSCRIBE}


def _surface_for(path: str) -> str:
    return _SURFACES.get(path, path.strip("/").replace("/", "_") or "unknown")


FAULT_KINDS = ("bad_input", "upstream", "store", "unavailable", "internal")


def fault_answer(exc: BaseException, request_id: str) -> tuple[CodexLBError, str]:
    """The answer a request gets for a fault caught at its task boundary, and its kind.

    4xx for bad input, 502 for upstream trouble, 503 when the store or an actor is
    unavailable, 500 only for our own bug. The message carries the request id (to find
    the log line) and never the exception's text for a bug (it could quote anything).
    """
    leaf = exc
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    suffix = f" (request id {request_id})"
    err: CodexLBError
    if isinstance(leaf, StoreFailure):
        err = ActorUnavailable(f"the account store failed: {leaf}{suffix}")
        err.code = "store_unavailable"
        return err, "store"
    if isinstance(leaf, UnicodeError):
        return ClientError(f"the request holds characters that cannot be forwarded{suffix}"), "bad_input"
    if not isinstance(leaf, CodexLBError) and isinstance(leaf, httpx.HTTPError | OSError):
        leaf = classify(leaf)
    if isinstance(leaf, PassThrough):
        return leaf, "upstream"
    if isinstance(leaf, CodexLBError) and not isinstance(leaf, UnexpectedError):
        upstream = TransportError | UpstreamError | InvalidResponse
        kind = ("bad_input" if isinstance(leaf, ClientError)
                else "unavailable" if isinstance(leaf, ActorUnavailable)
                else "upstream" if isinstance(leaf, upstream)
                else "internal")
        if kind != "internal":
            leaf.message = f"{leaf.message}{suffix}"
            return leaf, kind
    return UnexpectedError(f"internal error{suffix}; see the server log"), "internal"


def _prefer_last(attempt: _Attempt, exc: CodexLBError) -> bool:
    # Once something was tried, its failure explains more than "nothing left to try" —
    # except a usage limit, whose resets_at the client needs.
    return attempt.last_error is not None and not isinstance(exc, RateLimited)


async def _content(request: ProxyRequest) -> TextContent | JsonContent | None:
    if request.raw_body is not None:
        return TextContent.of(request.raw_body)  # what the client sent, not re-encoded
    return await JsonContent.build(request.body) if request.body is not None else None


async def _read_bounded(response: httpx.Response, lease: Lease) -> bytes:
    """A whole non-streamed body, under the lease's idle timeout."""
    with trio.move_on_after(lease.idle_timeout()):
        try:
            return await response.aread()
        except Exception as exc:
            raise classify(exc, phase=Phase.BODY, generation=lease.generation) from exc
    raise TransportError("upstream body did not arrive in time", phase=Phase.BODY,
                         generation=lease.generation)
