"""Building and reading the upstream wire format of PROTOCOL.md: pure functions, no I/O.

Headers on the way up, SSE framing both ways, live usage from headers and events, error
classification for failover, and the terminal/error bodies the proxy writes itself. The
OpenAI-compatible surface (``/v1/responses`` bodies, ``/v1/models``, Chat Completions)
lives in ``openai_compat``.

Errors (also ValueErrors; placed in the tree of actors.errors)::

    errors.ClientError
    └── ClientInputError     our client sent a bad request (→ 400 in OpenAI's shape; .param)
    errors.InvalidResponse
    └── InvalidPayload       the upstream answered with something we cannot read
        └── EventTooLarge    one SSE event outgrew the parser's limit
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal, TypeAlias

import trio

from actors.accounts import AccountStatus, Credits, LimitFamily, Usage, UsageWindow
from actors.errors import DEACTIVATED_CODES as DEACTIVATED_CODES
from actors.errors import OVERLOAD_CODES as OVERLOAD_CODES
from actors.errors import QUOTA_CODES as QUOTA_CODES
from actors.errors import RATE_LIMIT_CODES as RATE_LIMIT_CODES
from actors.errors import REAUTH_CODES as REAUTH_CODES
from actors.errors import ClientError, InvalidResponse

MAX_EVENT_BYTES = 16 * 1024 * 1024


class ClientInputError(ClientError, ValueError):
    """A malformed client request; ``param`` names the offending field when known.

    A ClientError, so ``errors.classify`` / ``errors.openai_error_body`` answer it as a 400.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param=param)


class InvalidPayload(InvalidResponse, ValueError):
    """An upstream answer that does not have the shape PROTOCOL.md describes."""


class EventTooLarge(InvalidPayload):
    """An SSE event passed the size limit; the stream cannot be resynchronised."""


# --- headers on the way up ---------------------------------------------------------------

# Ours to replace (credentials), hop-by-hop (RFC 9110 §7.6.1), proxy bookkeeping, the proxy's
# own API keys and cookies, and encodings we do not want (we relay plain bytes).
UPSTREAM_DROP_HEADERS = frozenset(
    {"authorization", "chatgpt-account-id", "host", "content-length", "connection",
     "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "forwarded", "x-real-ip",
     "accept-encoding", "cookie", "x-api-key", "api-key",
     "remote-addr",  # Quart's synthetic header carrying our client's address
     "content-encoding",  # we decoded the body (service/body.py); it goes up re-encoded as JSON
     "origin", "referer", "x-csrf-token"}  # a browser's, about our client's page: not upstream's
)  # fmt: skip
UPSTREAM_DROP_PREFIXES = ("proxy-", "x-forwarded-", "sec-websocket-", ":")

HeaderInput: TypeAlias = "Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]"


_UNSENDABLE = re.compile(r"[^\t\x20-\x7e]")  # anything but tab and printable ASCII


