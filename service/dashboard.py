"""The dashboard page and the JSON routes behind it.

One page at ``/`` (and ``/dashboard``): server-rendered HTML that reads well without
JavaScript, plus service/static/dashboard.js that polls ``/api/dashboard`` and
``/api/requests`` every second and draws the charts with the vendored uPlot (see
service/static/VENDORED.md). No build step.

When proxy API keys are configured, the page itself carries no data: it asks for a key
(kept in sessionStorage, sent as ``Authorization: Bearer``, never put in a URL) and the
data routes stay behind the key like every other /api route. State-changing calls send
``x-csrf-token`` with the token embedded in the page.

The network timeline is kept here, in the service layer: a poller diffs the
ClientManager's rotation counters every second and remembers the last rotations with
their reasons, so the engine needs no event list of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from quart import Quart, Response, request, send_from_directory

from actors.errors import ActorUnavailable, ClientError, CodexLBError
from actors.supervisor import Engine
from service.config import Config
from service.dashboard_page import STATIC_DIR, render_page
from service.request_log import QueryError, RequestFilter, RequestLog

log = logging.getLogger("codex_lb_trio.dashboard")

STATIC_PREFIX = "/dashboard/static/"
PAGE_PATHS = frozenset({"/", "/dashboard"})
TIMELINE_SIZE = 200
POLL_INTERVAL = 1.0
SUMMARY_SECONDS = 3.0  # the page polls every second; the 24 h totals need not be fresher
DEVICE_LOGIN_SECONDS = 900.0
DEVICE_LOGINS_KEPT = 20
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
_ANNOUNCE = re.compile(r"Open (\S+) in a browser and enter this code:\s+(\S+)")


def is_public_page(path: str) -> bool:
    """The page shell and its static files need no key (they carry no data when keys are on)."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


# --- the network timeline and device logins (service-side state) ----------------------------


@dataclass(slots=True)
class RotationTimeline:
    """The last rotations seen, by diffing the client stats' per-reason counters."""

    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TIMELINE_SIZE))
    _seen: dict[str, int] = field(default_factory=dict)
    _generation: int | None = None

    def observe(self, stats: dict[str, Any], now: float) -> None:
        generation = int(stats.get("generation") or 0)
        previous = self._generation if self._generation is not None else generation
        for reason, count in sorted((stats.get("rotations") or {}).items()):
            delta = int(count) - self._seen.get(reason, 0)
            if delta > 0:
                self.events.append({"at": now, "reason": reason, "count": delta,
                                    "from_generation": previous, "generation": generation})
            self._seen[reason] = int(count)
        self._generation = generation

    def to_json(self) -> list[dict[str, Any]]:
        return list(reversed(self.events))  # newest first


@dataclass(slots=True)
class DeviceLogin:
    id: str
    state: str = "starting"  # starting, pending, done, failed
    verification_url: str = ""
    user_code: str = ""
    error: str = ""
    account: dict[str, Any] | None = None
    got_code: trio.Event = field(default_factory=trio.Event)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "verification_url": self.verification_url,
                "user_code": self.user_code, "error": self.error, "account": self.account}


