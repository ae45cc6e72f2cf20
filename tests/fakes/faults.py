"""Faults the fake upstream injects, and the per-account queues that hold them.

A ``Fault`` is a plain value: tests build one with a constructor (``Fault.rate_limited()``,
``Fault.stop_midway(3)``...) and queue it with ``FakeUpstream.fault(account, endpoint, fault)``.
The same value travels through the HTTP control API as JSON (``to_json``/``from_json``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

ANY_ACCOUNT = "*"

# "ws" faults are taken at the next opportunity: the upgrade takes HTTP-status kinds,
# a turn takes any kind (see tests/README.md).
ENDPOINTS = frozenset({"responses", "models", "usage", "token", "compact", "ws", "transcribe"})

StopMode = Literal["silent", "close"]
TokenErrorShape = Literal["nested", "oauth", "error_code", "code"]


class FaultKind(enum.StrEnum):
    STATUS = "status"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    SERVER_ERROR = "server_error"
    SLOW_HEADERS = "slow_headers"
    STOP_MIDWAY = "stop_midway"
    TOKEN_ERROR = "token_error"
    INVALID_PAYLOAD = "invalid_payload"
    STREAM_FAILED = "stream_failed"


# Kinds answered with an error status instead of the normal answer (nothing is processed).
ERROR_STATUS_KINDS = frozenset(
    {
        FaultKind.STATUS,
        FaultKind.RATE_LIMITED,
        FaultKind.UNAUTHORIZED,
        FaultKind.SERVER_ERROR,
        FaultKind.TOKEN_ERROR,
    }
)
# Kinds a WebSocket upgrade can act on: the ones that need no stream to exist yet.
HANDSHAKE_KINDS = ERROR_STATUS_KINDS | {FaultKind.SLOW_HEADERS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One injected misbehaviour. Build it with the class-method constructors."""

    kind: FaultKind
    http_status: int = 200
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    after_events: int = 0
    mode: StopMode = "silent"
    code: str = ""
    message: str = ""
    shape: TokenErrorShape = "nested"
    resets_at: float | None = None
    error_type: str = ""

    # --- constructors -------------------------------------------------------------

    @classmethod
    def status(
        cls, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Fault:
        """Answer with ``status`` and ``body`` (JSON value, or str sent as text)."""
        return cls(
            kind=FaultKind.STATUS,
            http_status=status,
            body=body,
            headers=tuple((headers or {}).items()),
        )

    @classmethod
    def rate_limited(
        cls,
        resets_at: float | None = None,
        type: str = "usage_limit_reached",  # noqa: A002 - mirrors the upstream field name
        message: str = "The usage limit has been reached",
    ) -> Fault:
        """429 ``{"error":{"type","resets_at","resets_in_seconds","message"}}``.

        ``resets_at`` is wall-clock epoch seconds; default five minutes after the request.
        """
        return cls(
            kind=FaultKind.RATE_LIMITED,
            http_status=429,
            resets_at=resets_at,
            error_type=type,
            message=message,
        )

    @classmethod
    def unauthorized(cls, code: str = "token_invalidated") -> Fault:
        """401 as if the access token were rejected (the tokens stay valid)."""
        return cls(kind=FaultKind.UNAUTHORIZED, http_status=401, code=code)

    @classmethod
    def server_error(cls, status: int = 500, code: str = "server_error") -> Fault:
        return cls(kind=FaultKind.SERVER_ERROR, http_status=status, code=code)

    @classmethod
    def slow_headers(cls, seconds: float) -> Fault:
        """Sleep ``seconds`` before the status line (after doing the work, for /oauth/token)."""
        return cls(kind=FaultKind.SLOW_HEADERS, seconds=seconds)

    @classmethod
    def stop_midway(cls, after_events: int = 3, mode: StopMode = "silent") -> Fault:
        """Send ``after_events`` events (JSON bodies: half the body), then hang or drop."""
        if mode not in ("silent", "close"):
            raise ValueError(f"stop_midway mode must be 'silent' or 'close', not {mode!r}")
        return cls(kind=FaultKind.STOP_MIDWAY, after_events=after_events, mode=mode)

    @classmethod
    def token_error(
        cls,
        code: str = "refresh_token_reused",
        status: int = 401,
        shape: TokenErrorShape = "nested",
        message: str = "",
    ) -> Fault:
        """An /oauth/token error in one of the body shapes of PROTOCOL.md.

        ``nested``: ``{"error":{"code","message"}}``; ``oauth``: ``{"error","error_description"}``;
        ``error_code``: ``{"error_code"}``; ``code``: ``{"code"}``.
        """
        return cls(
            kind=FaultKind.TOKEN_ERROR, http_status=status, code=code, shape=shape, message=message
        )

    @classmethod
    def invalid_payload(cls) -> Fault:
        """200 with a JSON body lacking the key the client needs (``models``, tokens...)."""
        return cls(kind=FaultKind.INVALID_PAYLOAD)

    @classmethod
    def stream_failed(cls, code: str = "server_is_overloaded", message: str = "", *,
                      after_events: int = 0, resets_at: float | None = None) -> Fault:
        """A 200 stream ending in ``response.failed`` with ``code``: its first (and only)
        event, or after ``after_events`` normal ones; ``resets_at`` goes in the error."""
        return cls(kind=FaultKind.STREAM_FAILED, code=code, message=message,
                   after_events=after_events, resets_at=resets_at)

    # --- rendering ----------------------------------------------------------------

    def error_body(self, now: float | None = None) -> Any:
        """The JSON body for the error-status kinds."""
        now = time.time() if now is None else now
        match self.kind:
            case FaultKind.STATUS:
                return self.body
            case FaultKind.RATE_LIMITED:
                resets_at = self.resets_at if self.resets_at is not None else now + 300.0
                return {
                    "error": {
                        "type": self.error_type,
                        "message": self.message,
                        "resets_at": int(resets_at),
                        "resets_in_seconds": max(0, int(resets_at - now)),
                    }
                }
            case FaultKind.UNAUTHORIZED:
                return {
                    "error": {
                        "code": self.code,
                        "message": "fake: access token rejected",
                        "type": "invalid_request_error",
                    }
                }
            case FaultKind.SERVER_ERROR:
                return {"error": {"code": self.code, "message": "fake: internal server error"}}
            case FaultKind.TOKEN_ERROR:
                message = self.message or f"fake: {self.code}"
                match self.shape:
                    case "nested":
                        return {"error": {"code": self.code, "message": message}}
                    case "oauth":
                        return {"error": self.code, "error_description": message}
                    case "error_code":
                        return {"error_code": self.code}
                    case "code":
                        return {"code": self.code}
        raise ValueError(f"{self.kind} has no error body")

    # --- JSON (the HTTP control API) ------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if f.name == "headers" else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build from ``{"kind": ..., <field>: ...}``; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("a fault needs a 'kind'")
        values = dict(data)
        values["kind"] = FaultKind(values["kind"])
        if "headers" in values:
            values["headers"] = tuple(dict(values["headers"] or {}).items())
        return cls(**values)


@dataclass(slots=True)
class _Queued:
    fault: Fault
    remaining: int | None  # None: every matching request until cleared


@dataclass(slots=True)
class FaultBook:
    """Queues of faults per (account, endpoint); an account of ``"*"`` matches any request."""

    _queues: dict[tuple[str, str], deque[_Queued]] = field(default_factory=dict)

    def add(self, account: str, endpoint: str, fault: Fault, times: int | None = 1) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for every request)")
        self._queues.setdefault((account, endpoint), deque()).append(_Queued(fault, times))

    def take(
        self,
        account: str | None,
        endpoint: str,
        accept: Callable[[Fault], bool] = lambda _fault: True,
    ) -> Fault | None:
        """Consume the next fault for this request, if its head is one ``accept`` allows.

        The account's own queue goes first, then the ``"*"`` queue.
        """
        keys = [(account, endpoint)] if account else []
        keys.append((ANY_ACCOUNT, endpoint))
        for key in keys:
            queue = self._queues.get(key)
            if not queue or not accept(queue[0].fault):
                continue
            head = queue[0]
            if head.remaining is not None:
                head.remaining -= 1
                if head.remaining == 0:
                    queue.popleft()
            return head.fault
        return None

    def pending(self) -> dict[str, int]:
        """How many queued faults remain per ``account/endpoint`` (unbounded ones count 1)."""
        out: dict[str, int] = {}
        for (account, endpoint), queue in self._queues.items():
            if queue:
                out[f"{account}/{endpoint}"] = sum(q.remaining or 1 for q in queue)
        return out

    def clear(self) -> None:
        self._queues.clear()
