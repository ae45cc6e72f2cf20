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

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from actors.accounts import AccountStore, InMemoryAccountStore
from actors.client_manager import ClientFactory, ClientHandle, ClientManager, ClientSettings
from actors.network import NetworkWatcher, RouteProbe, WallClock, route_probe_for
from actors.proxy_handler import ProxyHandle, ProxyHandler, ProxySettings
from actors.refresh_scheduler import RefreshScheduler, SchedulerHandle, SchedulerSettings
from actors.request_record import RecordSink
from actors.token_refresher import RefreshSettings, TokenHandle, TokenRefresher

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
    on_exit: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run(task_status=...)`` and restart it when it crashes.

    The first incarnation's start value (the actor's handle) is reported once. A
    failure before the first start is not retried: the engine cannot start.
    ``on_exit`` runs when the actor is gone for good (stopped, cancelled, or given
    up on), typically closing its inbox so callers fail at once instead of waiting.
    """
    try:
        await _supervise(name, run, policy, task_status)
    finally:
        if on_exit is not None:
            on_exit()


async def _supervise(
    name: str,
    run: Callable[..., Awaitable[Any]],
    policy: SupervisionPolicy,
    task_status: trio.TaskStatus[Any],
) -> None:
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
    tokens: TokenHandle
    proxy: ProxyHandle
    scheduler: SchedulerHandle
    store: AccountStore
    network: NetworkWatcher | None
    # The auth server's own pool and path state: evidence about one host never touches
    # the other's sockets (the TokenRefresher uses it).
    auth_clients: ClientHandle | None = None
    auth_network: NetworkWatcher | None = None


@asynccontextmanager
async def open_actors(
    config: Any,
    store: AccountStore | None = None,
    *,
    client_factory: ClientFactory | None = None,
    route_probe: RouteProbe | None = None,
    wall_clock: WallClock = time.time,
    watch_network: bool = True,
    periodic_refresh: bool = True,
    policy: SupervisionPolicy = SupervisionPolicy(),
    on_record: RecordSink | None = None,
) -> AsyncIterator[Engine]:
    """Start the actors for ``config`` (a service.config.Config) and yield their handles.

    ``store`` defaults to an in-memory store (nothing persisted); the standalone
    server passes its SQLite store. On exit the actors stop in order: the clients drain their leases for up to
    ``client.shutdown_grace`` seconds, then everything is cancelled.
    """
    settings = ClientSettings.from_config(config)
    auth_settings = ClientSettings.auth_from_config(config)
    store = store if store is not None else InMemoryAccountStore()
    async with trio.open_nursery() as nursery:
        manager = ClientManager(settings, client_factory=client_factory)
        clients: ClientHandle = await nursery.start(
            partial(supervise, "client manager", manager.run, policy, on_exit=manager.close)
        )
        auth_manager = ClientManager(auth_settings, client_factory=client_factory)
        auth_clients: ClientHandle = await nursery.start(
            partial(supervise, "auth client manager", auth_manager.run, policy,
                    on_exit=auth_manager.close)
        )
        watchers: list[NetworkWatcher] = []
        if watch_network:
            for handle, url in ((clients, config.upstream.base_url),
                                (auth_clients, config.upstream.auth_base_url)):
                watcher = NetworkWatcher(
                    handle,
                    route_probe=route_probe or route_probe_for(url),
                    wall_clock=wall_clock,
                    interval=config.client.watch_interval,
                    wake_threshold=config.client.wake_threshold,
                )
                await nursery.start(supervise, "network watcher", watcher.run, policy)
                watchers.append(watcher)
        refresher = TokenRefresher(
            store=store, clients=auth_clients, settings=RefreshSettings.from_config(config),
            wall_clock=wall_clock,
        )
        tokens: TokenHandle = await nursery.start(
            partial(supervise, "token refresher", refresher.run, policy, on_exit=refresher.close)
        )
        scheduler_settings = SchedulerSettings.from_config(config)
        if not periodic_refresh:  # on demand only (refresh_now, first catalog request)
            scheduler_settings = dataclasses.replace(scheduler_settings, first_cycle_delay=math.inf)
        scheduler_actor = RefreshScheduler(
            store=store, clients=clients, tokens=tokens, settings=scheduler_settings,
            wall_clock=wall_clock,
        )
        scheduler: SchedulerHandle = await nursery.start(partial(
            supervise, "refresh scheduler", scheduler_actor.run, policy, on_exit=scheduler_actor.close
        ))
        proxy_handler = ProxyHandler(
            store=store, clients=clients, tokens=tokens,
            settings=ProxySettings.from_config(config), wall_clock=wall_clock,
            on_record=on_record,
        )
        proxy: ProxyHandle = await nursery.start(
            partial(supervise, "proxy handler", proxy_handler.run, policy, on_exit=proxy_handler.close)
        )
        engine = Engine(clients=clients, tokens=tokens, proxy=proxy, scheduler=scheduler,
                        store=store, network=watchers[0] if watchers else None,
                        auth_clients=auth_clients,
                        auth_network=watchers[1] if watchers else None)
        try:
            yield engine
        finally:
            # Periodic work stops first, then token writes finish (nothing lost), then
            # the clients drain their leases.
            with trio.move_on_after(STOP_GRACE, shield=True):
                await scheduler.shutdown()
            # As long as a refresh in flight may take (its answer is the only copy of the
            # new tokens): the auth clients must not be closed under it.
            with trio.move_on_after(tokens.shutdown_timeout + STOP_GRACE, shield=True):
                await tokens.shutdown()
            with trio.move_on_after(settings.shutdown_grace + 2 * STOP_GRACE, shield=True):
                async with trio.open_nursery() as closing:
                    closing.start_soon(clients.shutdown)
                    closing.start_soon(auth_clients.shutdown)
            nursery.cancel_scope.cancel()
