"""The client-facing surfaces: Codex's backend paths and the OpenAI-compatible /v1.

Split from app.py (admin routes, error handling) to keep both readable. Every route
turns the request into a ``ProxyRequest`` and streams the ``Exchange`` back without
buffering; response timeouts are off for streams.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, overload

import trio
from quart import Quart, Response, current_app, request, websocket
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from actors.balancer import sticky_key
from actors.errors import ClientError, CodexLBError, InvalidResponse, ServerError
from actors.openai_compat import (
    ChatStreamTranslator,
    ResponseAccumulator,
    chat_completion_from_response,
    chat_to_responses_request,
    openai_models_list,
    responses_request_for_upstream,
)
from actors.proxy_handler import Exchange, ProxyRequest
from actors.request_record import Surface
from actors.supervisor import Engine
from actors.upstream import (
    ClientInputError,
    bad_header_error,
    parse_event_json,
    unsendable_header,
)
from service.body import BodyReader, BodyStalled, arriving
from service.config import Config

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@overload
async def json_body() -> dict[str, Any]: ...
@overload
async def json_body(*, optional: bool) -> dict[str, Any] | None: ...


async def json_body(*, optional: bool = False) -> dict[str, Any] | None:
    """The request's JSON object, or a ClientError saying what is wrong with it.

    Read by the app's BodyReader (service/body.py): streamed, bounded, decoded, parsed once.
    """
    reader: BodyReader = current_app.config["BODY_READER"]
    return await reader.json_object(optional=optional)


async def json_body_and_text() -> tuple[dict[str, Any], str]:
    """The JSON object and the text it came as (forwarded as is when the route changes nothing)."""
    reader: BodyReader = current_app.config["BODY_READER"]
    body, text = await reader.json_with_text()
    assert body is not None  # not optional: an empty body is the client's 400
    return body, text


def stream_flag(body: dict[str, Any]) -> bool:
    """``stream`` must be a JSON boolean: ``"false"`` is a string, and strings are truthy."""
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ClientError("stream must be true or false (a JSON boolean)", param="stream")
    return value


def client_headers() -> tuple[tuple[str, str], ...]:
    return checked_headers(request.headers.items())


def checked_headers(items: Any) -> tuple[tuple[str, str], ...]:
    """The client's headers, lowercased; a value we could not forward is the client's 400."""
    headers = tuple((k.lower(), v) for k, v in items)
    bad = unsendable_header(headers)
    if bad is not None:
        raise bad_header_error(bad)
    return headers


def sse_response(exchange: Exchange) -> Response:
    """Relay an exchange's stream byte for byte: each chunk as it comes, one write each."""
    assert exchange.events is not None
    events = exchange.events
    chunks = events.chunks

    async def body() -> AsyncIterator[bytes]:
        with events:  # closing it ends the upstream exchange at once (a client that left)
            async for chunk in chunks:
                yield _with_waiting(chunk, chunks)

    response = Response(body(), status=exchange.status, content_type="text/event-stream",
                        headers=SSE_HEADERS)
    response.timeout = None
    return response


