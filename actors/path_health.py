"""Path health helpers for the ClientManager: which socket is bound where, and how slow is slow.

The ClientManager decides path health from evidence (DESIGN.md §2). Two pieces of that
need machinery of their own and live here:

* ``SocketRegistry`` and ``tracking_backend``: every upstream TCP socket a generation's
  pool opens is registered with its local address, so that address evidence from the
  network watcher closes exactly the sockets bound to a vanished address. httpx 0.28 has
  no hook for this; httpcore's connection pool takes a network backend, so a thin wrapper
  around httpcore's own backend registers each socket as it connects and forgets it as it
  closes.
* ``HeaderLatency``: recent header latencies of streamed calls, whose p99 sets how long
  to wait before hedging (a slow upstream must not be hedged on every request).

Closing a socket here means ``shutdown(SHUT_RDWR)``: the task reading it sees end of
file at once and ends its exchange the ordinary way (httpx raises RemoteProtocolError),
so no task ever closes another task's stream under it.
"""

from __future__ import annotations

import math
import socket
from collections import deque
from collections.abc import Iterable
from typing import Any

import httpcore

SOCKET_OPTION = tuple[int, int, int]


def upstream_socket_options(
    *, keepalive_idle: int, keepalive_interval: int, keepalive_count: int, user_timeout: float
) -> list[SOCKET_OPTION]:
    """Kernel evidence, per socket: keepalive probes and TCP_USER_TIMEOUT.

    The peer's kernel answers keepalive probes while its application thinks, so a slow
    upstream is never hit; a socket whose packets go nowhere errors within about
    ``keepalive_idle + keepalive_interval * keepalive_count`` seconds (idle) or
    ``user_timeout`` seconds (unacknowledged data), and that error ends only its exchange.
    """
    options: list[SOCKET_OPTION] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle_option is not None:
        options.append((socket.IPPROTO_TCP, idle_option, keepalive_idle))
    if hasattr(socket, "TCP_KEEPINTVL"):
        options.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive_interval))
    if hasattr(socket, "TCP_KEEPCNT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive_count))
    if hasattr(socket, "TCP_USER_TIMEOUT") and user_timeout > 0:
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000)))
    return options


def local_address_of(sock: Any) -> str | None:
    """The local IP a connected socket is bound to (None if it is already gone)."""
    try:
        return str(sock.getsockname()[0])
    except (OSError, AttributeError, IndexError):
        return None


class SocketRegistry:
    """The open upstream sockets of one generation, each with its local address.

    Only the ClientManager's own task and the connecting tasks touch it, all in one trio
    run, so a plain dict is enough.
    """

    def __init__(self) -> None:
        self._sockets: dict[int, tuple[Any, str | None]] = {}

    def add(self, sock: Any) -> None:
        self._sockets[id(sock)] = (sock, local_address_of(sock))

    def discard(self, sock: Any) -> None:
        self._sockets.pop(id(sock), None)

    def __len__(self) -> int:
        return len(self._sockets)

    def addresses(self) -> list[str | None]:
        return [address for _, address in self._sockets.values()]

    def close_not_bound_to(self, keep: str) -> int:
        """Shut down every socket whose local address is not ``keep``; returns how many."""
        closed = 0
        for key, (sock, address) in list(self._sockets.items()):
            if address is None or address == keep:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected: the reader sees the error on its own
            del self._sockets[key]
            closed += 1
        return closed


class _TrackedStream(httpcore.AsyncNetworkStream):
    """An httpcore stream that leaves the registry when it closes."""

    def __init__(
        self, inner: httpcore.AsyncNetworkStream, registry: SocketRegistry, sock: Any
    ) -> None:
        self._inner = inner
        self._registry = registry
        self._sock = sock

    # httpcore's interface takes ``timeout`` parameters (hence the ASYNC109 exemptions).
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._registry.discard(self._sock)
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _TrackedStream(inner, self._registry, self._sock)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _TrackingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, registry: SocketRegistry) -> None:
        self._inner = inner
        self._registry = registry

    async def connect_tcp(  # noqa: ASYNC109
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        sock = stream.get_extra_info("socket")
        if sock is None:
            return stream
        self._registry.add(sock)
        return _TrackedStream(stream, self._registry, sock)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def track_sockets(transport: Any, registry: SocketRegistry) -> bool:
    """Make ``transport`` (an httpx.AsyncHTTPTransport) register its sockets; False if it cannot.

    httpx builds its httpcore pool without a network-backend parameter, so the pool's
    backend is wrapped after the fact. A test (tests/test_path_health.py) fails if a new
    httpx/httpcore moves it.
    """
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if pool is None or inner is None:
        return False
    pool._network_backend = _TrackingBackend(inner, registry)
    return True


class HeaderLatency:
    """Recent header latencies of streamed calls; hedging waits ``max(floor, factor × p99)``."""

    def __init__(self, *, window: int = 200) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def p99(self) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def hedge_after(self, floor: float, factor: float) -> float:
        return max(floor, factor * self.p99())
