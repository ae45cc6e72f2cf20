"""Reading request bodies with bounded memory: stream, decode, limit, parse once.

Quart's ``request.get_data()`` keeps the whole body in a bytearray and hands back a copy, and
``json.loads(bytes)`` decodes into a third one. Here the body is read chunk by chunk from
``request.body`` into one buffer, decoded (``Content-Encoding: gzip | deflate | zstd``) on the
way in with the size limit applied to the *decoded* size, and parsed once: the buffer is
turned into text, freed, and only then parsed, so at most two copies of the body exist at any
moment. Bodies above ``large_body_bytes`` take a slot of a small limiter while they are read
and parsed, so several large requests at once wait their turn instead of exhausting memory.

Errors are ``ClientError``s: 400 (not JSON, corrupt encoding), 413 (too large), 415 (wrong
content type or an unknown encoding). None of them echoes the body.
"""

from __future__ import annotations

import codecs
import json
import math
import zlib
from collections.abc import AsyncIterable, Callable
from typing import Any, Protocol

import trio
import zstandard
from quart import request

from actors.errors import ClientError

# zstd can expand a few bytes into megabytes: feed it small pieces so one call's output stays
# small (an RLE block turns 4 bytes into 128 KiB; 512 bytes into at most ~16 MiB).
ZSTD_FEED = 512
# zlib output per call; its max_length keeps a deflate bomb from expanding all at once.
ZLIB_OUT = 256 * 1024
JSON_CONTENT_TYPE = "application/json"
READ_SLICE = 64 * 1024
CHECKPOINT_BYTES = 1024 * 1024


class _Decoder(Protocol):
    def feed(self, data: bytes | memoryview, sink: Callable[[bytes], None]) -> None: ...
    def finish(self, sink: Callable[[bytes], None]) -> None: ...


class _Identity:
    def feed(self, data: bytes | memoryview, sink: Callable[[bytes], None]) -> None:
        sink(data)

    def finish(self, sink: Callable[[bytes], None]) -> None:
        return None


class _Zlib:
    """gzip (wbits 31) or deflate: zlib-wrapped as RFC 9110 says, raw deflate as browsers allow."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._wbits = 31 if encoding == "gzip" else 15
        self._inflate = zlib.decompressobj(self._wbits)
        self._started = False

    def feed(self, data: bytes | memoryview, sink: Callable[[bytes], None]) -> None:
        try:
            self._drain(data, sink)
        except zlib.error:
            if self._started or self._encoding != "deflate":
                raise
            self._wbits = -15  # raw deflate without the zlib header
            self._inflate = zlib.decompressobj(self._wbits)
            self._drain(data, sink)

    def _drain(self, data: bytes | memoryview, sink: Callable[[bytes], None]) -> None:
        pending = data
        while pending:
            out = self._inflate.decompress(pending, ZLIB_OUT)
            self._started = True
            if out:
                sink(out)
            if self._inflate.eof and self._inflate.unused_data:
                raise zlib.error("data after the end of the compressed stream")
            pending = self._inflate.unconsumed_tail

    def finish(self, sink: Callable[[bytes], None]) -> None:
        while not self._inflate.eof:
            out = self._inflate.decompress(b"", ZLIB_OUT)
            if not out:
                raise zlib.error("the compressed stream is truncated")
            sink(out)


class _Zstd:
    def __init__(self) -> None:
        self._inflate = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes | memoryview, sink: Callable[[bytes], None]) -> None:
        view = memoryview(data)
        for start in range(0, len(view), ZSTD_FEED):
            if self._inflate.eof:
                raise zstandard.ZstdError("data after the end of the zstd frame")
            out = self._inflate.decompress(view[start : start + ZSTD_FEED])
            if out:
                sink(out)

    def finish(self, sink: Callable[[bytes], None]) -> None:
        if not self._inflate.eof:
            raise zstandard.ZstdError("the zstd frame is truncated")


def _decoder(content_encoding: str) -> _Decoder:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib("gzip")
    if encoding == "deflate":
        return _Zlib("deflate")
    if encoding == "zstd":
        return _Zstd()
    raise ClientError(
        f"unsupported Content-Encoding {_shown(content_encoding)}: send gzip, deflate, zstd "
        "or no encoding", status=415, param="content-encoding",
    )


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class TooLarge(ClientError):
    """The decoded body passed the limit."""


class BodyStalled(ClientError):
    """The client stopped sending its body for ``server.body_idle_timeout``."""

    code = "request_timeout"

    def __init__(self, idle_seconds: float) -> None:
        super().__init__(f"request body stopped arriving for {idle_seconds:g} s "
                         "(server.body_idle_timeout)", status=408)


class arriving:  # noqa: N801 (used like a function: ``async for chunk in arriving(...)``)
    """The chunks of a request body; BodyStalled when none comes for ``idle_seconds``.

    An iterator object rather than an async generator: nothing to finalise when the reader
    stops early (a 413, a client gone).
    """

    __slots__ = ("_chunks", "_idle_seconds")

    def __init__(self, source: AsyncIterable[bytes], idle_seconds: float) -> None:
        self._chunks = source.__aiter__()
        self._idle_seconds = idle_seconds

    def __aiter__(self) -> arriving:
        return self

    async def __anext__(self) -> bytes:
        with trio.move_on_after(self._idle_seconds):
            return await self._chunks.__anext__()
        raise BodyStalled(self._idle_seconds)


def is_json_content_type(value: str) -> bool:
    """``application/json``, optionally with ``charset=utf-8``, and nothing else.

    A browser page can send ``text/plain`` (or anything with ``json`` in it) cross-site without
    asking first; it cannot send ``application/json`` without a CORS preflight, which we never
    grant.
    """
    mime, _, params = value.partition(";")
    if mime.strip().lower() != JSON_CONTENT_TYPE:
        return False
    for param in params.split(";") if params.strip() else ():
        name, _, val = param.partition("=")
        if name.strip().lower() != "charset" or val.strip().strip('"').lower() != "utf-8":
            return False
    return True


def _reject_constant(name: str) -> Any:
    raise ClientError(f"request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number too large for a float (1e400) would become infinity: refuse it."""
    value = float(text)
    if not math.isfinite(value):
        raise ClientError(f"request body has a number out of range: {text[:20]}")
    return value


