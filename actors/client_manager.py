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
"""

from __future__ import annotations

import logging
import math
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, assert_never

import httpx
import trio

from actors.errors import ActorUnavailable, Phase, TransportError, classify
from actors.messages import (
    DEAD_PATH_REASONS,
    Acquire,
    ClientManagerMessage,
    ClientStats,
    GetClientStats,
    LeaseGrant,
    Release,
    Rotate,
    RotationReason,
    ShutdownClients,
    answer,
    call,
    close_inbox,
)

log = logging.getLogger("codex_lb_trio.clients")

INBOX_SIZE = 64
CLOSE_GRACE = 5.0  # bound on closing one client's sockets


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """Timeouts and lifecycle knobs (see config.example.toml [upstream] and [client])."""

    connect_timeout: float = 8.0
    header_timeout: float = 15.0
    stream_idle_timeout: float = 240.0
    dead_path_silence: float = 3.0
    write_timeout: float = 30.0
    rotation_cooldown: float = 1.0
    drain_timeout: float = 900.0
    shutdown_grace: float = 10.0
    keepalive_idle: int = 15
    keepalive_interval: int = 5
    keepalive_count: int = 3
    max_connections: int = 200

    @classmethod
    def from_config(cls, config: Any) -> ClientSettings:
        up, cl = config.upstream, config.client
        return cls(
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
            max_connections=cl.max_connections,
        )


ClientFactory = Callable[[int], httpx.AsyncClient]


def keepalive_socket_options(settings: ClientSettings) -> list[tuple[int, int, int]]:
    """SO_KEEPALIVE plus Linux/macOS probe timing, so a dead peer becomes an error."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle_option is not None:
        options.append((socket.IPPROTO_TCP, idle_option, settings.keepalive_idle))
    if hasattr(socket, "TCP_KEEPINTVL"):
        options.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, settings.keepalive_interval))
    if hasattr(socket, "TCP_KEEPCNT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count))
    return options


def default_client_factory(settings: ClientSettings) -> ClientFactory:
    """Build real clients: keepalive sockets and per-phase timeouts.

    httpx's read timeout is the idle timeout between stream chunks; the shorter wait
    for response headers is applied by Lease.send with a trio deadline.
    """

    def build(generation: int) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
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
        )

    return build


