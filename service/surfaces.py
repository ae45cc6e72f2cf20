"""The client-facing surfaces: Codex's backend paths and the OpenAI-compatible /v1.

Split from app.py (admin routes, error handling) to keep both readable. Every route
turns the request into a ``ProxyRequest`` and streams the ``Exchange`` back without
buffering; response timeouts are off for streams.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, overload

import trio
from quart import Quart, Response, current_app, request, websocket

from actors.balancer import sticky_key
from actors.errors import ClientError, CodexLBError, InvalidResponse
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
from service.body import BodyReader
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
    """Relay an exchange's events byte for byte."""
    assert exchange.events is not None
    events = exchange.events

    async def body() -> AsyncIterator[bytes]:
        with events:
            async for event in events:
                yield event.raw

    response = Response(body(), status=exchange.status, content_type="text/event-stream",
                        headers=SSE_HEADERS)
    response.timeout = None
    return response


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


def register_surfaces(app: Quart, engine: Engine, config: Config) -> None:
    proxy = engine.proxy

    async def forward_codex(path: str, *, stream: bool) -> Exchange:
        body = await json_body()
        stream_flag(body)
        headers = client_headers()
        return await proxy.forward(ProxyRequest(
            path=path, headers=headers, body=body, stream=stream,
            sticky_key=sticky_key(dict(headers), body),
        ))

    @app.post("/backend-api/codex/responses")
    async def codex_responses() -> Response:
        return sse_response(await forward_codex("/codex/responses", stream=True))

    @app.websocket("/backend-api/codex/responses")
    async def codex_responses_websocket() -> Response | None:
        try:
            headers = checked_headers(websocket.headers.items())
            session = await proxy.open_websocket(ProxyRequest(
                path="/codex/responses", headers=headers, sticky_key=sticky_key(dict(headers), None),
            ))
        except CodexLBError as exc:
            # Refuse the upgrade with a plain HTTP error (Codex then falls back to SSE).
            from service.app import upgrade_refusal, error_response

            return upgrade_refusal(error_response(exc))
        await websocket.accept()

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
        exchange = await forward_codex("/codex/responses/compact", stream=False)
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