def _with_waiting(chunk: bytes, chunks: trio.MemoryReceiveChannel[bytes]) -> bytes:
    """``chunk`` and whatever else is already queued: one write when the client falls behind."""
    more: list[bytes] = []
    while True:
        try:
            more.append(chunks.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return b"".join((chunk, *more)) if more else chunk


async def collect_final_response(exchange: Exchange) -> dict[str, Any]:
    """Read a stream to its terminal event and return the final response object."""
    assert exchange.events is not None
    accumulator = ResponseAccumulator()
    with exchange.events:
        async for event in exchange.events:
            payload = parse_event_json(event)
            if payload is not None:
                accumulator.feed(payload)
            if accumulator.finished:
                break
    final = accumulator.response
    if final is None:
        raise InvalidResponse("upstream stream ended without a final response")
    if accumulator.terminal_type in ("response.failed", "error"):
        err = final.get("error") or {}
        failure = InvalidResponse(str(err.get("message") or "the upstream response failed"))
        failure.code = str(err.get("code") or "upstream_error")
        raise failure
    return final


# --- transcription uploads ------------------------------------------------------------------

TRANSCRIBE_HEADER_TIMEOUT = 120.0  # the answer comes after the whole audio was transcribed
MAX_PROMPT_BYTES = 64 * 1024


class UploadTooLarge(ClientError):
    """The upload passed ``server.max_body_bytes`` while it was being streamed."""


class UploadStream:
    """The client's upload, streamed once into the upstream request, never buffered whole.

    The size limit is enforced on the bytes as they pass. A second iteration (a retry
    after the upload was consumed) fails instead of sending an empty body.
    """

    def __init__(self, source: AsyncIterable[bytes], *, max_bytes: int,
                 idle_seconds: float = 60.0) -> None:
        self._source = source
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.sent = 0
        self.too_large = False
        self.stalled: BodyStalled | None = None
        self._used = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise ServerError("the upstream failed after the upload was sent; send it again",
                              status=502, code="upload_not_replayable")
        self._used = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in arriving(self._source, self.idle_seconds):
                self.sent += len(chunk)
                if self.sent > self.max_bytes:
                    raise RequestEntityTooLarge()
                yield chunk
        except BodyStalled as stalled:
            self.stalled = stalled
            raise
        except RequestEntityTooLarge:  # ours, or Quart's own MAX_CONTENT_LENGTH check
            self.too_large = True
            raise UploadTooLarge(f"request body larger than {self.max_bytes} bytes",
                                 status=413) from None


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` body, or a 415/400 saying what is wrong."""
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != "multipart/form-data":
        raise ClientError(f"expected Content-Type: multipart/form-data, got "
                          f"{content_type[:60] or 'none'}", status=415)
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise ClientError("multipart/form-data without a boundary")


def _part_head(boundary: str, name: str, *, filename: str | None = None,
               content_type: str | None = None) -> bytes:
    def quoted(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")

    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{quoted(filename)}"'
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {quoted(content_type)}\r\n"
    return (head + "\r\n").encode("utf-8")


async def transcription_parts(source: AsyncIterable[bytes], boundary_in: bytes,
                              boundary_out: str) -> AsyncIterator[bytes]:
    """OpenAI's transcription form re-encoded as the backend's: ``file`` and ``prompt`` only.

    Streams: the file's bytes pass through as they arrive; ``model`` and the other OpenAI
    fields are dropped; the prompt (small, bounded) goes last whatever its position.
    """
    decoder = MultipartDecoder(boundary_in)
    current, prompt, saw_file = "", bytearray(), False

    def events() -> list[Any]:
        out = []
        while not isinstance(event := decoder.next_event(), NeedData | Epilogue):
            out.append(event)
        return out

    async def take(chunk: bytes | None) -> AsyncIterator[bytes]:
        nonlocal current, saw_file
        try:
            decoder.receive_data(chunk)
            parsed = events()
        except ValueError as exc:
            raise ClientError(f"malformed multipart body: {exc}") from None
        for event in parsed:
            if isinstance(event, File):
                current = "file" if event.name == "file" and not saw_file else ""
                if current:
                    saw_file = True
                    yield _part_head(boundary_out, "file", filename=event.filename or "audio",
                                     content_type=event.headers.get("content-type"))
            elif isinstance(event, Field):
                current = "prompt" if event.name == "prompt" else ""
            elif isinstance(event, Data):
                if current == "file":
                    if event.data:
                        yield event.data
                    if not event.more_data:
                        yield b"\r\n"
                elif current == "prompt":
                    prompt.extend(event.data)
                    if len(prompt) > MAX_PROMPT_BYTES:
                        raise ClientError(f"prompt longer than {MAX_PROMPT_BYTES} bytes",
                                          param="prompt")

    async for chunk in source:
        async for piece in take(chunk):
            yield piece
    async for piece in take(None):
        yield piece
    if not saw_file:
        raise ClientError("the multipart field `file` is required", param="file")
    if prompt:
        yield _part_head(boundary_out, "prompt") + bytes(prompt) + b"\r\n"
    yield f"--{boundary_out}--\r\n".encode()


def register_surfaces(app: Quart, engine: Engine, config: Config) -> None:
    proxy = engine.proxy

    async def forward_codex(path: str, *, stream: bool, header_timeout: float | None = None) -> Exchange:
        body, raw = await json_body_and_text()
        stream_flag(body)
        headers = client_headers()
        key = sticky_key(dict(headers), body)
        # The client's text goes up as sent; of the parsed body the proxy reads only the model,
        # so the whole parsed copy is let go before the exchange (a 30 MiB body's memory).
        slim = {"model": body["model"]} if "model" in body else {}
        del body
        return await proxy.forward(ProxyRequest(
            path=path, headers=headers, body=slim, raw_body=raw, stream=stream,
            sticky_key=key, header_timeout=header_timeout,
        ), timeout=(header_timeout or 0) + 300.0)

    @app.post("/backend-api/codex/responses")
    @app.post("/responses", endpoint="root_responses")
    async def codex_responses() -> Response:
        # /responses: the same for clients whose base URL is the server root.
        return sse_response(await forward_codex("/codex/responses", stream=True))

    @app.websocket("/backend-api/codex/responses")
    @app.websocket("/responses", endpoint="root_responses_websocket")
    async def codex_responses_websocket() -> Response | None:
        try:
            headers = checked_headers(websocket.headers.items())
            session = await proxy.open_websocket(ProxyRequest(
                path="/codex/responses", headers=headers,
                sticky_key=sticky_key(dict(headers), None),
            ))
        except CodexLBError as exc:
            # Refuse the upgrade with a plain HTTP error (Codex then falls back to SSE).
            from service.app import error_response, upgrade_refusal

            return upgrade_refusal(error_response(exc))
        # The upstream's upgrade headers Codex reads (x-codex-turn-state, x-models-etag, …).
        await websocket.accept(headers=session.headers)

        async def client_to_upstream() -> None:
            with session.to_upstream:
                while True:
                    await session.to_upstream.send(await websocket.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_to_upstream)
            with session.from_upstream:
                async for frame in session.from_upstream:
                    await websocket.send(frame)
            nursery.cancel_scope.cancel()
        return None

    @app.post("/backend-api/codex/responses/compact")
    async def codex_compact() -> Response:
        exchange = await forward_codex("/codex/responses/compact", stream=False,
                                       header_timeout=config.upstream.compact_header_timeout)
        return Response(exchange.body, status=exchange.status,
                        content_type=exchange.headers.get("content-type", "application/json"))

    async def fetch_models(query: tuple[tuple[str, str], ...]) -> Exchange:
        return await proxy.forward(ProxyRequest(
            path="/codex/models", method="GET", headers=client_headers(), query=query, stream=False,
        ))

    async def catalog_models() -> list[dict[str, Any]]:
        """The scheduler's catalog (fetched on demand the first time), else a passthrough."""
        catalog = await engine.scheduler.catalog()
        if catalog is not None:
            return list(catalog.models)
        exchange = await fetch_models((("client_version", config.upstream.client_version),))
        try:
            models = json.loads(exchange.body)["models"]
        except (ValueError, KeyError, TypeError):
            raise InvalidResponse("upstream model catalog has no models list") from None
        if not isinstance(models, list):
            raise InvalidResponse("upstream model catalog has no models list")
        return models

    async def transcribe(content: AsyncIterable[bytes], content_type: str,
                         upload: UploadStream) -> Exchange:
        headers = tuple((k, v) for k, v in client_headers() if k != "content-type")
        try:
            return await proxy.forward(ProxyRequest(
                path="/transcribe", headers=(*headers, ("content-type", content_type)),
                content=content, stream=False, header_timeout=TRANSCRIBE_HEADER_TIMEOUT,
            ))
        except CodexLBError:
            if upload.too_large:
                raise RequestEntityTooLarge() from None  # answered 413, connection closed
            if upload.stalled is not None:
                raise upload.stalled from None
            raise

    def upload_of() -> UploadStream:
        length = request.content_length
        if length is not None and length > config.server.max_body_bytes:
            raise RequestEntityTooLarge()
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise ClientError("transcription uploads are not accepted with a Content-Encoding",
                              status=415, param="content-encoding")
        return UploadStream(request.body, max_bytes=config.server.max_body_bytes,
                            idle_seconds=config.server.body_idle_timeout)

    @app.post("/backend-api/transcribe")
    async def backend_transcribe() -> Response:
        """Codex's dictation: the multipart body goes up byte for byte, as it arrives."""
        content_type = request.headers.get("content-type", "")
        multipart_boundary(content_type)
        upload = upload_of()
        exchange = await transcribe(upload, content_type, upload)
        return Response(exchange.body, status=exchange.status,
                        content_type=exchange.headers.get("content-type", "application/json"))

    @app.post("/v1/audio/transcriptions")
    async def v1_transcriptions() -> Response:
        """OpenAI's shape mapped onto the backend's: ``model`` is ignored; ``{"text": …}``."""
        boundary_in = multipart_boundary(request.headers.get("content-type", ""))
        upload = upload_of()
        boundary_out = "codex-lb-trio-" + secrets.token_hex(12)
        exchange = await transcribe(
            transcription_parts(upload, boundary_in, boundary_out),
            f"multipart/form-data; boundary={boundary_out}", upload)
        try:
            text = json.loads(exchange.body)["text"]
        except (ValueError, KeyError, TypeError):
            raise InvalidResponse("upstream transcription answer has no text") from None
        return _json({"text": text})

    @app.get("/backend-api/codex/models")
    async def codex_models() -> Response:
        return _json({"models": await catalog_models()})

    @app.get("/v1/models")
    async def v1_models() -> Response:
        return _json(openai_models_list(await catalog_models()))

    @app.post("/v1/responses")
    async def v1_responses() -> Response:
        body = await json_body()
        wants_stream = stream_flag(body)
        try:
            upstream_body = responses_request_for_upstream(body, default_instructions="")
        except ClientInputError as exc:
            raise ClientError(str(exc), param=exc.param) from None
        headers = client_headers()
        exchange = await proxy.forward(ProxyRequest(
            path="/codex/responses", headers=headers, body=upstream_body,
            sticky_key=sticky_key(dict(headers), body), surface=Surface.V1_RESPONSES,
        ))
        if wants_stream:
            return sse_response(exchange)
        return _json(await collect_final_response(exchange))

    @app.post("/v1/chat/completions")
    async def v1_chat_completions() -> Response:
        body = await json_body()
        wants_stream = stream_flag(body)
        try:
            upstream_body = chat_to_responses_request(body)
        except ClientInputError as exc:
            raise ClientError(str(exc), param=exc.param) from None
        model = str(body.get("model") or "")
        created, completion_id = int(time.time()), "chatcmpl-" + secrets.token_hex(12)
        headers = client_headers()
        exchange = await proxy.forward(ProxyRequest(
            path="/codex/responses", headers=headers, body=upstream_body,
            sticky_key=sticky_key(dict(headers), upstream_body), surface=Surface.CHAT,
        ))
        if not wants_stream:
            final = await collect_final_response(exchange)
            return _json(chat_completion_from_response(final, model, created, completion_id))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        translator = ChatStreamTranslator(model, created, completion_id, include_usage=include_usage)
        assert exchange.events is not None
        events = exchange.events

        async def chunks() -> AsyncIterator[bytes]:
            with events:
                async for event in events:
                    payload = parse_event_json(event)
                    if payload is None:
                        continue
                    for chunk in translator.feed(payload):
                        yield f"data: {json.dumps(chunk)}\n\n".encode()
                    if translator.finished:
                        break
            yield b"data: [DONE]\n\n"

        response = Response(chunks(), content_type="text/event-stream", headers=SSE_HEADERS)
        response.timeout = None
        return response


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


__all__ = ["CodexLBError", "register_surfaces"]
