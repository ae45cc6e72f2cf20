"""The dashboard's server-rendered HTML: the page reads without JavaScript.

Split from service/dashboard.py (routes and background work). Every value goes through
``html.escape``; the template is service/static/dashboard.html with ``{{NAME}}`` slots,
filled in one pass (a value is never scanned for slots again).
"""

from __future__ import annotations

import datetime as dt
import html
import re
from pathlib import Path
from typing import Any

import trio

from service.request_log import RequestFilter

STATIC_DIR = Path(__file__).resolve().parent / "static"


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
    if credits.get("has_credits"):
        return f"balance {credits.get('balance') or '?'}"
    return "none"


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
    dead = {str(g) for g in clients.get("dead") or []}  # path proven dead (when published)

    def role(g: str) -> str:
        return ("draining" if g in retired else "current") + (", path dead" if g in dead else "")

    gens = [f'<tr><td>{_e(g)}</td><td>{role(g)}</td><td class="num">{_e(n)}</td></tr>'
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


async def render_page(
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
