"""The ClientManager actor: owns the upstream httpx client, one generation at a time.

A *generation* is one ``httpx.AsyncClient`` and its connection pool, numbered from 1
and never reused. Callers hold a generation for a whole upstream exchange through a
lease::

    async with clients.lease() as lease:
        response = await lease.send(request)          # header timeout applied
        ...

When a transport failure says the pool may be stale (a VPN toggled, Wi-Fi changed,
the laptop slept), the caller rotates with the generation it saw::

    await clients.rotate(seen_generation=lease.generation, reason=RotationReason.TRANSPORT)

Rotation is compare-and-swap on the generation, so fifty failing requests cause one
new generation. The old generation is *retired*: it gets no new leases, and its task
closes the client once the last holder released it (or after ``drain_timeout``), so
in-flight streams finish on the connection they started on.

Each generation is a task in the manager's nursery; shutdown is that nursery's end.

Path health is decided by evidence (DESIGN.md §2), each piece an ``Evidence`` value
scoped to one host (one manager per host), one generation and, for address evidence,
one local address:

* a header timeout or a reset on generation N (a TRANSPORT rotation from N) only makes
  N *suspect*; N is marked dead when a newer generation answers a call sent after that;
* a hedge that wins on a fresh generation marks the original's generation dead; one
  that loses (the upstream is slow, not dead) marks nothing;
* the watcher's address change shuts exactly the sockets bound to another address;
* a wake marks every generation older than the current one dead.

A dead generation's exchanges (header waits and stream silences alike) end after
``dead_path_silence`` counted from each one's last sign of life.
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, assert_never

import httpx
import trio

from actors.errors import ActorUnavailable, Phase, TransportError, classify, is_kernel_timeout
from actors.messages import (
    DEAD_PATH_REASONS,
    Acquire,
    AddressChanged,
    ClientManagerMessage,
    ClientStats,
    Evidence,
    EvidenceKind,
    GetClientStats,
    HeadersSeen,
    HedgeDone,
    LeaseGrant,
    LeaseNote,
    Release,
    Rotate,
    RotationReason,
    ShutdownClients,
    answer,
    call,
    close_inbox,
)
from actors.path_health import HeaderLatency, SocketRegistry, track_sockets, upstream_socket_options

log = logging.getLogger("codex_lb_trio.clients")

INBOX_SIZE = 64
CLOSE_GRACE = 5.0  # bound on closing one client's sockets


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """Timeouts and lifecycle knobs (see config.example.toml [upstream] and [client])."""

    host: str = "upstream"  # which host's pool this is (labels stats and log lines)
    connect_timeout: float = 8.0
    header_timeout: float = 15.0  # the default kind of call: a streamed response
    stream_idle_timeout: float = 240.0
    dead_path_silence: float = 3.0
    write_timeout: float = 30.0
    rotation_cooldown: float = 1.0
    drain_timeout: float = 900.0
    shutdown_grace: float = 10.0
    keepalive_idle: int = 5
    keepalive_interval: int = 2
    keepalive_count: int = 3
    user_timeout: float = 15.0  # TCP_USER_TIMEOUT: unacknowledged data errors after this
    max_connections: int = 200
    hedge_after: float = 2.0  # math.inf: never hedge
    hedge_factor: float = 3.0  # ... or this many times the recent p99 header latency
    corroboration_window: float = 60.0  # a suspicion older than this is forgotten

    @classmethod
    def from_config(cls, config: Any) -> ClientSettings:
        """The backend's settings (``base_url``)."""
        up, cl = config.upstream, config.client
        return cls(
            host="backend",
            connect_timeout=up.connect_timeout,
            header_timeout=up.header_timeout,
            stream_idle_timeout=up.stream_idle_timeout,
            dead_path_silence=up.dead_path_silence,
            write_timeout=up.write_timeout,
            rotation_cooldown=cl.rotation_cooldown,
            drain_timeout=cl.drain_timeout,
            shutdown_grace=cl.shutdown_grace,
            keepalive_idle=cl.keepalive_idle,
            keepalive_interval=cl.keepalive_interval,
            keepalive_count=cl.keepalive_count,
            user_timeout=cl.user_timeout,
            max_connections=cl.max_connections,
            hedge_after=up.hedge_after,
            hedge_factor=up.hedge_factor,
        )

    @classmethod
    def auth_from_config(cls, config: Any) -> ClientSettings:
        """The auth server's settings (``auth_base_url``): a long header wait, no hedge.

        A refresh token is single use, so the token endpoint is never hedged or replayed,
        and path evidence never cuts its header wait short either: a refresh that reached
        the server has rotated the token, and only its answer carries the new one.
        """
        import dataclasses

        return dataclasses.replace(
            cls.from_config(config), host="auth",
            header_timeout=config.upstream.token_header_timeout, hedge_after=math.inf,
            dead_path_silence=config.upstream.token_header_timeout,
        )