def unsendable_header(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The first header whose value cannot be sent upstream as it is, or None.

    httpx and trio-websocket encode header values as ASCII; a value with another character
    (a non-ASCII byte decoded as latin-1, or anything beyond latin-1) or a control character
    would raise deep inside the exchange. Checked at the door and again here, so it is always
    the client's 400, never our crash.
    """
    for name, value in pairs:
        if _UNSENDABLE.search(value):
            return name
    return None


def bad_header_error(name: str) -> ClientInputError:
    return ClientInputError(
        f"request header {name!r} has a value with characters that cannot be forwarded "
        "(only printable ASCII is allowed)", param=name,
    )


def _header_items(headers: Any) -> list[tuple[str, str]]:
    items = headers.items() if hasattr(headers, "items") else headers
    pairs: list[tuple[str, str]] = []
    for name, value in items:
        name_s = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        value_s = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        pairs.append((name_s.strip().lower(), value_s.strip()))
    return pairs


def upstream_headers(
    client_headers: HeaderInput, *, access_token: str, chatgpt_account_id: str
) -> dict[str, str]:
    """The client's headers as the upstream should see them, with the pooled account's auth.

    Names come back lowercase; repeated headers are joined with ", ".
    """
    pairs = _header_items(client_headers)
    # Names listed in Connection are hop-by-hop for this message too.
    listed = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in UPSTREAM_DROP_HEADERS or name in listed or not name:
            continue
        if name.startswith(UPSTREAM_DROP_PREFIXES):
            continue
        if unsendable_header([(name, value)]) is not None:
            raise bad_header_error(name)
        out[name] = f"{out[name]}, {value}" if name in out else value
    out["authorization"] = f"Bearer {access_token}"
    out["chatgpt-account-id"] = chatgpt_account_id
    return out


# --- request bodies on the way up ----------------------------------------------------------

JSON_SLICE = 64 * 1024
# Strings longer than this are escaped slice by slice (json.dumps would hold two whole copies).
JSON_BIG_STRING = 256 * 1024
# Containers nested deeper than this are left to json.dumps whole (bounded Python recursion).
JSON_WALK_DEPTH = 32
_JSON_SCALARS = (int, float, bool, type(None))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _flat(values: Iterable[Any]) -> bool:
    """Only scalars and short strings: json.dumps can take these whole, at C speed."""
    return all(
        isinstance(v, _JSON_SCALARS) or (isinstance(v, str) and len(v) <= JSON_BIG_STRING)
        for v in values
    )


def json_pieces(value: Any, depth: int = 0) -> Iterable[str]:
    """``json.dumps(value)`` (compact, ASCII) as pieces, none much larger than a big string slice.

    The C encoder builds its whole output and then joins it, so a 30 MiB string costs two
    extra 30 MiB copies at once; walking the containers ourselves and escaping big strings
    slice by slice keeps the extra memory to the pieces themselves.
    """
    if isinstance(value, str):
        if len(value) <= JSON_BIG_STRING:
            yield _compact(value)
            return
        yield '"'
        for start in range(0, len(value), JSON_BIG_STRING):
            yield _compact(value[start : start + JSON_BIG_STRING])[1:-1]
        yield '"'
    elif isinstance(value, dict):
        if depth >= JSON_WALK_DEPTH or _flat(value.values()) or not all(
            isinstance(k, str) for k in value
        ):
            yield _compact(value)
            return
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield ("," if index else "") + _compact(key) + ":"
            yield from json_pieces(item, depth + 1)
        yield "}"
    elif isinstance(value, list | tuple):
        if depth >= JSON_WALK_DEPTH or _flat(value):
            yield _compact(value)
            return
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield from json_pieces(item, depth + 1)
        yield "]"
    else:
        yield _compact(value)


@dataclass(frozen=True, slots=True)
class JsonContent:
    """A JSON request body serialised once, in pieces, sent with its Content-Length.

    ``json.dumps(body).encode()`` of a 30 MiB body briefly holds four copies of it; here the
    pieces are the only copy (ASCII, so their length is the byte count) and each is encoded
    only when it is sent. Re-iterable: a retry sends it again.
    """

    pieces: tuple[str, ...]
    length: int

    @classmethod
    def of(cls, body: Any) -> JsonContent:
        pieces = tuple(json_pieces(body))
        return cls(pieces, sum(map(len, pieces)))

    @classmethod
    async def build(cls, body: Any) -> JsonContent:
        """Like ``of``, but lets other tasks run after every MiB of output (no long stall)."""
        pieces: list[str] = []
        length = since_checkpoint = 0
        for piece in json_pieces(body):
            pieces.append(piece)
            length += len(piece)
            since_checkpoint += len(piece)
            if since_checkpoint >= 1024 * 1024:
                await trio.lowlevel.checkpoint()
                since_checkpoint = 0
        return cls(tuple(pieces), length)

    @property
    def headers(self) -> dict[str, str]:
        return {"content-length": str(self.length)}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        batch: list[str] = []
        size = 0
        for piece in self.pieces:
            batch.append(piece)
            size += len(piece)
            if size >= JSON_SLICE:
                yield "".join(batch).encode("ascii")
                batch, size = [], 0
        if batch:
            yield "".join(batch).encode("ascii")


# --- server-sent events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SSEEvent:
    """One SSE block. ``raw`` is its exact bytes, terminating blank line included.

    Blocks with no data line (keep-alive comments) are reported too, with ``data == ""``,
    so that joining every ``raw`` reproduces the stream byte for byte.
    """

    event: str | None
    data: str
    raw: bytes


_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Incremental SSE parser: feed it chunks split anywhere, get whole events back.

    Understands ``\\n``, ``\\r\\n`` and ``\\r`` line ends, multi-line data, comments and a
    leading BOM. Raises EventTooLarge once one event exceeds ``max_event_bytes``; the
    parser is unusable afterwards.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._line_start = 0  # where the current, incomplete line begins in _buf
        self._search_from = 0  # bytes before this hold no line end of the current line
        self._first_line = True
        self._reset_block()

    def _reset_block(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._lines = 0

    @property
    def buffered(self) -> int:
        """Bytes of an event not yet complete (non-zero at end of stream = truncated)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += data
        events: list[SSEEvent] = []
        block_start = 0
        line_start, search = self._line_start, self._search_from
        while (match := _EOL.search(buf, search)) is not None:
            if match.end() == len(buf) and match.group() == b"\r":
                search = match.start()  # maybe the first half of \r\n: wait for more
                break
            ended = self._take_line(bytes(buf[line_start : match.start()]))
            line_start = search = match.end()
            if ended:
                events.append(self._emit(bytes(buf[block_start:line_start])))
                block_start = line_start
        else:
            search = len(buf)
        if len(buf) - block_start > self._max_event_bytes:
            raise EventTooLarge(f"an SSE event exceeded {self._max_event_bytes} bytes")
        del buf[:block_start]
        self._line_start, self._search_from = line_start - block_start, search - block_start
        return events

    def flush(self) -> list[SSEEvent]:
        """At end of stream: whatever is buffered, as a final (unterminated) event."""
        if not self._buf:
            return []
        tail = bytes(self._buf[self._line_start :])
        if tail.rstrip(b"\r\n"):
            self._take_line(tail.rstrip(b"\r\n"))
        raw = bytes(self._buf)
        self._buf.clear()
        self._line_start = self._search_from = 0
        if not self._lines:
            self._reset_block()
            return []
        return [self._emit(raw)]

    def _take_line(self, line: bytes) -> bool:
        """Parse one line; True when it is the blank line that ends a block."""
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            # Blank lines before any field do not end anything: they ride along in raw.
            return self._lines > 0
        self._lines += 1
        if line.startswith(b":"):
            return False  # comment
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        return False

    def _emit(self, raw: bytes) -> SSEEvent:
        if len(raw) > self._max_event_bytes:
            raise EventTooLarge(f"an SSE event exceeded {self._max_event_bytes} bytes")
        event = SSEEvent(event=self._event, data="\n".join(self._data), raw=raw)
        self._reset_block()
        return event


def encode_sse(event_type: str, data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event_type}\ndata: {payload}\n\n".encode()


def parse_event_json(ev: SSEEvent) -> dict[str, Any] | None:
    """The event's JSON object, or None for comments, ``[DONE]`` and non-objects.

    A payload without ``type`` takes it from the ``event:`` line.
    """
    text = ev.data.strip()
    if not text or text == "[DONE]":
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if "type" not in payload and ev.event:
        payload["type"] = ev.event
    return payload


# --- usage windows -----------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _epoch(value: Any) -> float | None:
    number = _num(value)
    if number is not None and number > 1e11:
        number /= 1000.0  # milliseconds
    return number


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


def _window(data: Any, now: float) -> UsageWindow | None:
    """One window from any of the shapes the upstream uses (wham, event, lenient names)."""
    if not isinstance(data, Mapping):
        return None
    used = _num(_first(data, "used_percent", "used_percentage", "percent_used", "used"))
    if used is None:
        return None
    seconds = _num(_first(data, "limit_window_seconds", "window_seconds"))
    if seconds is None and (minutes := _num(data.get("window_minutes"))) is not None:
        seconds = minutes * 60
    reset_at = _epoch(_first(data, "reset_at", "resets_at"))
    if reset_at is None:
        after = _num(_first(data, "reset_after_seconds", "resets_in_seconds", "reset_in_seconds"))
        reset_at = now + after if after is not None else None
    return UsageWindow(
        used_percent=used,
        reset_at=reset_at,
        window_seconds=int(seconds) if seconds is not None else None,
    )


def _lower(headers: Any) -> dict[str, str]:
    return dict(_header_items(headers)) if headers else {}


_WINDOW_FIELDS = ("used-percent", "window-minutes", "reset-at", "reset-after-seconds")
_FAMILY_HEADER = re.compile(r"^x-([a-z0-9][a-z0-9-]*?)-(?:primary|secondary)-used-percent$")
_TRUE_WORDS = frozenset({"true", "1", "yes"})
_BOOL_WORDS = _TRUE_WORDS | {"false", "0", "no"}


def _header_window(lowered: Mapping[str, str], prefix: str, now: float) -> UsageWindow | None:
    return _window({field.replace("-", "_"): lowered.get(f"{prefix}-{field}")
                    for field in _WINDOW_FIELDS}, now)


def _credits(data: Any) -> Credits | None:
    """The ``credits`` object of /wham/usage and codex.rate_limits, leniently."""
    if not isinstance(data, Mapping):
        return None
    has, unlimited = data.get("has_credits"), data.get("unlimited")
    if not isinstance(has, bool) and not isinstance(unlimited, bool):
        return None
    balance = data.get("balance")
    return Credits(has_credits=has is True, unlimited=unlimited is True,
                   balance=None if balance is None else str(balance))


def _header_credits(lowered: Mapping[str, str]) -> Credits | None:
    has = (lowered.get("x-codex-credits-has-credits") or "").strip().lower()
    unlimited = (lowered.get("x-codex-credits-unlimited") or "").strip().lower()
    if has not in _BOOL_WORDS and unlimited not in _BOOL_WORDS:
        return None
    balance = (lowered.get("x-codex-credits-balance") or "").strip()
    return Credits(has_credits=has in _TRUE_WORDS, unlimited=unlimited in _TRUE_WORDS,
                   balance=balance or None)


def _header_families(lowered: Mapping[str, str], now: float) -> tuple[LimitFamily, ...]:
    """Limit families beside the plan's own: ``x-<name>-primary-*`` and ``x-<name>-limit-name``."""
    names = sorted({m.group(1) for key in lowered if (m := _FAMILY_HEADER.match(key))} - {"codex"})
    families = []
    for name in names:
        primary = _header_window(lowered, f"x-{name}-primary", now)
        secondary = _header_window(lowered, f"x-{name}-secondary", now)
        if primary is None and secondary is None:
            continue
        limit_name = (lowered.get(f"x-{name}-limit-name") or "").strip() or None
        families.append(LimitFamily(name=name, limit_name=limit_name, primary=primary,
                                    secondary=secondary))
    return tuple(families)


def usage_from_headers(headers: Mapping[str, str], now: float) -> Usage | None:
    """Live usage from response headers, if any: the ``x-codex-{primary,secondary}-*``
    windows, ``x-codex-credits-*`` and additional families ``x-<name>-primary-*``."""
    lowered = _lower(headers)
    primary = _header_window(lowered, "x-codex-primary", now)
    secondary = _header_window(lowered, "x-codex-secondary", now)
    credits = _header_credits(lowered)
    families = _header_families(lowered, now)
    if primary is None and secondary is None and credits is None and not families:
        return None
    return Usage(primary=primary, secondary=secondary, updated_at=now, credits=credits,
                 families=families)


def usage_from_rate_limits_event(payload: Mapping[str, Any], now: float) -> Usage | None:
    """Live usage from a ``codex.rate_limits`` stream event, or None if it carries none."""
    if not isinstance(payload, Mapping):
        return None
    limits = payload.get("rate_limits")
    source: Mapping[str, Any] = limits if isinstance(limits, Mapping) else payload
    primary = _window(_first(source, "primary", "primary_window"), now)
    secondary = _window(_first(source, "secondary", "secondary_window"), now)
    credits = _credits(payload.get("credits")) or _credits(source.get("credits"))
    if primary is None and secondary is None and credits is None:
        return None
    return Usage(primary=primary, secondary=secondary, updated_at=now, credits=credits)


def _wham_families(payload: Mapping[str, Any], now: float) -> tuple[LimitFamily, ...]:
    extra = payload.get("additional_rate_limits")
    families = []
    for item in extra if isinstance(extra, list) else []:
        if not isinstance(item, Mapping):
            continue
        limits = item.get("rate_limit")
        limits = limits if isinstance(limits, Mapping) else {}
        name = item.get("metered_feature") or item.get("limit_name")
        primary = _window(limits.get("primary_window"), now)
        secondary = _window(limits.get("secondary_window"), now)
        if isinstance(name, str) and (primary is not None or secondary is not None):
            limit_name = item.get("limit_name")
            families.append(LimitFamily(
                name=name, limit_name=limit_name if isinstance(limit_name, str) else None,
                primary=primary, secondary=secondary))
    return tuple(families)


def usage_from_wham(payload: Any, now: float) -> Usage:
    """Usage from a ``GET /wham/usage`` body; ``"rate_limit": null`` means no windows."""
    if not isinstance(payload, Mapping) or "rate_limit" not in payload:
        raise InvalidPayload("usage answer is not an object with a rate_limit")
    limits = payload["rate_limit"]
    credits = _credits(payload.get("credits"))
    families = _wham_families(payload, now)
    if limits is None:
        return Usage(updated_at=now, credits=credits, families=families)
    if not isinstance(limits, Mapping):
        raise InvalidPayload("usage answer's rate_limit is not an object")
    return Usage(
        primary=_window(limits.get("primary_window"), now),
        secondary=_window(limits.get("secondary_window"), now),
        updated_at=now,
        credits=credits,
        families=families,
    )


def merge_usage(old: Usage, new: Usage) -> Usage:
    """A newer reading that lacks a window (or credits, or a family) keeps the older one's."""
    families = {family.name: family for family in old.families}
    families.update((family.name, family) for family in new.families)
    return Usage(
        primary=new.primary or old.primary,
        secondary=new.secondary or old.secondary,
        updated_at=new.updated_at if new.updated_at is not None else old.updated_at,
        credits=new.credits or old.credits,
        families=tuple(families.values()),
    )


# --- upstream errors ---------------------------------------------------------------------
# The code sets (REAUTH_CODES, DEACTIVATED_CODES, QUOTA_CODES, RATE_LIMIT_CODES,
# OVERLOAD_CODES) live in actors.errors, one source of truth, and are re-exported here.


def permanent_account_status(code: str) -> AccountStatus | None:
    """The status a permanent token error puts its account in, or None if not permanent."""
    if code in DEACTIVATED_CODES:
        return AccountStatus.DEACTIVATED
    if code in REAUTH_CODES:
        return AccountStatus.REAUTH_REQUIRED
    return None


def _code(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _code_fields(body: Any) -> list[Any]:
    """Where error codes hide: PROTOCOL.md's five places, then error.type and detail.code."""
    if not isinstance(body, Mapping):
        return []
    err, detail = body.get("error"), body.get("detail")
    err_map: Mapping[str, Any] = err if isinstance(err, Mapping) else {}
    detail_map: Mapping[str, Any] = detail if isinstance(detail, Mapping) else {}
    return [err_map.get("code"), err_map.get("error"), err, body.get("error_code"),
            body.get("code"), err_map.get("type"), detail_map.get("code")]  # fmt: skip


def _codes(fields: list[Any]) -> list[str]:
    return [code for value in fields if (code := _code(value)) is not None]


def error_code(body: Any, status: int) -> str:
    """The error code by PROTOCOL.md's order: error.code, error.error, error, error_code, code."""
    codes = _codes(_code_fields(body)[:5])
    return codes[0] if codes else f"http_{status}"


FailureKind: TypeAlias = Literal[
    "rate_limited", "quota", "auth", "server", "client", "permanent_auth"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamFailure:
    """Why an upstream exchange failed, in the terms failover decides on."""

    kind: FailureKind
    status: int
    code: str
    message: str
    resets_at: float | None = None


_RETRY_IN = re.compile(r"try again in\s+(\d+(?:\.\d+)?)\s*(ms|s|sec|seconds?)\b", re.I)


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if (seconds := _num(value)) is not None:
        return now + seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _resets_at(
    err: Mapping[str, Any], message: str, headers: Mapping[str, str], now: float
) -> float | None:
    if (at := _epoch(_first(err, "resets_at", "reset_at"))) is not None:
        return at
    if (after := _num(_first(err, "resets_in_seconds", "reset_in_seconds"))) is not None:
        return now + after
    if (at := _retry_after(headers.get("retry-after"), now)) is not None:
        return at
    # An exhausted window in the live-usage headers binds until its own reset.
    usage = usage_from_headers(headers, now) or Usage()
    exhausted = [
        window.reset_at
        for window in (usage.primary, usage.secondary)
        if window is not None and window.used_percent >= 100.0 and window.reset_at is not None
    ]
    if exhausted:
        return max(exhausted)
    if (match := _RETRY_IN.search(message)) is not None:
        amount = float(match.group(1))
        return now + (amount / 1000.0 if match.group(2).lower() == "ms" else amount)
    return None


def _classify(
    codes: list[str],
    status: int,
    message: str,
    err: Mapping[str, Any],
    headers: Mapping[str, str],
    now: float,
    *,
    in_stream: bool,
) -> UpstreamFailure | None:
    def matching(known: frozenset[str]) -> str | None:
        return next((code for code in codes if code.lower() in known), None)

    # (kind, status the same error has as an HTTP answer): stream errors arrive under a 200.
    kind: FailureKind
    if code := matching(DEACTIVATED_CODES):
        kind, as_http = "permanent_auth", 403
    elif code := matching(QUOTA_CODES):
        kind, as_http = "quota", 429
    elif (code := matching(RATE_LIMIT_CODES)) or status == 429:
        kind, as_http = "rate_limited", 429
    elif (code := matching(REAUTH_CODES)) or status == 401:
        kind, as_http = "auth", 401
    elif (code := matching(OVERLOAD_CODES)) or "at capacity" in message.lower() or status >= 500:
        kind, as_http = "server", 503
    elif in_stream:
        return None  # not ours to act on: the client sees the event as it is
    else:
        kind, as_http = ("client" if 400 <= status < 500 else "server"), status
    waits = kind in ("rate_limited", "quota")
    return UpstreamFailure(
        kind=kind,
        status=as_http if in_stream else status,
        code=code or (codes[0] if codes else f"http_{status}"),
        message=message,
        resets_at=_resets_at(err, message, headers, now) if waits else None,
    )


def _message(err: Mapping[str, Any], body: Any, text: str, status: int) -> str:
    candidates: list[Any] = [err.get("message")]
    if isinstance(body, Mapping):
        detail = body.get("detail")
        candidates += [body.get("message"), body.get("error_description"), detail]
        if isinstance(detail, Mapping):
            candidates.append(detail.get("message"))
    candidates.append(text.strip()[:500])
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return f"upstream answered HTTP {status}"


def classify_response(
    status: int, body_bytes: bytes, headers: Mapping[str, str] | None, now: float
) -> UpstreamFailure | None:
    """Classify a non-2xx upstream answer for failover; None for 2xx.

    ``resets_at`` (epoch s) is filled for rate_limited and quota failures when the answer
    says when: error.resets_at, error.resets_in_seconds, Retry-After, exhausted usage headers.
    """
    if 200 <= status < 300:
        return None
    text = body_bytes.decode("utf-8", "replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    err = body.get("error") if isinstance(body, Mapping) else None
    err_map: Mapping[str, Any] = err if isinstance(err, Mapping) else {}
    message = _message(err_map, body, text, status)
    return _classify(
        _codes(_code_fields(body)), status, message, err_map, _lower(headers), now, in_stream=False
    )


def classify_stream_error_event(payload: Mapping[str, Any], now: float) -> UpstreamFailure | None:
    """Classify a ``response.failed`` / ``error`` event inside a 200 stream.

    Only codes failover acts on produce a failure (status is the HTTP status the same
    error would have had); anything else (e.g. context_length_exceeded) gives None.
    """
    kind = payload.get("type")
    if kind == "response.failed":
        response = payload.get("response")
        err = response.get("error") if isinstance(response, Mapping) else None
    elif kind == "error":
        err = payload.get("error") if isinstance(payload.get("error"), Mapping) else payload
    else:
        return None
    if not isinstance(err, Mapping):
        return None
    codes = [
        c for c in _codes([err.get("code"), err.get("type"), err.get("error")]) if c != "error"
    ]
    message = _message(err, None, "", 200)
    return _classify(codes, 200, message, err, {}, now, in_stream=True)


# --- terminal events and OpenAI-shaped answers -------------------------------------------

TERMINAL_EVENT_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)


def failed_event(code: str, message: str, response_id: str | None = None) -> dict[str, Any]:
    """A terminal ``response.failed`` event the proxy sends when it must end a stream."""
    return {
        "type": "response.failed",
        "response": {
            "id": response_id or "resp_" + secrets.token_hex(12),
            "object": "response",
            "status": "failed",
            "error": {"code": code, "message": message},
            "output": [],
        },
    }


def openai_error(message: str, type: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    """An error body in OpenAI's shape: ``{"error": {"message", "type", "code", …}}``."""
    return {"error": {"message": message, "type": type, "code": code, **extra}}


def usage_limit_error(resets_at: float, now: float) -> dict[str, Any]:
    """The 429 body for "every account is cooling down", in the shape Codex CLI reads."""
    return openai_error(
        "All pooled accounts have reached their usage limit.",
        "usage_limit_reached",
        "usage_limit_reached",
        resets_at=int(math.ceil(resets_at)),
        resets_in_seconds=max(0, int(math.ceil(resets_at - now))),
    )
