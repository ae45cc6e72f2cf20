"""The network watcher: rotate the upstream client *before* a request fails.

Every ``interval`` seconds it asks two questions:

* which local address would the kernel use to reach the upstream host? (a connected
  UDP socket's ``getsockname``; connecting a UDP socket sends no packet). A different
  answer means a VPN came up or down, or Wi-Fi changed: pooled connections are bound
  to an address that no longer routes.
* did the wall clock run ahead of the monotonic clock? Linux's monotonic clock stops
  during suspend, the wall clock does not, so a jump means the machine slept; peers
  have long since dropped our idle connections.

A changed address is *address evidence*: ``address_changed(old, new)`` rotates and shuts
exactly the sockets bound to an address the route no longer uses (their streams end at
once; a request waiting for headers on one is retried on the new generation). A wake
rotates and marks every older generation dead. A failed lookup or a lost route (the probe
answers None) is no change: the last known address stays, so a route lost and regained
on the same address changes nothing either.
Both probes are injectable so tests can drive them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import trio

from actors.client_manager import ClientHandle
from actors.errors import ActorUnavailable
from actors.messages import RotationReason

log = logging.getLogger("codex_lb_trio.network")

RouteProbe = Callable[[], Awaitable[str | None]]
WallClock = Callable[[], float]


def route_probe_for(url: str) -> RouteProbe:
    """A probe answering the local address that routes to ``url``'s host (None: no route)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)

    async def probe() -> str | None:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            return None  # no answer: the watcher keeps the last known address
        for family, type_, proto, _, address in infos:
            sock = trio.socket.socket(family, type_, proto)
            with sock:
                try:
                    await sock.connect(address)
                except OSError:
                    continue
                return str(sock.getsockname()[0])
        return None

    return probe


class NetworkWatcher:
    """Not an actor with an inbox: a loop that only sends rotations."""

    def __init__(
        self,
        clients: ClientHandle,
        *,
        route_probe: RouteProbe,
        wall_clock: WallClock = time.time,
        interval: float = 1.0,
        wake_threshold: float = 5.0,
    ) -> None:
        self._clients = clients
        self._probe = route_probe
        self._wall_clock = wall_clock
        self._interval = interval
        self._wake_threshold = wake_threshold
        self.ticks = 0
        self.changes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        address = await self._probe()
        wall, monotonic = self._wall_clock(), trio.current_time()
        log.info("network watcher started local_address=%s", address)
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            new_address = await self._probe()
            new_wall, new_monotonic = self._wall_clock(), trio.current_time()
            slept = (new_wall - wall) - (new_monotonic - monotonic)
            self.ticks += 1
            if slept > self._wake_threshold:
                await self._rotate(RotationReason.WAKE, f"wall clock jumped {slept:.0f}s ahead")
            if new_address is not None and new_address != address:
                if address is not None:
                    await self._address_changed(address, new_address)
                address = new_address  # first answer after a start without route: a baseline
            wall, monotonic = new_wall, new_monotonic

    async def _address_changed(self, old: str, new: str) -> None:
        try:
            generation = await self._clients.address_changed(old=old, new=new)
        except ActorUnavailable as exc:
            log.warning("network change %s -> %s but the client manager is unavailable: %s",
                        old, new, exc)
            return
        self.changes += 1
        log.info("network change: local address %s -> %s; generation=%d", old, new, generation)

    async def _rotate(self, reason: RotationReason, why: str) -> None:
        try:
            generation = await self._clients.rotate(reason=reason)
        except ActorUnavailable as exc:
            log.warning("network %s (%s) but the client manager is unavailable: %s", reason, why, exc)
            return
        log.info("network %s: %s; generation=%d", reason, why, generation)
