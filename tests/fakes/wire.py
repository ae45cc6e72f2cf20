"""The bodies the fake upstream sends: response events, usage, models.

Pure functions of their arguments, so tests can build the expected values too.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

PRIMARY_WINDOW_MINUTES = 300  # the 5-hour window
SECONDARY_WINDOW_MINUTES = 10080  # the weekly window


@dataclass(slots=True, kw_only=True)
class UsageState:
    """One account's rate-limit windows as the fake reports them."""

    primary_used: float = 10.0
    primary_reset_at: float | None = None  # wall-clock epoch; None: a full window from now
    primary_window_minutes: int = PRIMARY_WINDOW_MINUTES
    secondary_used: float = 5.0
    secondary_reset_at: float | None = None
    secondary_window_minutes: int = SECONDARY_WINDOW_MINUTES
    has_credits: bool = False
    credits_balance: str = "0"
    credits_unlimited: bool = False
    # Additional limit families, as the backend reports them next to the main one:
    # header prefix (e.g. "codex-bengalfox") -> (limit name, primary used percent).
    extra_limits: dict[str, tuple[str, float]] = field(default_factory=dict)

    def window(self, which: str, now: float) -> tuple[float, int, int]:
        """(used_percent, reset_at epoch, window_minutes) for ``primary``/``secondary``."""
        used = self.primary_used if which == "primary" else self.secondary_used
        minutes = (
            self.primary_window_minutes if which == "primary" else self.secondary_window_minutes
        )
        reset_at = self.primary_reset_at if which == "primary" else self.secondary_reset_at
        if reset_at is None:
            reset_at = now + minutes * 60
        return used, int(reset_at), minutes


def usage_json(usage: UsageState, *, plan: str, now: float) -> dict[str, Any]:
    """The body of ``GET /wham/usage``."""

    def window(which: str) -> dict[str, Any]:
        used, reset_at, minutes = usage.window(which, now)
        return {
            "used_percent": used,
            "limit_window_seconds": minutes * 60,
            "reset_after_seconds": max(0, int(reset_at - now)),
            "reset_at": reset_at,
        }

    limit_reached = usage.primary_used >= 100.0 or usage.secondary_used >= 100.0
    return {
        "plan_type": plan,
        "rate_limit": {
            "allowed": not limit_reached,
            "limit_reached": limit_reached,
            "primary_window": window("primary"),
            "secondary_window": window("secondary"),
        },
        "credits": credits_json(usage),
    }


def credits_json(usage: UsageState) -> dict[str, Any]:
    return {
        "has_credits": usage.has_credits,
        "unlimited": usage.credits_unlimited,
        "balance": usage.credits_balance,
    }


def rate_limit_headers(usage: UsageState, *, now: float) -> dict[str, str]:
    """The ``x-codex-*`` headers that ride on every /codex/responses answer."""
    headers: dict[str, str] = {}
    for which in ("primary", "secondary"):
        used, reset_at, minutes = usage.window(which, now)
        headers[f"x-codex-{which}-used-percent"] = f"{used:g}"
        headers[f"x-codex-{which}-window-minutes"] = str(minutes)
        headers[f"x-codex-{which}-reset-at"] = str(reset_at)
    headers["x-codex-credits-has-credits"] = "true" if usage.has_credits else "false"
    headers["x-codex-credits-unlimited"] = "true" if usage.credits_unlimited else "false"
    headers["x-codex-credits-balance"] = usage.credits_balance
    for prefix, (limit_name, used) in usage.extra_limits.items():
        _, reset_at, minutes = usage.window("primary", now)
        headers[f"x-{prefix}-primary-used-percent"] = f"{used:g}"
        headers[f"x-{prefix}-primary-window-minutes"] = str(minutes)
        headers[f"x-{prefix}-primary-reset-at"] = str(reset_at)
        headers[f"x-{prefix}-limit-name"] = limit_name
    return headers


def rate_limits_event(usage: UsageState, *, plan: str, now: float) -> dict[str, Any]:
    """The ``codex.rate_limits`` event, the in-stream twin of the headers."""

    def window(which: str) -> dict[str, Any]:
        used, reset_at, minutes = usage.window(which, now)
        return {
            "used_percent": used,
            "window_minutes": minutes,
            "reset_after_seconds": max(0, int(reset_at - now)),
            "reset_at": reset_at,
        }

    limit_reached = usage.primary_used >= 100.0 or usage.secondary_used >= 100.0
    return {
        "type": "codex.rate_limits",
        "plan_type": plan,
        "rate_limits": {
            "allowed": not limit_reached,
            "limit_reached": limit_reached,
            "primary": window("primary"),
            "secondary": window("secondary"),
        },
        "credits": credits_json(usage),
    }