class DashboardServices:
    """Background work for the page: the rotation poller and device logins in flight."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.timeline = RotationTimeline()
        self.logins: dict[str, DeviceLogin] = {}
        self._nursery: trio.Nursery | None = None

    async def poll_rotations(self) -> None:
        while True:
            with trio.move_on_after(5):
                try:
                    stats = (await self.engine.clients.stats()).to_json()
                except (ActorUnavailable, CodexLBError):
                    stats = None
                if stats is not None:
                    self.timeline.observe(stats, time.time())
            await trio.sleep(POLL_INTERVAL)

    async def start_device_login(self) -> DeviceLogin:
        if self._nursery is None:
            raise ActorUnavailable("the dashboard's background tasks are not running")
        login = DeviceLogin(id="dl_" + secrets.token_hex(8))
        while len(self.logins) >= DEVICE_LOGINS_KEPT:
            self.logins.pop(next(iter(self.logins)))
        self.logins[login.id] = login
        self._nursery.start_soon(self._device_login, login)
        with trio.move_on_after(30):
            await login.got_code.wait()
        return login

    async def _device_login(self, login: DeviceLogin) -> None:
        from service.login import LoginError, login_device

        def announce(text: str) -> None:
            match = _ANNOUNCE.search(text)
            if match:
                login.verification_url, login.user_code = match.group(1), match.group(2)
            login.state = "pending"
            login.got_code.set()

        try:
            async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
                result = await login_device(
                    self.engine.store, auth_base_url=self.config.upstream.auth_base_url,
                    client=client, announce=announce, timeout=DEVICE_LOGIN_SECONDS)
            login.account, login.state = result.account.public_json(), "done"
        except LoginError as exc:
            login.state, login.error = "failed", str(exc)
        except Exception as exc:  # a login's fault stays in that login
            log.warning("device login %s failed: %s", login.id, type(exc).__name__)
            login.state, login.error = "failed", f"device login failed ({type(exc).__name__})"
        finally:
            login.got_code.set()


@asynccontextmanager
async def open_dashboard_services(
    engine: Engine, config: Config,
) -> AsyncIterator[DashboardServices]:
    services = DashboardServices(engine, config)
    async with trio.open_nursery() as nursery:
        services._nursery = nursery
        nursery.start_soon(services.poll_rotations)
        try:
            yield services
        finally:
            nursery.cancel_scope.cancel()


# --- routes ----------------------------------------------------------------------------------


def register_dashboard(
    app: Quart, engine: Engine, config: Config, *, request_log: RequestLog | None = None,
    services: DashboardServices | None = None,
) -> None:
    # One token per process, shared with the app's request policy when it has one: browsers
    # send it as x-csrf-token with state-changing /api calls (see service/app.py).
    csrf_token = app.config.setdefault("CSRF_TOKEN", secrets.token_urlsafe(32))
    keys_required = bool(config.api_key_digests)
    services = services or DashboardServices(engine, config)
    cached: dict[str, Any] = {"at": -SUMMARY_SECONDS}

    async def log_summary(now: float) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The 24 h summary and last errors, recomputed at most every SUMMARY_SECONDS."""
        if request_log is None:
            return None, {}
        if trio.current_time() - cached["at"] >= SUMMARY_SECONDS:
            cached["summary"] = await request_log.summary(since=now - 86400)
            cached["last_errors"] = await request_log.last_errors()
            cached["at"] = trio.current_time()
        return cached["summary"], cached["last_errors"]

    async def state() -> dict[str, Any]:
        now = time.time()
        accounts = [a.public_json(now) for a in await engine.store.list_accounts()]
        try:
            proxy_stats = await engine.proxy.stats()
        except CodexLBError:
            proxy_stats = {}
        try:
            clients: dict[str, Any] | None = (await engine.clients.stats()).to_json()
        except CodexLBError:
            clients = None
        summary, last_errors = await log_summary(now)
        in_flight = proxy_stats.get("in_flight", {})
        for account in accounts:
            account["in_flight"] = in_flight.get(account["id"], 0)
            account["last_error"] = last_errors.get(account["id"])
            account["last_24h"] = (summary or {}).get("accounts", {}).get(account["id"])
        return {"now": now, "accounts": accounts, "clients": clients,
                "timeline": services.timeline.to_json(), "summary": summary,
                "proxy": proxy_stats, "log_enabled": request_log is not None}

    async def recent(filters: RequestFilter) -> dict[str, Any]:
        if request_log is None:
            return {"requests": [], "next_cursor": None}
        try:
            return await request_log.query(filters)
        except QueryError as exc:
            raise ClientError(str(exc), param="status") from None

    @app.get("/")
    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        filters = _filters(request.args)
        body = await render_page(
            keys_required=keys_required, csrf_token=csrf_token,
            data=None if keys_required else await state(),
            requests=None if keys_required else (await recent(filters))["requests"],
            filters=filters)
        response = Response(body, content_type="text/html; charset=utf-8")
        response.headers["content-security-policy"] = CSP
        response.headers["cache-control"] = "no-store"
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "no-referrer"
        return response

    @app.get(STATIC_PREFIX + "<path:name>")
    async def dashboard_static(name: str) -> Response:
        response = await send_from_directory(STATIC_DIR, name)
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        return response

    @app.get("/api/dashboard")
    async def dashboard_state() -> Response:
        return _json(await state())

    @app.get("/api/requests")
    async def requests_list() -> Response:
        return _json(await recent(_filters(request.args)))

    @app.get("/api/usage/history")
    async def usage_history() -> Response:
        if request_log is None:
            return _json({"hourly": None, "daily": None})
        return _json(await request_log.history())

    @app.get("/api/usage/summary")
    async def usage_summary() -> Response:
        since = _time_arg(request.args, "since")
        until = _time_arg(request.args, "until")
        if request_log is None:
            return _json({"accounts": {}, "total": {}})
        return _json(await request_log.summary(
            since=since if since is not None else time.time() - 86400, until=until))

    @app.post("/api/accounts/login/device")
    async def device_login_start() -> Response:
        login = await services.start_device_login()
        return _json(login.to_json(), 202)

    @app.get("/api/accounts/login/device/<login_id>")
    async def device_login_status(login_id: str) -> Response:
        login = services.logins.get(login_id)
        if login is None:
            err = ClientError(f"no device login {login_id!r}", status=404)
            err.code = "not_found"
            raise err
        return _json(login.to_json())


def _json(body: Any, status: int = 200) -> Response:
    import json

    return Response(json.dumps(body), status=status, content_type="application/json")


def _time_arg(args: Any, name: str) -> float | None:
    """Epoch seconds or an ISO 8601 time (a naive one is UTC)."""
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ClientError(f"{name} must be epoch seconds or an ISO 8601 time like "
                          "2026-01-31T12:00:00Z", param=name) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _filters(args: Any) -> RequestFilter:
    cursor = (args.get("cursor") or "").strip()
    limit = (args.get("limit") or "").strip()
    if cursor and not cursor.isdigit():
        raise ClientError("cursor must be the next_cursor of an earlier page", param="cursor")
    if limit and not limit.isdigit():
        raise ClientError("limit must be a whole number (at most 500)", param="limit")
    return RequestFilter(
        since=_time_arg(args, "since"), until=_time_arg(args, "until"),
        account=(args.get("account") or "").strip() or None,
        model=(args.get("model") or "").strip() or None,
        status=(args.get("status") or "").strip() or None,
        before_id=int(cursor) if cursor else None, limit=int(limit) if limit else 50,
    )