class Lease:
    """One holder's claim on a generation; ``release()`` is synchronous and idempotent."""

    __slots__ = ("generation", "client", "path_dead", "settings", "_release_send", "_released")

    def __init__(
        self,
        grant: LeaseGrant,
        settings: ClientSettings,
        release_send: trio.MemorySendChannel[Release],
    ) -> None:
        self.generation = grant.generation
        self.client = grant.client
        # Set by the manager once this generation's network path is proven dead.
        self.path_dead = grant.path_dead
        self.settings = settings
        self._release_send = release_send
        self._released = False

    def release(self) -> None:
        """Give the generation back. Never blocks, so a cancelled holder still releases."""
        if self._released:
            return
        self._released = True
        try:
            self._release_send.send_nowait(Release(generation=self.generation))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the manager is gone; its generations are closed already

    async def send(
        self, request: httpx.Request, *, header_timeout: float | None = None
    ) -> httpx.Response:
        """Send a request and wait at most ``header_timeout`` for the response headers.

        ``header_timeout`` defaults to the settings' value; calls whose answer is a whole
        model run (compact) or the token endpoint pass a longer one.

        Returns a streaming response (the caller closes it). Transport failures come
        out as TransportError carrying this lease's generation, so the caller can
        ``rotate(seen_generation=err.generation)``.
        """
        wait = self.settings.header_timeout if header_timeout is None else header_timeout
        with trio.move_on_after(wait) as scope:
            try:
                return await self.client.send(request, stream=True)
            except Exception as exc:
                raise classify(exc, phase=Phase.HEADERS, generation=self.generation) from exc
        assert scope.cancelled_caught
        raise TransportError(
            f"no response headers within {wait:g}s",
            phase=Phase.HEADERS,
            path_dead=True,
            generation=self.generation,
        )

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
        """
        last_event = trio.current_time()
        silence_scope = trio.CancelScope()

        def arm() -> None:
            silence_scope.deadline = last_event + self.idle_timeout()

        async def shorten_on_dead_path() -> None:
            await self.path_dead.wait()
            if silence_scope.deadline != math.inf:
                arm()

        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shorten_on_dead_path)
            try:
                with silence_scope:
                    arm()
                    async for chunk in response.aiter_bytes():
                        silence_scope.deadline = math.inf  # the consumer's pace is not silence
                        await chunk_send.send(chunk)
                        last_event = trio.current_time()
                        arm()
            except Exception as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
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


@dataclass(slots=True, eq=False)
class _Generation:
    number: int
    client: httpx.AsyncClient | None = None
    leases: int = 0
    retired: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)
    path_dead: trio.Event = field(default_factory=trio.Event)

    def retire(self) -> None:
        self.retired.set()
        if self.leases == 0:
            self.drained.set()


class ClientHandle:
    """The only way to talk to a ClientManager. Cheap to copy around; never closes."""

    def __init__(
        self,
        inbox: trio.MemorySendChannel[ClientManagerMessage],
        release_send: trio.MemorySendChannel[Release],
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
    ) -> int:
        """Replace the client if ``seen_generation`` is still current; returns the current one.

        Without ``seen_generation`` the rotation is coalesced with any other in the last
        ``rotation_cooldown`` seconds. ``path_dead`` (default: true for network-change
        and wake) shortens the silence allowed to the old generation's streams.
        """
        dead = reason in DEAD_PATH_REASONS if path_dead is None else path_dead
        result: int = await call(
            self._inbox,
            lambda r: Rotate(seen_generation=seen_generation, reason=reason, path_dead=dead, reply=r),
            actor="client manager",
            timeout=self._call_timeout,
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
        self._release_send, self._release_recv = trio.open_memory_channel[Release](math.inf)
        # Survive restarts: numbers are never reused and counters keep counting.
        self._next_generation = 1
        self._rotations: Counter[str] = Counter()
        self._force_closes = 0
        self._rotation_failures = 0
        self._generations: dict[int, _Generation] = {}
        self._current: _Generation | None = None
        self._last_rotation = -math.inf
        self._closing = False

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
            generation=current.number, client=current.client, path_dead=current.path_dead
        )
        if answer(message.reply, grant):
            current.leases += 1

    async def _on_rotate(self, message: Rotate) -> None:
        current = self._current
        assert current is not None
        now = trio.current_time()
        if message.seen_generation is not None and message.seen_generation != current.number:
            answer(message.reply, current.number)  # someone already rotated past it
            return
        if message.seen_generation is None and now - self._last_rotation < self.settings.rotation_cooldown:
            log.info("rotation coalesced reason=%s generation=%d", message.reason, current.number)
            answer(message.reply, current.number)
            return
        try:
            fresh = await self._start_generation()
        except Exception as exc:
            self._rotation_failures += 1
            log.error(
                "rotation failed reason=%s generation=%d error=%s: keeping the current client",
                message.reason, current.number, exc,
            )
            answer(message.reply, current.number)
            return
        self._current = fresh
        self._last_rotation = now
        self._rotations[message.reason] += 1
        if message.path_dead:
            current.path_dead.set()
        current.retire()
        log.info(
            "rotated reason=%s generation=%d->%d draining_leases=%d",
            message.reason, current.number, fresh.number, current.leases,
        )
        answer(message.reply, fresh.number)

    def _stats(self) -> ClientStats:
        assert self._current is not None
        return ClientStats(
            generation=self._current.number,
            leases={n: g.leases for n, g in sorted(self._generations.items())},
            retired=tuple(n for n, g in sorted(self._generations.items()) if g.retired.is_set()),
            rotations=dict(self._rotations),
            force_closes=self._force_closes,
            rotation_failures=self._rotation_failures,
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
                    case Acquire() | Rotate() | ShutdownClients():
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
        async for release in self._release_recv:
            generation = self._generations.get(release.generation)
            if generation is None:
                continue  # closed already (forced, or a previous incarnation's)
            generation.leases -= 1
            if generation.leases == 0 and generation.retired.is_set():
                generation.drained.set()