def split_deltas(text: str) -> list[str]:
    """Split the reply into word-sized deltas (each keeps its trailing whitespace)."""
    parts = re.findall(r"\s*\S+\s*", text)
    return parts or [text]


def response_events(
    *,
    text: str,
    model: str,
    created_at: int,
    input_tokens: int,
    rate_limits: dict[str, Any],
) -> list[dict[str, Any]]:
    """A complete successful turn: created ... deltas ... rate limits ... completed."""
    response_id = "resp_" + secrets.token_hex(8)
    item_id = "msg_" + secrets.token_hex(8)
    deltas = split_deltas(text)
    output_tokens = len(deltas)

    def response(status: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "model": model,
            "error": None,
            "incomplete_details": None,
            **extra,
        }

    part_done = {"type": "output_text", "text": text, "annotations": []}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part_done],
    }
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("in_progress", output=[])},
        {"type": "response.in_progress", "response": response("in_progress", output=[])},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item_done, "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            **at,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
        *({"type": "response.output_text.delta", **at, "delta": d} for d in deltas),
        {"type": "response.output_text.done", **at, "text": text},
        {"type": "response.content_part.done", **at, "part": part_done},
        {"type": "response.output_item.done", "output_index": 0, "item": item_done},
        rate_limits,
        {
            "type": "response.completed",
            "response": response("completed", output=[item_done], usage=usage),
        },
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def failed_event(*, code: str, message: str, model: str, created_at: int) -> dict[str, Any]:
    """A ``response.failed`` event carrying ``code`` (an error inside a 200 stream)."""
    return {
        "type": "response.failed",
        "sequence_number": 0,
        "response": {
            "id": "resp_" + secrets.token_hex(8),
            "object": "response",
            "created_at": created_at,
            "status": "failed",
            "model": model,
            "output": [],
            "error": {"code": code, "message": message or f"fake: {code}"},
        },
    }


def sse_frame(event: dict[str, Any]) -> bytes:
    """One server-sent event: ``event: <type>`` then ``data: <json>`` then a blank line."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def compacted_output(body: Any) -> list[dict[str, Any]]:
    """A compacted history: one user message summarising how many items came in."""
    items = body.get("input") if isinstance(body, dict) else None
    count = len(items) if isinstance(items, list) else 0
    return [
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": f"fake compaction summary of {count} items"}
            ],
        },
        {
            "type": "compaction_summary",
            "encrypted_content": "fake-" + secrets.token_hex(16),
        },
    ]


def _levels(*efforts: str) -> list[dict[str, str]]:
    return [{"effort": effort, "description": f"{effort} reasoning"} for effort in efforts]


def default_models() -> list[dict[str, Any]]:
    """Two models in the shape Codex CLI parses, plus fields the proxy does not know."""
    common: dict[str, Any] = {
        "shell_type": "shell_command",
        "visibility": "list",
        "supported_in_api": True,
        "upgrade": None,
        "base_instructions": "You are a helpful coding agent (fake upstream).",
        "supports_reasoning_summaries": True,
        "support_verbosity": False,
        "default_verbosity": None,
        "apply_patch_tool_type": "freeform",
        "truncation_policy": {"mode": "tokens", "limit": 10000},
        "supports_parallel_tool_calls": True,
        "context_window": 272000,
        "experimental_supported_tools": [],
        "input_modalities": ["text", "image"],
        "prefer_websockets": True,
        "minimal_client_version": "0.1.0",
    }
    return [
        {
            "slug": "gpt-5.1-codex",
            "display_name": "GPT-5.1 Codex (fake)",
            "description": "The fake upstream's main model.",
            "default_reasoning_level": "medium",
            "supported_reasoning_levels": _levels("low", "medium", "high"),
            "priority": 1,
            **common,
            "x_fake_future_field": {"nested": [1, 2, 3], "note": "proxies must pass this through"},
        },
        {
            "slug": "gpt-5.1-codex-mini",
            "display_name": "GPT-5.1 Codex Mini (fake)",
            "description": "A smaller fake model.",
            "default_reasoning_level": "low",
            "supported_reasoning_levels": _levels("low", "medium"),
            "priority": 2,
            **common,
            "x_fake_rollout": "beta",
        },
    ]