def _dict_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def _parse(text: str, yield_gil: bool = False) -> Any:
    """``json.loads`` refusing NaN, Infinity and floats that overflow; ClientError if bad."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_dict_from_pairs if yield_gil else None)
    except ValueError as exc:
        raise ClientError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ClientError("request body is not valid JSON: nested too deeply") from None


class BodyReader:
    """Reads, decodes and parses request bodies for one app (it owns the large-body slots)."""

    def __init__(self, *, max_bytes: int, large_bytes: int, large_slots: int,
                 idle_seconds: float = 60.0) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.large_bytes = large_bytes
        self._large = trio.CapacityLimiter(large_slots)

    def render_metrics(self) -> str:
        """Prometheus lines for the large-body slots: held now, and requests waiting for one."""
        waiting = self._large.statistics().tasks_waiting
        return (
            "# HELP codex_lb_large_body_slots_in_use Large request bodies being read now.\n"
            "# TYPE codex_lb_large_body_slots_in_use gauge\n"
            f"codex_lb_large_body_slots_in_use {self._large.borrowed_tokens}\n"
            "# HELP codex_lb_large_body_slots_waiting Large request bodies waiting for a slot.\n"
            "# TYPE codex_lb_large_body_slots_waiting gauge\n"
            f"codex_lb_large_body_slots_waiting {waiting}\n"
        )

    def too_large(self) -> TooLarge:
        err = TooLarge(
            f"request body larger than {self.max_bytes} bytes "
            "(raise server.max_body_bytes to allow it)", status=413,
        )
        err.code = "request_too_large"
        return err

    def _slot(self) -> _Slot:
        length = request.content_length
        return _Slot(self._large, held=length is not None and length > self.large_bytes)

    async def read_text(self) -> str:
        """The whole decoded body of the current request as UTF-8 text (400 if it is not).

        Cancel-safe: a cancelled read leaves nothing behind but the request's unread bytes.
        """
        async with self._slot() as slot:
            return await self._read_text(slot)

    async def _read_text(self, slot: _Slot) -> str:
        content_length = request.content_length
        if content_length is not None and content_length > self.max_bytes:
            raise self.too_large()
        encoding = request.headers.get("content-encoding", "")
        decoder = _decoder(encoding)
        # Decoded to text as it arrives (no long stall at the end); the size limit counts bytes.
        utf8 = codecs.getincrementaldecoder("utf-8")()
        pieces: list[str] = []
        size = 0

        def sink(data: bytes | memoryview) -> None:
            nonlocal size
            size += len(data)
            if size > self.max_bytes:
                raise self.too_large()
            pieces.append(utf8.decode(data))

        try:
            checked = 0
            async for chunk in arriving(request.body, self.idle_seconds):
                # The server may have queued megabytes meanwhile: work through them in slices
                # and let other tasks run after every MiB, so no single step stalls the loop.
                view = memoryview(chunk)
                for start in range(0, len(view), READ_SLICE):
                    decoder.feed(view[start : start + READ_SLICE], sink)
                    if size - checked >= CHECKPOINT_BYTES:
                        checked = size
                        await trio.lowlevel.checkpoint()
                if size > self.large_bytes:
                    await slot.take()
            decoder.finish(sink)
            pieces.append(utf8.decode(b"", final=True))
        except (zlib.error, zstandard.ZstdError):
            raise ClientError(
                f"request body is not valid {encoding.strip().lower()} data "
                "(corrupt or truncated Content-Encoding)", param="content-encoding",
            ) from None
        except UnicodeDecodeError:
            raise ClientError("request body is not valid JSON: not UTF-8 text") from None
        try:
            return "".join(pieces)
        finally:
            pieces.clear()  # free them before the caller parses the text

    async def json_object(self, *, optional: bool = False) -> dict[str, Any] | None:
        """The request's JSON object, parsed once; ``None`` for an empty body if ``optional``.

        ``optional`` also lets an empty body come without a Content-Type (``curl -X POST``).
        """
        return (await self.json_with_text(optional=optional))[0]

    async def json_with_text(
        self, *, optional: bool = False
    ) -> tuple[dict[str, Any] | None, str]:
        """``json_object``, and the text it was parsed from (to forward it unchanged)."""
        content_type = request.headers.get("content-type", "")
        if not is_json_content_type(content_type) and not (optional and not content_type):
            raise ClientError(
                f"expected Content-Type: application/json, got {_shown(content_type or 'none')}",
                status=415,
            )
        async with self._slot() as slot:
            text = await self._read_text(slot)
            if not text or text.isspace():
                if optional:
                    return None, text
                raise ClientError("request body is not valid JSON: the body is empty")
            if not content_type:
                raise ClientError("expected Content-Type: application/json, got none",
                                  status=415)
            if len(text) <= self.large_bytes:
                body = _parse(text)
            else:
                # A big parse runs in a thread, with a Python hook per object so the GIL is
                # handed back every few ms: /health and other streams keep moving meanwhile.
                body = await trio.to_thread.run_sync(_parse, text, True)
        if not isinstance(body, dict):
            raise ClientError("request body must be a JSON object")
        return body, text


class _Slot:
    """One of the large-body slots, taken up front or once the body turns out to be large."""

    def __init__(self, limiter: trio.CapacityLimiter, *, held: bool) -> None:
        self._limiter = limiter
        self._want = held
        self._held = False

    async def __aenter__(self) -> _Slot:
        if self._want:
            await self.take()
        return self

    async def take(self) -> None:
        if not self._held:
            await self._limiter.acquire_on_behalf_of(self)
            self._held = True

    async def __aexit__(self, *exc: object) -> None:
        if self._held:
            self._limiter.release_on_behalf_of(self)
            self._held = False


__all__ = ["BodyReader", "TooLarge", "is_json_content_type"]


class FinishBodyFirst:
    """ASGI wrapper: a response never races the request body it answers.

    An answer can be ready before the client has finished sending its body: a 413 after the
    first megabytes, a 401 or a 403 decided from the headers. Answering then breaks the
    kept-alive connection in Hypercorn: the response's end closes the connection instead of
    starting the next cycle, the app task doing that close is cancelled half-way (Quart-trio
    cancels the request's nursery as soon as the disconnect it caused arrives), the socket
    stays open, and the client's next request on it waits forever.

    So a response start waits, at most ``drain_seconds``, until the body has fully arrived
    (Quart keeps reading it meanwhile and drops what passes ``MAX_CONTENT_LENGTH``, so memory
    stays bounded); a body still arriving after that gets ``Connection: close``. And the
    final body message is sent shielded, bounded by ``close_seconds``, so the connection's
    close or recycle runs to its end.
    """

    def __init__(self, app: Callable[..., Any], *, drain_seconds: float = 5.0,
                 close_seconds: float = 10.0) -> None:
        self._app = app
        self._drain_seconds = drain_seconds
        self._close_seconds = close_seconds

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        if scope.get("type") != "http":
            await self._app(scope, receive, send)
            return
        body_done = trio.Event()

        async def tracked_receive() -> dict[str, Any]:
            message = await receive()
            kind = message.get("type")
            if kind == "http.disconnect" or (
                kind == "http.request" and not message.get("more_body", False)
            ):
                body_done.set()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            kind = message.get("type")
            if kind == "http.response.start" and not body_done.is_set():
                with trio.move_on_after(self._drain_seconds):
                    await body_done.wait()
                if not body_done.is_set():
                    headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            if kind == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True) as shielded:
                    shielded.deadline = trio.current_time() + self._close_seconds
                    await send(message)
                return
            await send(message)

        await self._app(scope, tracked_receive, guarded_send)
