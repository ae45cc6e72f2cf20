"""The error tree and the one ``classify(exc)`` every caller uses.

::

    CodexLBError
     ├── TransportError          no HTTP answer: connect, read, timeout, reset, DNS.
     │                            The only kind that rotates the upstream client.
     ├── UpstreamError           the upstream answered, with a failure
     │    ├── RateLimited         429 / usage_limit_reached; carries resets_at
     │    ├── QuotaExceeded       insufficient_quota, usage_not_included, ...
     │    ├── AuthExpired         401: refresh the access token once and retry
     │    ├── PermanentAuth       the account needs a new login (or is deactivated)
     │    ├── ServerError         5xx, server_is_overloaded, "at capacity"
     │    └── UpstreamRejected    any other 4xx
     ├── PoolExhausted           our own connection pool is full: local capacity, not the
 │                            network; never rotates
 ├── InvalidResponse         an answer we cannot use (bad JSON, missing fields)
     ├── ClientError             bad input from our own client → a 4xx to it
     ├── ActorUnavailable        an actor died under a request, or is shut down
     └── UnexpectedError         anything else (a bug): logged with its traceback

``pre_dispatch`` on a TransportError means no byte of the upstream's answer has
reached our client yet (the failure happened while connecting, sending, or waiting
for response headers), so the proxy may still replay the request. ``path_dead``
means the failure hints that the path is gone (a reset, a connect timeout, or a wait
cut because the generation was already proven dead) rather than the peer refusing; a
plain header timeout does not set it. On its own it marks nothing: the ClientManager
decides path health from corroborated evidence (actors/client_manager.py).
"""

from __future__ import annotations

import enum
import errno
import socket
from typing import Any

import httpx

REAUTH_CODES = frozenset(
    {
        "refresh_token_expired",
        "refresh_token_reused",
        "refresh_token_invalidated",
        "invalid_grant",
        "token_invalidated",
        "token_expired",
        "app_session_terminated",
        "account_session_expired",
        "account_auth_invalidated",
        "token_revoked",
    }
)
DEACTIVATED_CODES = frozenset({"account_deactivated", "account_suspended", "account_deleted"})
QUOTA_CODES = frozenset({"insufficient_quota", "usage_not_included", "quota_exceeded"})
RATE_LIMIT_CODES = frozenset({"usage_limit_reached", "rate_limit_exceeded"})
OVERLOAD_CODES = frozenset({"server_is_overloaded", "server_error", "overloaded"})


class Phase(enum.StrEnum):
    """Where in an upstream exchange a transport failure struck."""

    CONNECT = "connect"
    SEND = "send"
    HEADERS = "headers"
    BODY = "body"


class CodexLBError(Exception):
    """Base of every error this project raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(CodexLBError):
    """No (complete) HTTP answer: the network path or the peer failed."""

    code = "upstream_connection_lost"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        phase: Phase,
        path_dead: bool = False,
        generation: int | None = None,
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.path_dead = path_dead
        self.generation = generation

    @property
    def pre_dispatch(self) -> bool:
        return self.phase is not Phase.BODY


class UpstreamError(CodexLBError):
    """The upstream answered with a failure status or error event."""

    http_status = 502

    def __init__(self, message: str, *, status: int, code: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body


class RateLimited(UpstreamError):
    http_status = 429

    def __init__(
        self, message: str, *, status: int, code: str, resets_at: float | None, body: Any = None
    ) -> None:
        super().__init__(message, status=status, code=code, body=body)
        self.resets_at = resets_at


class QuotaExceeded(UpstreamError):
    http_status = 429


class AuthExpired(UpstreamError):
    http_status = 401


class PermanentAuth(UpstreamError):
    """The refresh token is dead: the account must log in again (or is gone)."""

    http_status = 401

    @property
    def deactivated(self) -> bool:
        return self.code in DEACTIVATED_CODES


class ServerError(UpstreamError):
    http_status = 502


class UpstreamRejected(UpstreamError):
    http_status = 502


class PoolExhausted(CodexLBError):
    """No free connection in our own pool (httpx.PoolTimeout): busy, not broken."""

    code = "upstream_pool_full"
    http_status = 503


class InvalidResponse(CodexLBError):
    code = "invalid_upstream_response"
    http_status = 502


class ClientError(CodexLBError):
    """Bad input from our own client; answered with a 4xx in OpenAI's error shape."""

    code = "invalid_request_error"
    http_status = 400

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.param = param


class ActorUnavailable(CodexLBError):
    """An actor died while handling a request, did not answer in time, or is shut down."""

    code = "service_unavailable"
    http_status = 503


class UnexpectedError(CodexLBError):
    """Something we did not plan for; the original exception is ``__cause__``."""


# --- classification -----------------------------------------------------------

_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