ClientFactory = Callable[[int], httpx.AsyncClient]


def keepalive_socket_options(settings: ClientSettings) -> list[tuple[int, int, int]]:
    """Keepalive probes and TCP_USER_TIMEOUT for every upstream socket (HTTP and WebSocket)."""
    return upstream_socket_options(
        keepalive_idle=settings.keepalive_idle, keepalive_interval=settings.keepalive_interval,
        keepalive_count=settings.keepalive_count, user_timeout=settings.user_timeout,
    )


def refusing_cookie_jar() -> CookieJar:
    """A jar that keeps nothing: no cookie travels from one account's call to another's."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


@functools.cache
def shared_tls_context() -> ssl.SSLContext:
    """One TLS context (httpx's defaults: certifi's CAs, or SSL_CERT_FILE/SSL_CERT_DIR) for
    every client of the process: loading the CA bundle takes ~80 ms of the event loop, which
    a context per client paid at start-up (twice) and again at every rotation."""
    return httpx.create_ssl_context()


def default_client_factory(settings: ClientSettings) -> ClientFactory:
    """Build real clients: keepalive sockets and per-phase timeouts.

    httpx's read timeout is the idle timeout between stream chunks; the shorter wait
    for response headers is applied by Lease.send with a trio deadline.
    """

    def build(generation: int) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            verify=shared_tls_context(),
            socket_options=keepalive_socket_options(settings),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=min(32, settings.max_connections),
            ),
            retries=0,
        )
        return httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.stream_idle_timeout,
                write=settings.write_timeout,
                pool=settings.connect_timeout,
            ),
            follow_redirects=False,
            trust_env=False,
            cookies=refusing_cookie_jar(),
        )

    return build


class Lease:
    """One holder's claim on a generation; ``release()`` is synchronous and idempotent."""

    __slots__ = ("generation", "client", "path_dead", "settings", "hedge_after", "sockets",
                 "_release_send", "_released")

    def __init__(
        self,
        grant: LeaseGrant,
        settings: ClientSettings,
        release_send: trio.MemorySendChannel[LeaseNote],
    ) -> None:
        self.generation = grant.generation
        self.client = grant.client
        # Set by the manager once this generation's network path is proven dead.
        self.path_dead = grant.path_dead
        self.settings = settings
        # How long a streamed call waits for headers before one hedge starts (actors/hedge.py).
        self.hedge_after = grant.hedge_after
        self.sockets: SocketRegistry | None = grant.sockets
        self._release_send = release_send
        self._released = False

    def release(self) -> None:
        """Give the generation back. Never blocks, so a cancelled holder still releases."""
        if self._released:
            return
        self._released = True
        self.note(Release(generation=self.generation))

    def note(self, note: LeaseNote) -> None:
        """Tell the manager what this exchange saw, without waiting (unbounded channel)."""
        try:
            self._release_send.send_nowait(note)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the manager is gone; its generations are closed already

    def register_socket(self, sock: Any) -> Callable[[], None]:
        """Track a socket this holder opened itself (a WebSocket) for address evidence.

        Returns the function that forgets it again (call it when the socket closes).
        """
        registry = self.sockets
        if registry is None:
            return lambda: None
        registry.add(sock)
        return lambda: registry.discard(sock)

    async def send(
        self, request: httpx.Request, *, header_timeout: float | None = None
    ) -> httpx.Response:
        """Send a request and wait at most ``header_timeout`` for the response headers.

        ``header_timeout`` defaults to the settings' value (a streamed call); calls whose
        answer is a whole model run (compact) pass a longer one. Once this generation's
        path is proven dead the wait ends ``dead_path_silence`` after the send began.
        A header timeout on its own says nothing about the path (``path_dead`` false).

        Returns a streaming response (the caller closes it). Transport failures come
        out as TransportError carrying this lease's generation, so the caller can
        ``rotate(seen_generation=err.generation)``. Cancel-safe: a cancelled send closes
        its connection (httpcore) and leaves the lease held.
        """
        wait = self.settings.header_timeout if header_timeout is None else header_timeout
        sent_at = trio.current_time()
        scope = trio.CancelScope(deadline=sent_at + wait)
        cut_by_dead_path = False

        async def shorten_on_dead_path() -> None:
            nonlocal cut_by_dead_path
            await self.path_dead.wait()
            dead_deadline = sent_at + self.settings.dead_path_silence
            if dead_deadline < scope.deadline:
                cut_by_dead_path = True
                scope.deadline = dead_deadline

        response: httpx.Response | None = None
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shorten_on_dead_path)
                try:
                    with scope:
                        response = await self.client.send(request, stream=True)
                except Exception as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled just as the headers came: nobody will close this response.
            if response is not None:
                with trio.move_on_after(CLOSE_GRACE, shield=True):
                    await response.aclose()
            raise
        if failure is not None:
            self._note_kernel(failure, "waiting for headers")
            raise classify(failure, phase=Phase.HEADERS, generation=self.generation) from failure
        if response is not None:
            latency = trio.current_time() - sent_at
            self.note(HeadersSeen(generation=self.generation, sent_at=sent_at, latency=latency,
                                  sample=header_timeout is None))
            return response
        if cut_by_dead_path:
            raise TransportError(
                f"no response headers within {self.settings.dead_path_silence:g}s "
                "after the network path died",
                phase=Phase.HEADERS, path_dead=True, generation=self.generation,
            )
        raise TransportError(
            f"no response headers within {wait:g}s",
            phase=Phase.HEADERS,
            path_dead=False,  # slow is not dead: only corroboration can say that
            generation=self.generation,
        )

    def _note_kernel(self, failure: BaseException, where: str) -> None:
        if is_kernel_timeout(failure):
            self.note(Evidence(kind=EvidenceKind.KERNEL, host=self.settings.host,
                               generation=self.generation, when=trio.current_time(),
                               detail=f"socket timed out {where}"))

    def idle_timeout(self) -> float:
        """How long a stream on this generation may stay silent before it is ended."""
        if self.path_dead.is_set():
            return self.settings.dead_path_silence
        return self.settings.stream_idle_timeout

    async def pump(
        self,
        response: httpx.Response,
        chunk_send: trio.MemorySendChannel[bytes],
    ) -> None:
        """Copy the response body into ``chunk_send``, ending silent streams.

        A stream silent for ``stream_idle_timeout`` (or ``dead_path_silence`` once this
        generation's path is proven dead) raises TransportError(phase=BODY). Time spent
        waiting for our own consumer (backpressure) does not count as silence.

        The silence is watched by a task of its own that wakes once per timeout, so a chunk
        costs a clock read and two flag writes, not a cancel scope's deadline moved twice.
        """
        last_event = trio.current_time()
        in_consumer = False  # the consumer's pace is not silence
        silence_scope = trio.CancelScope()

        async def watch_silence() -> None:
            while True:
                now = trio.current_time()
                wake_at = (now if in_consumer else last_event) + self.idle_timeout()
                if wake_at <= now:
                    silence_scope.cancel()
                    return
                if self.path_dead.is_set():
                    await trio.sleep_until(wake_at)
                else:
                    with trio.move_on_at(wake_at):
                        await self.path_dead.wait()  # the timeout shortens: look again

        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_silence)
            try:
                with silence_scope:
                    async for chunk in response.aiter_bytes():
                        in_consumer = True
                        await chunk_send.send(chunk)
                        in_consumer = False
                        last_event = trio.current_time()
            except Exception as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            self._note_kernel(failure, "mid-stream")
            raise classify(failure, phase=Phase.BODY, generation=self.generation) from failure
        if silence_scope.cancelled_caught:
            silent_for = trio.current_time() - last_event
            raise TransportError(
                f"upstream silent for {silent_for:.0f}s"
                + (" after its network path died" if self.path_dead.is_set() else ""),
                phase=Phase.BODY,
                path_dead=self.path_dead.is_set(),
                generation=self.generation,
            )


