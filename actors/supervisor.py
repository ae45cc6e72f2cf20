"""Start every actor in one nursery, keep them alive, and stop them in order.

``open_actors`` is the engine's public entry: the standalone server uses it and so
can any trio program::

    async with open_actors(config, store) as engine:
        async with engine.clients.lease() as lease:
            ...

Supervision: an actor that dies of an unexpected exception is logged with its
traceback and restarted with backoff. Its inbox lives on the actor object, so the
handles given out stay valid across restarts; a caller whose request died with the
old incarnation gets ActorUnavailable at once. ``max_crashes`` crashes within
``crash_window`` seconds is a crash loop: the whole engine stops with CrashLoop.
Cancellation is never a crash.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from actors.client_manager import ClientFactory, ClientHandle, ClientManager, ClientSettings
from actors.network import NetworkWatcher, RouteProbe, WallClock, route_probe_for

log = logging.getLogger("codex_lb_trio.supervisor")

STOP_GRACE = 5.0  # bound on each non-client actor's orderly stop


class CrashLoop(Exception):
    """An actor kept crashing; the message is the one line to show the user."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisionPolicy:
    max_crashes: int = 5
    crash_window: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 10.0


async def supervise(
    name: str,
    run: Callable[..., Awaitable[Any]],
    policy: SupervisionPolicy = SupervisionPolicy(),
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run(task_status=...)`` and restart it when it crashes.

    The first incarnation's start value (the actor's handle) is reported once. A
    failure before the first start is not retried: the engine cannot start.
    """
    crashes: deque[float] = deque()
    backoff = policy.backoff_initial
    started = False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                value = await nursery.start(run)
                if not started:
                    started = True
                    task_status.started(value)
            return  # a clean stop
        except Exception as exc:
            if not started:
                raise
            now = trio.current_time()
            while crashes and now - crashes[0] > policy.crash_window:
                crashes.popleft()
            if not crashes:
                backoff = policy.backoff_initial
            crashes.append(now)
            leaf = _first_leaf(exc)
            if len(crashes) >= policy.max_crashes:
                raise CrashLoop(
                    f"the {name} crashed {len(crashes)} times in {policy.crash_window:g}s; "
                    f"giving up. Last error: {type(leaf).__name__}: {leaf}"
                ) from exc
            log.error(
                "%s crashed (%d in %gs); restarting in %.1fs",
                name, len(crashes), policy.crash_window, backoff, exc_info=leaf,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, policy.backoff_max)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Engine:
    """The handles of the running actors: what embedding code talks to."""

    clients: ClientHandle
    network: NetworkWatcher | None


@asynccontextmanager
async def open_actors(
    config: Any,
    store: Any = None,
    *,
    client_factory: ClientFactory | None = None,
    route_probe: RouteProbe | None = None,
    wall_clock: WallClock = time.time,
    watch_network: bool = True,
    policy: SupervisionPolicy = SupervisionPolicy(),
) -> AsyncIterator[Engine]:
    """Start the actors for ``config`` (a service.config.Config) and yield their handles.

    On exit the actors stop in order: the clients drain their leases for up to
    ``client.shutdown_grace`` seconds, then everything is cancelled.
    """
    settings = ClientSettings.from_config(config)
    async with trio.open_nursery() as nursery:
        manager = ClientManager(settings, client_factory=client_factory)
        clients: ClientHandle = await nursery.start(supervise, "client manager", manager.run, policy)
        watcher: NetworkWatcher | None = None
        if watch_network:
            watcher = NetworkWatcher(
                clients,
                route_probe=route_probe or route_probe_for(config.upstream.base_url),
                wall_clock=wall_clock,
                interval=config.client.watch_interval,
                wake_threshold=config.client.wake_threshold,
            )
            await nursery.start(supervise, "network watcher", watcher.run, policy)
        engine = Engine(clients=clients, network=watcher)
        try:
            yield engine
        finally:
            with trio.move_on_after(settings.shutdown_grace + 2 * STOP_GRACE, shield=True):
                await clients.shutdown()
            nursery.cancel_scope.cancel()