def _error_code(body: Any, status: int) -> str:
    """The upstream's error code, looked up in PROTOCOL.md's order."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            for key in ("code", "error", "type"):
                value = err.get(key)
                if isinstance(value, str) and value:
                    return value
        if isinstance(err, str) and err:
            return err
        for key in ("error_code", "code"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    return f"http_{status}"


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        for key in ("error_description", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return ""


def from_status(status: int, body: Any, *, now: float, retry_after: str | None = None) -> UpstreamError:
    """Turn a failed HTTP answer (status + parsed JSON body or None) into the tree."""
    code = _error_code(body, status)
    message = _error_message(body) or f"upstream answered HTTP {status}"
    if code in REAUTH_CODES or code in DEACTIVATED_CODES:
        return PermanentAuth(message, status=status, code=code, body=body)
    if code in QUOTA_CODES:
        return QuotaExceeded(message, status=status, code=code, body=body)
    if status == 429 or code in RATE_LIMIT_CODES:
        return RateLimited(
            message, status=status, code=code, resets_at=_resets_at(body, now, retry_after), body=body
        )
    if status == 401:
        return AuthExpired(message, status=status, code=code, body=body)
    if status >= 500 or code in OVERLOAD_CODES or "at capacity" in message.lower():
        return ServerError(message, status=status, code=code, body=body)
    return UpstreamRejected(message, status=status, code=code, body=body)


def _resets_at(body: Any, now: float, retry_after: str | None) -> float | None:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        resets_at = err.get("resets_at")
        if isinstance(resets_at, int | float) and not isinstance(resets_at, bool):
            return float(resets_at)
        resets_in = err.get("resets_in_seconds")
        if isinstance(resets_in, int | float) and not isinstance(resets_in, bool):
            return now + float(resets_in)
    if retry_after:
        try:
            return now + float(retry_after)
        except ValueError:
            return None
    return None


def classify(exc: BaseException, *, phase: Phase | None = None, generation: int | None = None) -> CodexLBError:
    """Map any exception raised by an upstream exchange onto the error tree.

    ``phase`` says where the exchange was when it failed, if the caller knows;
    httpx cannot tell a read timeout while waiting for headers from one mid-body.
    """
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return classify(exc.exceptions[0], phase=phase, generation=generation)
    if isinstance(exc, TransportError):
        if exc.generation is None and generation is not None:
            exc.generation = generation
        return exc
    if isinstance(exc, CodexLBError):
        return exc
    if isinstance(exc, httpx.PoolTimeout):
        pool = PoolExhausted("every upstream connection is busy; try again shortly")
        pool.__cause__ = exc
        return pool
    transport = _transport(exc, phase)
    if transport is not None:
        transport.generation = generation
        transport.__cause__ = exc
        return transport
    if isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects | ValueError):
        err: CodexLBError = InvalidResponse(f"unusable upstream answer: {type(exc).__name__}")
    else:
        err = UnexpectedError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _transport(exc: BaseException, phase: Phase | None) -> TransportError | None:
    name = type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return TransportError("connect timed out", phase=Phase.CONNECT, path_dead=True)
    if isinstance(exc, httpx.ConnectError):
        return TransportError(f"connect failed: {exc}", phase=Phase.CONNECT)
    if isinstance(exc, httpx.WriteError | httpx.WriteTimeout):
        return TransportError(f"send failed: {name}", phase=phase or Phase.SEND, path_dead=True)
    if isinstance(exc, httpx.ReadTimeout):
        return TransportError("upstream went silent", phase=phase or Phase.BODY, path_dead=True)
    if isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError):
        return TransportError(
            f"connection lost: {name}", phase=phase or Phase.BODY, path_dead=True
        )
    if isinstance(exc, httpx.TransportError):
        return TransportError(f"transport failure: {name}", phase=phase or Phase.BODY)
    if _is_websocket_transport(exc):
        return TransportError(f"websocket failure: {name}", phase=phase or Phase.BODY, path_dead=True)
    if isinstance(exc, socket.gaierror):
        return TransportError(f"DNS lookup failed: {exc}", phase=Phase.CONNECT)
    if isinstance(exc, ConnectionRefusedError):
        return TransportError("connection refused", phase=Phase.CONNECT)
    if isinstance(exc, OSError) and exc.errno in _RESET_ERRNOS:
        return TransportError(
            f"connection lost: {exc.strerror}", phase=phase or Phase.BODY, path_dead=True
        )
    if isinstance(exc, OSError):
        return TransportError(f"network error: {exc.strerror or name}", phase=phase or Phase.CONNECT)
    try:
        import trio

        if isinstance(exc, trio.TooSlowError):
            return TransportError("timed out", phase=phase or Phase.CONNECT, path_dead=True)
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            return TransportError(f"connection lost: {name}", phase=phase or Phase.BODY, path_dead=True)
    except ImportError:  # pragma: no cover - trio is a hard dependency
        pass
    return None


def _is_websocket_transport(exc: BaseException) -> bool:
    try:
        import trio_websocket
    except ImportError:  # pragma: no cover
        return False
    return isinstance(
        exc,
        trio_websocket.ConnectionClosed
        | trio_websocket.ConnectionTimeout
        | trio_websocket.DisconnectionTimeout,
    ) or (isinstance(exc, trio_websocket.HandshakeError) and not isinstance(
        exc, trio_websocket.ConnectionRejected
    ))


def is_kernel_timeout(exc: BaseException) -> bool:
    """Did the kernel itself give up on the socket (keepalive or TCP_USER_TIMEOUT: ETIMEDOUT)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ETIMEDOUT:
            return True
        current = current.__cause__ or current.__context__
    return False


def should_rotate(err: CodexLBError) -> bool:
    """Only a transport failure says anything about the shared client's connections."""
    return isinstance(err, TransportError)


def openai_error_body(err: CodexLBError) -> dict[str, Any]:
    """The body a client gets for an error: OpenAI's shape, never a token or traceback."""
    body: dict[str, Any] = {
        "message": err.message,
        "type": _openai_type(err),
        "code": err.code,
    }
    if isinstance(err, RateLimited) and err.resets_at is not None:
        body["resets_at"] = int(err.resets_at)
    if isinstance(err, ClientError) and err.param:
        body["param"] = err.param
    return {"error": body}


def _openai_type(err: CodexLBError) -> str:
    if isinstance(err, ClientError):
        return "invalid_request_error"
    if isinstance(err, RateLimited):
        return "usage_limit_reached"
    if isinstance(err, AuthExpired | PermanentAuth):
        return "authentication_error"
    if isinstance(err, ActorUnavailable):
        return "service_unavailable"
    return "upstream_error"