@dataclass(slots=True, kw_only=True)
class _Suspicion:
    """Application evidence on a generation, waiting for a fresh connection to corroborate it."""

    since: float
    evidence: Evidence


@dataclass(slots=True, eq=False)
class _Generation:
    number: int
    client: httpx.AsyncClient | None = None
    leases: int = 0
    retired: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)
    path_dead: trio.Event = field(default_factory=trio.Event)
    sockets: SocketRegistry = field(default_factory=SocketRegistry)
    proven: bool = False  # answered at least one call: a hedge from it may rotate
    suspicion: _Suspicion | None = None
    dead_because: Evidence | None = None

    def retire(self) -> None:
        self.retired.set()
        if self.leases == 0:
            self.drained.set()


class ClientHandle:
    """The only way to talk to a ClientManager. Cheap to copy around; never closes."""

    def __init__(
        self,
        inbox: trio.MemorySendChannel[ClientManagerMessage],
        release_send: trio.MemorySendChannel[LeaseNote],
        settings: ClientSettings,
        call_timeout: float = 30.0,
    ) -> None:
        self._inbox = inbox
        self._release_send = release_send
        self._settings = settings
        self._call_timeout = call_timeout

    async def acquire(self) -> Lease:
        """A lease on the current generation; call ``release()`` when done."""
        grant: LeaseGrant = await call(
            self._inbox, lambda r: Acquire(reply=r), actor="client manager",
            timeout=self._call_timeout, on_abandoned=self._give_back,
        )
        return Lease(grant, self._settings, self._release_send)

    def _give_back(self, abandoned: Any) -> None:
        # A grant that reached us after we were cancelled must still be released.
        if isinstance(abandoned, LeaseGrant):
            Lease(abandoned, self._settings, self._release_send).release()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """Hold the current generation for the whole exchange, released on any exit."""
        held = await self.acquire()
        try:
            yield held
        finally:
            held.release()

    async def rotate(
        self,
        *,
        seen_generation: int | None = None,
        reason: RotationReason = RotationReason.ADMIN,
        path_dead: bool | None = None,
        phase: Phase | None = None,
    ) -> int:
        """Replace the client if ``seen_generation`` is still current; returns the current one.

        Without ``seen_generation`` the rotation is coalesced with any other in the last
        ``rotation_cooldown`` seconds. What it says about the old path depends on the
        reason: ``transport`` makes ``seen_generation`` suspect (dead once a newer one
        answers); ``wake`` marks every older generation dead, coalesced or not; ``hedge``
        rotates only from a current generation that has answered before; ``path_dead``
        (default: true for network-change and wake) marks the older generations dead at
        once, for callers that know without corroboration. ``phase`` is where the transport
        failure struck: one while connecting (``Phase.CONNECT``) rotates but makes nothing
        suspect (every generation connects over the same route; a new socket that failed
        says nothing about the sockets ``seen_generation`` has open).
        """
        dead = reason in DEAD_PATH_REASONS if path_dead is None else path_dead
        evidence = phase is not Phase.CONNECT
        result: int = await call(
            self._inbox,
            lambda r: Rotate(seen_generation=seen_generation, reason=reason, path_dead=dead,
                             evidence=evidence, reply=r),
            actor="client manager",
            timeout=self._call_timeout,
        )
        return result

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    async def address_changed(self, *, old: str | None, new: str) -> int:
        """Address evidence: the route to this host now leaves from ``new``.

        Rotates (coalesced like any watcher rotation) and shuts every socket of every
        generation bound to another address; sockets on ``new`` are left alone. Returns
        the current generation.
        """
        result: int = await call(
            self._inbox, lambda r: AddressChanged(old=old, new=new, reply=r),
            actor="client manager", timeout=self._call_timeout,
        )
        return result

    async def stats(self) -> ClientStats:
        result: ClientStats = await call(
            self._inbox, lambda r: GetClientStats(reply=r), actor="client manager",
            timeout=self._call_timeout,
        )
        return result

    async def shutdown(self) -> None:
        """Stop leasing, drain holders for up to ``shutdown_grace``, then close everything."""
        try:
            await call(
                self._inbox, lambda r: ShutdownClients(reply=r), actor="client manager",
                timeout=self._settings.shutdown_grace + 2 * CLOSE_GRACE,
            )
        except ActorUnavailable:
            pass  # already stopped


