"""One row of the request log: what happened to one request or WebSocket turn.

The engine knows what happened (which account, how many attempts, when the first event
left, what the terminal event said) but must not know where it is kept: the ProxyHandler
fills a ``RequestStats`` along the way and hands a frozen ``RequestRecord`` to an optional
synchronous sink (``on_record``) when the request ends. The service wires the sink to
the request log (service/request_log.py), which batches rows off the request path.
No I/O here, and nothing that would pull SQLite or Quart into actors/.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Surface:
    """Where a request came in (a plain string in the record, so the log stays open)."""

    CODEX_HTTP = "codex_http"
    CODEX_WEBSOCKET = "codex_ws"
    V1_RESPONSES = "v1_responses"
    CHAT = "chat"
    COMPACT = "compact"
    TRANSCRIBE = "transcribe"
    MODELS = "models"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One finished request (or WebSocket turn), as the log and the metrics see it."""

    started_at: float  # wall clock, epoch seconds
    request_id: str
    surface: str
    model: str = ""
    account_id: str = ""
    client: str = ""  # API key name, else a short hash of the session id; never a secret
    status: int = 0  # HTTP status the client got (200 for a committed stream)
    terminal: str = ""  # the terminal event type of a stream, "" when none was seen
    error_code: str = ""
    attempts: int = 0
    failovers: int = 0
    generation: int = 0  # the client generation of the last attempt
    ttfe_ms: float | None = None  # time to the first event (or header answer) sent on
    duration_ms: float = 0.0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cooldown_accounts: tuple[str, ...] = ()  # accounts put in cooldown by this request

    @property
    def is_error(self) -> bool:
        return bool(self.error_code) or self.status >= 400 or self.terminal in (
            "response.failed", "error")


RecordSink = Callable[[RequestRecord], None]


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def client_label(sticky_key: str | None) -> str:
    """A short, stable, non-reversible label for the client's session (never the key)."""
    if not sticky_key:
        return ""
    return "s:" + hashlib.sha256(sticky_key.encode()).hexdigest()[:10]


@dataclass(slots=True, kw_only=True)
class RequestStats:
    """Filled along one request's way through the proxy; turned into a record at its end.

    Times are trio clock readings (``started``, ``first_event``) plus one wall-clock
    reading for the row's timestamp.
    """

    surface: str
    started_wall: float
    started: float
    request_id: str = field(default_factory=new_request_id)
    model: str = ""
    client: str = ""
    account_id: str = ""
    attempts: int = 0
    failovers: int = 0
    generation: int = 0
    first_event: float | None = None
    ended: float | None = None  # when the client had its answer (else: when the task ended)
    status: int = 0
    terminal: str = ""
    error_code: str = ""
    usage: Mapping[str, Any] | None = None
    cooldowns: list[str] = field(default_factory=list)

    def mark_first_event(self, now: float) -> None:
        if self.first_event is None:
            self.first_event = now

    def note_terminal(self, event_type: str, payload: Mapping[str, Any] | None) -> None:
        """Remember a terminal event's type, its error code and its usage."""
        self.terminal = event_type
        response = payload.get("response") if payload else None
        if isinstance(response, Mapping):
            usage = response.get("usage")
            if isinstance(usage, Mapping):
                self.usage = usage
            error = response.get("error")
            if isinstance(error, Mapping) and error.get("code") and not self.error_code:
                self.error_code = str(error["code"])
        if event_type == "error" and payload and not self.error_code:
            error = payload.get("error")
            code = error.get("code") if isinstance(error, Mapping) else payload.get("code")
            self.error_code = str(code or "error")

    def record(self, now: float) -> RequestRecord:
        tokens = usage_tokens(self.usage)
        return RequestRecord(
            started_at=self.started_wall, request_id=self.request_id, surface=self.surface,
            model=self.model, account_id=self.account_id, client=self.client,
            status=self.status, terminal=self.terminal, error_code=self.error_code,
            attempts=self.attempts, failovers=self.failovers, generation=self.generation,
            ttfe_ms=None if self.first_event is None else (self.first_event - self.started) * 1000,
            duration_ms=max(0.0, (now if self.ended is None else self.ended) - self.started) * 1000,
            cooldown_accounts=tuple(self.cooldowns), **tokens,
        )


def usage_tokens(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Token counts from a Responses ``usage`` object (missing or odd fields count 0)."""

    def number(container: Any, key: str) -> int:
        value = container.get(key) if isinstance(container, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return 0

    usage = usage or {}
    return {
        "input_tokens": number(usage, "input_tokens"),
        "cached_input_tokens": number(usage.get("input_tokens_details"), "cached_tokens"),
        "output_tokens": number(usage, "output_tokens"),
        "reasoning_tokens": number(usage.get("output_tokens_details"), "reasoning_tokens"),
    }
