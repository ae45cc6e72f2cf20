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
import html
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from quart import Quart, Response, request, send_from_directory

from actors.errors import ActorUnavailable, ClientError, CodexLBError
from actors.supervisor import Engine
from service.config import Config
from service.request_log import QueryError, RequestFilter, RequestLog

log = logging.getLogger("codex_lb_trio.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
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
        body = await _render_page(
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


# --- server-rendered HTML --------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def duration_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def status_text(account: dict[str, Any], now: float) -> str:
    status = str(account.get("status") or "unknown")
    if status == "cooling_down" and account.get("cooldown_until"):
        return f"cooling down until {_clock(account['cooldown_until'])}"
    if status == "reauth_required":
        return "re-login needed" + (f" ({account['status_reason']})"
                                    if account.get("status_reason") else "")
    return status.replace("_", " ")


def _when(epoch: float) -> str:
    """A row's time (UTC): the clock for today, with the date before it for older rows."""
    moment = dt.datetime.fromtimestamp(float(epoch), dt.UTC)
    today = dt.datetime.now(dt.UTC).date()
    return moment.strftime("%H:%M:%S" if moment.date() == today else "%m-%d %H:%M:%S")


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).strftime("%H:%M UTC")


def _window_html(window: dict[str, Any] | None, now: float) -> str:
    if not window:
        return '<span class="muted">unknown</span>'
    used = max(0.0, min(100.0, float(window.get("used_percent") or 0)))
    level = "high" if used >= 90 else "mid" if used >= 70 else "low"
    reset = window.get("reset_at")
    countdown = ""
    if reset:
        countdown = (f'<span class="countdown" data-reset-at="{_e(reset)}">resets in '
                     f'{duration_text(float(reset) - now)}</span>')
    return (f'<div class="bar {level}" role="meter" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{used:.0f}" aria-label="{used:.0f}% used">'
            f'<span style="width:{used:.1f}%"></span></div>'
            f'<span class="pct">{used:.0f}%</span> {countdown}')


def _credits_text(account: dict[str, Any]) -> str:
    credits = account.get("credits") or (account.get("usage") or {}).get("credits")
    if not isinstance(credits, dict):
        return "–"
    if credits.get("unlimited"):
        return "unlimited"
    if credits.get("balance") is not None:
        return str(credits["balance"])
    return "yes" if credits.get("has_credits") else "none"


def _account_rows(data: dict[str, Any]) -> str:
    now = data["now"]
    rows = []
    for a in data["accounts"]:
        usage = a.get("usage") or {}
        last = a.get("last_error")
        last_text = f"{last['code']} ({_when(last['at'])})" if last else "–"
        paused = a.get("status") == "paused"
        rows.append(
            f'<tr data-account="{_e(a["id"])}"><td><strong>{_e(a.get("email"))}</strong>'
            f'<br><small class="muted">{_e(a["id"])}</small></td><td>{_e(a.get("plan"))}</td>'
            f'<td class="status s-{_e(a.get("status"))}">{_e(status_text(a, now))}</td>'
            f'<td class="window">{_window_html(usage.get("primary"), now)}</td>'
            f'<td class="window">{_window_html(usage.get("secondary"), now)}</td>'
            f'<td>{_e(_credits_text(a))}</td><td class="num">{_e(a.get("in_flight", 0))}</td>'
            f'<td>{_e(last_text)}</td><td class="actions">'
            f'<button type="button" data-action="{"resume" if paused else "pause"}">'
            f'{"Resume" if paused else "Pause"}</button>'
            '<button type="button" data-action="refresh">Refresh tokens</button>'
            '<button type="button" data-action="remove" class="danger">Remove</button></td></tr>')
    if not rows:
        return ('<tr><td colspan="9" class="muted">No accounts yet: upload an auth.json below or '
                'run <code>codex-lb-trio accounts import</code>.</td></tr>')
    return "".join(rows)


def _request_rows(requests: list[dict[str, Any]]) -> str:
    if not requests:
        return '<tr><td colspan="10" class="muted">No requests in the log yet.</td></tr>'
    rows = []
    for r in requests:
        when = _when(r["started_at"])
        outcome = r["error_code"] or r["terminal"] or str(r["status"])
        bad = r["error_code"] or r["status"] >= 400 or r["terminal"] in ("response.failed", "error")
        ttfe = "–" if r["ttfe_ms"] is None else f"{r['ttfe_ms']:.0f} ms"
        rows.append(
            f'<tr data-request-id="{_e(r["request_id"])}"><td>{when}</td>'
            f'<td>{_e(r["account_id"])}</td><td>{_e(r["surface"])}</td><td>{_e(r["model"])}</td>'
            f'<td class="{"bad" if bad else "ok"}">{_e(outcome)}</td>'
            f'<td class="num">{r["attempts"]}/{r["failovers"]}</td>'
            f'<td class="num">{r["generation"]}</td><td class="num">{ttfe}</td>'
            f'<td class="num">{r["duration_ms"]:.0f} ms</td>'
            f'<td class="num">{r["input_tokens"]}/{r["output_tokens"]}</td></tr>')
    return "".join(rows)


def _network_html(data: dict[str, Any]) -> tuple[str, str]:
    clients = data.get("clients") or {}
    retired = {str(g) for g in clients.get("retired") or []}
    gens = [f'<tr><td>{_e(g)}</td><td>{"draining" if g in retired else "current"}</td>'
            f'<td class="num">{_e(n)}</td></tr>'
            for g, n in sorted((clients.get("leases") or {}).items(), key=lambda i: int(i[0]))]
    events = []
    for ev in data.get("timeline") or []:
        times = f" (×{ev['count']})" if ev["count"] > 1 else ""
        events.append(f'<li><time>{_clock(ev["at"])}</time> <span class="reason '
                      f'r-{_e(ev["reason"])}">{_e(ev["reason"])}</span> generation '
                      f'{_e(ev["from_generation"])} → {_e(ev["generation"])}{times}</li>')
    return ("".join(gens) or '<tr><td colspan="3" class="muted">unknown</td></tr>',
            "".join(events) or '<li class="muted">No rotation since the server started.</li>')


def _summary_html(data: dict[str, Any]) -> str:
    summary = data.get("summary") or {}
    total = summary.get("total") or {}
    ttfe = summary.get("ttfe_ms") or {}

    def ms(value: Any) -> str:
        return "–" if value is None else f"{value:.0f} ms"

    tokens = (total.get("input_tokens") or 0) + (total.get("output_tokens") or 0)
    tiles = [("Requests (24 h)", total.get("requests", 0), "requests"),
             ("Error rate", f"{100 * (summary.get('error_rate') or 0):.1f}%", "error-rate"),
             ("Tokens (24 h)", tokens, "tokens"),
             ("TTFE p50", ms(ttfe.get("p50")), "p50"), ("TTFE p90", ms(ttfe.get("p90")), "p90"),
             ("TTFE p99", ms(ttfe.get("p99")), "p99")]
    return "".join(f'<div class="tile"><span class="label">{_e(label)}</span>'
                   f'<span class="value" data-tile="{key}">{_e(value)}</span></div>'
                   for label, value, key in tiles)


def _filter_form(filters: RequestFilter, data: dict[str, Any] | None) -> str:
    accounts = [a["id"] for a in (data or {}).get("accounts", [])]
    options = '<option value="">all accounts</option>' + "".join(
        f'<option value="{_e(a)}"{" selected" if filters.account == a else ""}>{_e(a)}</option>'
        for a in accounts)
    statuses = "".join(
        f'<option value="{v}"{" selected" if (filters.status or "") == v else ""}>{label}</option>'
        for v, label in (("", "any status"), ("ok", "ok"), ("error", "errors"), ("429", "429")))
    return (
        '<form id="request-filters" method="get" action="/dashboard" class="filters">'
        f'<label>Account <select name="account">{options}</select></label>'
        f'<label>Status <select name="status">{statuses}</select></label>'
        f'<label>Model <input name="model" value="{_e(filters.model)}" size="12"></label>'
        '<button type="submit">Filter</button></form>')


async def _render_page(
    *, keys_required: bool, csrf_token: str, data: dict[str, Any] | None,
    requests: list[dict[str, Any]] | None, filters: RequestFilter,
) -> str:
    template = await trio.Path(STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")
    if data is None:
        generations, timeline = ('<tr><td colspan="3" class="muted">enter the key</td></tr>',
                                 '<li class="muted">enter the key</li>')
        accounts = ('<tr><td colspan="9" class="muted">Enter a proxy API key to see the pool.'
                    '</td></tr>')
        summary = ""
    else:
        generations, timeline = _network_html(data)
        accounts, summary = _account_rows(data), _summary_html(data)
    values = {
        "CSRF": _e(csrf_token), "KEYS": "true" if keys_required else "false",
        "ACCOUNT_ROWS": accounts, "SUMMARY": summary, "GENERATION_ROWS": generations,
        "TIMELINE": timeline, "FILTERS": _filter_form(filters, data),
        "REQUEST_ROWS": _request_rows(requests or []) if requests is not None else
        '<tr><td colspan="10" class="muted">Enter a proxy API key to see requests.</td></tr>',
        "GENERATION": _e((data or {}).get("clients", {}).get("generation", "?") if data else "?"),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), m.group(0)), template)
