"""``codex-lb-trio status``: ask the running server about its accounts and clients.

A plain synchronous httpx client (the command runs outside any trio program): it reads
``GET /api/accounts`` and ``GET /api/clients`` and prints one block per account with its
usage windows as bars, then the upstream client generations. Every failure is one line on
``err`` and exit code 1; no traceback.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from typing import Any, TextIO

import httpx

TIMEOUT = 5.0
BAR_CELLS = 10


def printable(value: object) -> str:
    """Text safe for a terminal: control, format and unpaired surrogate characters escaped.

    Emails and ids come from imported tokens; an escape sequence in one could clear the
    screen or forge lines of our output.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class StatusError(Exception):
    """Why the status could not be shown, in one line."""


def run_status(
    base_url: str,
    *,
    api_key: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print the server's accounts, usage and client generations; the exit code."""
    base_url = base_url.rstrip("/")
    headers = {"accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT,
                          trust_env=False) as client:
            accounts = _accounts(_get(client, base_url, "/api/accounts"))
            clients = _get(client, base_url, "/api/clients")
            today = _today(client)
    except StatusError as exc:
        print(f"codex-lb-trio: {exc}", file=err)
        return 1
    now = time.time()
    lines = [f"codex-lb-trio at {base_url}", "", f"accounts ({len(accounts)})"]
    if not accounts:
        lines.append("  none yet: add one with `codex-lb-trio accounts import` or `accounts login`")
    for account in accounts:
        lines += _account_lines(account, now)
        if today is not None:
            lines.append(_today_line(_dict(today.get(str(account.get("id"))))))
    lines += ["", *_client_lines(clients)]
    print("\n".join(lines), file=out)
    return 0


def _get(client: httpx.Client, base_url: str, path: str) -> Any:
    try:
        response = client.get(path)
    except httpx.ConnectError:
        raise StatusError(
            f"no server answering at {base_url} (start it with codex-lb-trio serve)"
        ) from None
    except httpx.TimeoutException:
        raise StatusError(f"the server at {base_url} did not answer within {TIMEOUT:g}s") from None
    except httpx.HTTPError as exc:
        raise StatusError(f"cannot reach {base_url}: {type(exc).__name__}") from None
    if response.status_code == 401:
        raise StatusError(f"the server at {base_url} wants a proxy API key (see [auth] api_keys)")
    if response.status_code != 200:
        raise StatusError(f"GET {path} answered HTTP {response.status_code}: {_message(response)}")
    try:
        return response.json()
    except ValueError:
        raise StatusError(f"GET {path} answered something that is not JSON") from None


def _today(client: httpx.Client) -> dict[str, Any] | None:
    """Per-account totals since local midnight from the request log (None if unavailable)."""
    midnight = dt.datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    try:
        response = client.get("/api/usage/summary", params={"since": f"{midnight:.0f}"})
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    accounts = body.get("accounts") if isinstance(body, dict) else None
    return accounts if isinstance(accounts, dict) else None


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _today_line(totals: dict[str, Any]) -> str:
    requests, errors = _count(totals.get("requests")), _count(totals.get("errors"))
    tokens = _count(totals.get("input_tokens")) + _count(totals.get("output_tokens"))
    return (f"    {'today':<9} {requests} request{'s' * (requests != 1)}, "
            f"{errors} error{'s' * (errors != 1)}, {tokens} tokens")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return printable(response.text.strip()[:200]) or "no details"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return printable(error["message"])
    return "no details"


def _accounts(body: Any) -> list[dict[str, Any]]:
    accounts = body.get("accounts") if isinstance(body, dict) else body
    if not isinstance(accounts, list):
        raise StatusError("GET /api/accounts answered an unexpected shape")
    return [a for a in accounts if isinstance(a, dict)]


def usage_bar(used_percent: float) -> str:
    """``[#####-----]  52%``: ten cells, one per 10 %."""
    clamped = max(0.0, min(100.0, used_percent))
    filled = int(clamped / 100 * BAR_CELLS + 0.5)
    return f"[{'#' * filled}{'-' * (BAR_CELLS - filled)}] {used_percent:3.0f}%"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) and abs(number) < 1e12 else None
    return None


def _account_lines(account: dict[str, Any], now: float) -> list[str]:
    status = printable(account.get("status") or "unknown")
    reason = account.get("status_reason")
    if reason and status in ("reauth_required", "deactivated"):
        status += f" ({printable(reason)})"
    cooldown = _number(account.get("cooldown_until"))
    if cooldown is not None and cooldown > now:
        local = dt.datetime.fromtimestamp(cooldown).strftime("%H:%M")
        status += f" until {local} (in {_duration(cooldown - now)})"
    head = "  ".join(printable(account.get(k) or "-") for k in ("id", "email", "plan"))
    lines = [f"  {head}  {status}"]
    usage = _dict(account.get("usage"))
    windows = _window_lines(usage, now, indent="    ")
    lines += windows or ["    usage not known yet"]
    credits = _dict(usage.get("credits"))
    if credits:
        lines.append("    " + _credits_line(credits, _plan_spent(usage, now)))
    for family in usage.get("families") or []:
        if not isinstance(family, dict):
            continue
        lines.append(f"    {family.get('limit_name') or family.get('name') or 'limit'}:")
        lines += _window_lines(family, now, indent="      ")
    return lines


def _window_lines(usage: dict[str, Any], now: float, *, indent: str) -> list[str]:
    lines = []
    for name in ("primary", "secondary"):
        window = usage.get(name)
        used = _number(window.get("used_percent")) if isinstance(window, dict) else None
        if used is None:
            continue
        line = f"{indent}{name:<9} {usage_bar(used)}"
        reset_at = _number(window.get("reset_at")) if isinstance(window, dict) else None
        if reset_at is not None:
            line += f"  resets in {_duration(reset_at - now)}" if reset_at > now else "  reset"
        lines.append(line)
    return lines


def _plan_spent(usage: dict[str, Any], now: float) -> bool:
    """Whether a plan window is used up and has not reset yet."""
    for name in ("primary", "secondary"):
        window = _dict(usage.get(name))
        used, reset_at = _number(window.get("used_percent")), _number(window.get("reset_at"))
        if used is not None and used >= 100.0 and (reset_at is None or reset_at > now):
            return True
    return False


def _credits_line(credits: dict[str, Any], plan_spent: bool) -> str:
    if credits.get("unlimited"):
        text = "credits   unlimited"
    elif credits.get("has_credits"):
        text = f"credits   balance {credits.get('balance') or '?'}"
    else:
        text = "credits   none"
    usable = bool(credits.get("unlimited") or credits.get("has_credits"))
    if plan_spent:
        text += ("  (plan limit reached; still usable on credits)" if usable
                 else "  (plan limit reached; no credits: waits for the reset)")
    return text


def _client_lines(clients: Any) -> list[str]:
    if not isinstance(clients, dict):
        return ["clients: unexpected answer from /api/clients"]
    current = clients.get("generation")
    leases = _dict(clients.get("leases"))
    retired = {str(g) for g in clients.get("retired") or []}
    lines = [f"upstream clients: generation {printable(current)}"]
    for generation, held in sorted(leases.items(), key=lambda item: int(item[0])):
        role = "retired, draining" if generation in retired else "current"
        lines.append(printable(f"  generation {generation}  {role}  leases={held}"))
    rotations = _dict(clients.get("rotations"))
    summary = ", ".join(f"{reason}={n}" for reason, n in sorted(rotations.items())) or "none"
    lines.append(printable(
        f"  rotations: {summary}; force-closes: {clients.get('force_closes', 0)}"))
    return lines
