"""The root nursery of the standalone program.

Start order: store, actors, then hypercorn. Stop order on SIGINT/SIGTERM (or the
``shutdown`` event): hypercorn stops accepting and lets in-flight requests finish for
up to ``server.drain_seconds``; then the actors stop (the clients drain their leases
for up to ``client.shutdown_grace``); then the store closes.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from actors.supervisor import Engine, open_actors
from service.app import create_app
from service.config import Config, ConfigError, is_loopback
from service.dashboard import open_dashboard_services
from service.request_log import open_request_log

log = logging.getLogger("codex_lb_trio.server")


def check_exposure(config: Config) -> None:
    """Refuse to listen beyond loopback without a proxy API key."""
    if not is_loopback(config.server.host) and not config.auth.api_keys:
        raise ConfigError(
            f"config key server.host: {config.server.host!r} is reachable from other machines; "
            "set [auth] api_keys = [\"...\"] first (or bind 127.0.0.1)"
        )
    wildcard = config.server.host in ("0.0.0.0", "::", "[::]")
    if wildcard and not config.server.allowed_hosts and not config.server.trust_any_host:
        log.warning(
            "listening on %s, but only loopback names are served: list the names or addresses "
            "other machines use in server.allowed_hosts (README, Security)", config.server.host
        )


async def open_default_store(config: Config) -> Any:
    """The embedded SQLite store in the data dir."""
    from service.store import SQLiteAccountStore

    return await SQLiteAccountStore.open(config.home)


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    store: Any = None,
    engine_options: dict[str, Any] | None = None,
    on_listening: Callable[[list[str], Engine], None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``shutdown`` is set or a signal arrives.

    Reports the bound URLs through ``task_status.started()``; ``on_listening`` also
    gets the engine (embedding code and tests use it to read actor stats).
    """
    check_exposure(config)
    shutdown = shutdown if shutdown is not None else trio.Event()
    async with AsyncExitStack() as stack:
        if store is None:
            store = await open_default_store(config)
            stack.push_async_callback(store.aclose)
        request_log = await stack.enter_async_context(
            open_request_log(config.home, retention_days=config.storage.request_log_days)
        )
        engine = await stack.enter_async_context(
            open_actors(config, store, on_record=request_log.record, **(engine_options or {}))
        )
        dashboard = await stack.enter_async_context(open_dashboard_services(engine, config))
        app = create_app(engine, config, store=store, request_log=request_log, dashboard=dashboard)
        hyper = HypercornConfig()
        hyper.bind = [f"{config.server.host}:{config.server.port}"]
        hyper.graceful_timeout = config.server.drain_seconds
        hyper.accesslog = None
        hyper.errorlog = logging.getLogger("codex_lb_trio.hypercorn")
        hyper.keep_alive_timeout = 75
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(_wait_for_signals, shutdown)
            # hypercorn's serve returns once the trigger fired and its connections
            # finished (or drain_seconds passed): this nursery's end is the drain.
            async with trio.open_nursery() as web:
                urls = await web.start(
                    partial(hypercorn_serve, app, hyper, shutdown_trigger=_announce(shutdown))
                )
                log.info("codex-lb-trio listening on %s", " ".join(urls))
                if on_listening is not None:
                    on_listening(urls, engine)
                task_status.started(urls)
            outer.cancel_scope.cancel()
        log.info("requests drained; stopping actors")
    log.info("stopped")


def _announce(shutdown: trio.Event) -> Callable[[], Any]:
    async def trigger() -> None:
        await shutdown.wait()
        log.info("shutting down: no new connections, draining requests")

    return trigger


async def _wait_for_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received", signal.Signals(signum).name)
            shutdown.set()