class ClientManager:
    """The actor. Construct it, then ``handle = await nursery.start(manager.run)``."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.settings = settings or ClientSettings()
        self._factory = client_factory or default_client_factory(self.settings)
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[ClientManagerMessage](
            INBOX_SIZE
        )
        # Unbounded so that release never blocks: it holds at most one item per
        # outstanding lease, and leases are bounded by the acquires we answered.
        # Notes (HeadersSeen, HedgeDone, kernel Evidence) share it: at most one per call.
        self._release_send, self._release_recv = trio.open_memory_channel[LeaseNote](math.inf)
        # Survive restarts: numbers are never reused and counters keep counting.
        self._next_generation = 1
        self._rotations: Counter[str] = Counter()
        self._force_closes = 0
        self._rotation_failures = 0
        self._generations: dict[int, _Generation] = {}
        self._current: _Generation | None = None
        self._last_rotation = -math.inf
        self._closing = False
        self._latency = HeaderLatency()
        self._hedges: Counter[str] = Counter()
        self._evidence: Counter[str] = Counter()
        self._sockets_closed: Counter[str] = Counter()

    @property
    def host(self) -> str:
        return self.settings.host

    def close(self) -> None:
        """The actor is gone for good: queued and later requests fail at once."""
        close_inbox(self._inbox_recv)

    def handle(self) -> ClientHandle:
        return ClientHandle(self._inbox_send.clone(), self._release_send.clone(), self.settings)

    async def run(self, *, task_status: trio.TaskStatus[ClientHandle] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shut down. Cancelling it closes every client at once."""
        self._generations.clear()
        self._current = None
        self._closing = False
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._current = await self._start_generation()
            nursery.start_soon(self._collect_releases)
            task_status.started(self.handle())
            async for message in self._inbox_recv:
                with message.reply:
                    match message:
                        case Acquire():
                            self._on_acquire(message)
                        case Rotate():
                            await self._on_rotate(message)
                        case AddressChanged():
                            await self._on_address_changed(message)
                        case GetClientStats():
                            answer(message.reply, self._stats())
                        case ShutdownClients():
                            await self._shutdown(nursery)
                            answer(message.reply, None)
                            nursery.cancel_scope.cancel()
                            break
                        case _:
                            assert_never(message)
        # A clean shutdown is final: later calls fail at once instead of timing out.
        self._refuse_pending()
        self._inbox_recv.close()
        self._release_recv.close()

    # --- message handlers -------------------------------------------------------

    def _on_acquire(self, message: Acquire) -> None:
        current = self._current
        if self._closing or current is None or current.client is None:
            answer(message.reply, ActorUnavailable("the upstream client is shutting down"))
            return
        grant = LeaseGrant(
            generation=current.number, client=current.client, path_dead=current.path_dead,
            hedge_after=self._hedge_after(), sockets=current.sockets,
        )
        if answer(message.reply, grant):
            current.leases += 1

    async def _on_rotate(self, message: Rotate) -> None:
        current = self._current
        assert current is not None
        reason, seen = message.reason, message.seen_generation
        if reason is RotationReason.HEDGE:
            # A hedge from an unproven generation would only retry what is already fresh.
            if seen == current.number and current.proven:
                await self._rotate(current, reason)
            answer(message.reply, self._current.number if self._current else current.number)
            return
        if seen is not None and seen != current.number:
            # Someone already rotated past it; the evidence still counts for ``seen``.
            if reason is RotationReason.TRANSPORT and message.evidence:
                self._suspect(seen, "a transport failure (stale rotation)")
            answer(message.reply, current.number)
            return
        now = trio.current_time()
        if seen is None and now - self._last_rotation < self.settings.rotation_cooldown:
            log.info("rotation coalesced host=%s reason=%s generation=%d",
                     self.host, reason, current.number)
        else:
            await self._rotate(current, reason)
        fresh = self._current
        assert fresh is not None
        if reason is RotationReason.TRANSPORT and seen is not None:
            if message.evidence:
                self._suspect(seen, "a transport failure")
        elif reason is RotationReason.WAKE or (
            message.path_dead and reason is not RotationReason.TRANSPORT
        ):
            # Coalesced or not: every generation older than the current one is dead.
            kind = EvidenceKind.WAKE if reason is RotationReason.WAKE else EvidenceKind.ADDRESS
            for generation in list(self._generations.values()):
                if generation.number < fresh.number:
                    self._mark_dead(generation, Evidence(
                        kind=kind, host=self.host, generation=generation.number,
                        when=now, detail=str(reason)))
        answer(message.reply, fresh.number)

    async def _rotate(self, current: _Generation, reason: RotationReason) -> bool:
        try:
            fresh = await self._start_generation()
        except Exception as exc:
            self._rotation_failures += 1
            log.error(
                "rotation failed host=%s reason=%s generation=%d error=%s: keeping the current one",
                self.host, reason, current.number, exc,
            )
            return False
        self._current = fresh
        self._last_rotation = trio.current_time()
        self._rotations[reason] += 1
        current.retire()
        log.info(
            "rotated host=%s reason=%s generation=%d->%d draining_leases=%d",
            self.host, reason, current.number, fresh.number, current.leases,
        )
        return True

    async def _on_address_changed(self, message: AddressChanged) -> None:
        current = self._current
        assert current is not None
        now = trio.current_time()
        # Rotate first, so that an exchange cut below retries on a fresh generation.
        if now - self._last_rotation >= self.settings.rotation_cooldown:
            await self._rotate(current, RotationReason.NETWORK_CHANGE)
        else:
            log.info("rotation coalesced host=%s reason=%s generation=%d",
                     self.host, RotationReason.NETWORK_CHANGE, current.number)
        closed = 0
        for generation in list(self._generations.values()):
            cut = generation.sockets.close_not_bound_to(message.new)
            closed += cut
            if cut:
                evidence = Evidence(kind=EvidenceKind.ADDRESS, host=self.host,
                                    generation=generation.number, local_address=message.old,
                                    when=now, detail=f"route now leaves from {message.new}")
                self._evidence[evidence.kind] += 1
                log.info("closed host=%s generation=%d sockets=%d not bound to %s (was %s)",
                         self.host, generation.number, cut, message.new, message.old)
        self._sockets_closed["address"] += closed
        assert self._current is not None
        answer(message.reply, self._current.number)

    # --- evidence ---------------------------------------------------------------------

    def _suspect(self, number: int, why: str) -> None:
        generation = self._generations.get(number)
        if generation is None or generation.path_dead.is_set() or generation.suspicion is not None:
            return
        now = trio.current_time()
        generation.suspicion = _Suspicion(since=now, evidence=Evidence(
            kind=EvidenceKind.APPLICATION, host=self.host, generation=number, when=now, detail=why))

    def _mark_dead(self, generation: _Generation, evidence: Evidence) -> None:
        if generation.path_dead.is_set():
            return
        generation.dead_because = evidence
        generation.suspicion = None
        generation.path_dead.set()
        self._evidence[evidence.kind] += 1
        log.info("path dead host=%s generation=%d evidence=%s (%s)",
                 self.host, generation.number, evidence.kind, evidence.detail)

    def _on_headers_seen(self, seen: HeadersSeen) -> None:
        answered = self._generations.get(seen.generation)
        if answered is not None:
            answered.proven = True
        if seen.sample:
            self._latency.add(seen.latency)
        now = trio.current_time()
        for generation in list(self._generations.values()):
            suspicion = generation.suspicion
            if suspicion is None or generation.number >= seen.generation:
                continue
            if now - suspicion.since > self.settings.corroboration_window:
                generation.suspicion = None  # never corroborated: forget it
            elif seen.sent_at >= suspicion.since:
                # A fresh connection answered where this generation did not.
                self._mark_dead(generation, Evidence(
                    kind=EvidenceKind.APPLICATION, host=self.host, generation=generation.number,
                    when=now, detail=f"{suspicion.evidence.detail}, corroborated by "
                                     f"generation {seen.generation}"))

    def _on_hedge_done(self, done: HedgeDone) -> None:
        self._hedges["started"] += 1
        if done.winner == "none":
            self._hedges["failed"] += 1
            return
        if done.winner == "original":
            self._hedges["original_won"] += 1  # slow, not dead: nothing is marked
            return
        self._hedges["hedge_won"] += 1
        original = self._generations.get(done.original)
        if original is not None and done.hedge != done.original:
            self._mark_dead(original, Evidence(
                kind=EvidenceKind.HEDGE, host=self.host, generation=done.original,
                when=trio.current_time(),
                detail=f"a hedge on generation {done.hedge} answered first"))

    def _hedge_after(self) -> float:
        return self._latency.hedge_after(self.settings.hedge_after, self.settings.hedge_factor)

    def _stats(self) -> ClientStats:
        assert self._current is not None
        return ClientStats(
            host=self.host,
            generation=self._current.number,
            leases={n: g.leases for n, g in sorted(self._generations.items())},
            retired=tuple(n for n, g in sorted(self._generations.items()) if g.retired.is_set()),
            dead=tuple(n for n, g in sorted(self._generations.items()) if g.path_dead.is_set()),
            rotations=dict(self._rotations),
            force_closes=self._force_closes,
            rotation_failures=self._rotation_failures,
            hedge_after=self._hedge_after(),
            hedges=dict(self._hedges),
            evidence=dict(self._evidence),
            sockets=sum(len(g.sockets) for g in self._generations.values()),
            sockets_closed=dict(self._sockets_closed),
        )

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        self._closing = True
        for generation in list(self._generations.values()):
            generation.retire()
        held = sum(g.leases for g in self._generations.values())
        log.info("client manager shutting down leases_held=%d", held)
        with trio.move_on_after(self.settings.shutdown_grace) as scope:
            # Keep answering (with refusals) while holders finish.
            nursery.start_soon(self._refuse_while_closing)
            for generation in list(self._generations.values()):
                await generation.drained.wait()
        if scope.cancelled_caught:
            log.warning(
                "shutdown grace of %gs over; closing clients under %d holder(s)",
                self.settings.shutdown_grace,
                sum(g.leases for g in self._generations.values()),
            )

    async def _refuse_while_closing(self) -> None:
        async for message in self._inbox_recv:
            with message.reply:
                match message:
                    case GetClientStats():
                        answer(message.reply, self._stats())
                    case Acquire() | Rotate() | AddressChanged() | ShutdownClients():
                        answer(message.reply, ActorUnavailable("the upstream client is shutting down"))
                    case _:
                        assert_never(message)

    def _refuse_pending(self) -> None:
        while True:
            try:
                message = self._inbox_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            with message.reply:
                answer(message.reply, ActorUnavailable("the upstream client is shut down"))

    # --- generations ----------------------------------------------------------------

    async def _start_generation(self) -> _Generation:
        generation = _Generation(number=self._next_generation)
        self._next_generation += 1
        await self._nursery.start(self._run_generation, generation)
        return generation

    async def _run_generation(
        self, generation: _Generation, *, task_status: trio.TaskStatus[None]
    ) -> None:
        client = self._factory(generation.number)
        client.cookies = refusing_cookie_jar()  # type: ignore[assignment]  # no cookie is ever kept
        track_sockets(getattr(client, "_transport", None), generation.sockets)
        try:
            await client.__aenter__()
            generation.client = client
            self._generations[generation.number] = generation
            task_status.started()
            await generation.retired.wait()
            with trio.move_on_after(self.settings.drain_timeout) as drain:
                await generation.drained.wait()
            if drain.cancelled_caught:
                self._force_closes += 1
                log.warning(
                    "force-closing generation=%d still leased=%d after drain_timeout=%gs",
                    generation.number, generation.leases, self.settings.drain_timeout,
                )
        finally:
            self._generations.pop(generation.number, None)
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await client.aclose()
            log.debug("closed generation=%d", generation.number)

    async def _collect_releases(self) -> None:
        async for note in self._release_recv:
            match note:
                case Release():
                    generation = self._generations.get(note.generation)
                    if generation is None:
                        continue  # closed already (forced, or a previous incarnation's)
                    generation.leases -= 1
                    if generation.leases == 0 and generation.retired.is_set():
                        generation.drained.set()
                case HeadersSeen():
                    self._on_headers_seen(note)
                case HedgeDone():
                    self._on_hedge_done(note)
                case Evidence():
                    # Kernel evidence ends only its own socket's exchange: counted, not spread.
                    self._evidence[note.kind] += 1
                    self._sockets_closed[str(note.kind)] += 1
                case _:
                    assert_never(note)
