"""The OpenAI-compatible surface: ``/v1/responses`` bodies, ``/v1/models``, and Chat Completions.

Chat Completions requests become Responses requests for the upstream; the upstream's
Responses stream becomes ``chat.completion.chunk`` objects (or one ``chat.completion``).
Everything here is pure: dicts in, dicts out. Bad client input raises ClientInputError,
which the app turns into a 400 in OpenAI's error shape.

The ChatGPT backend (store=false) ends streams with a ``response.completed`` whose
``output`` is often empty; the items arrive only as ``response.output_item.done``.
ResponseAccumulator puts them back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from actors.upstream import ClientInputError

# Parameters the ChatGPT backend rejects with 400 "Unsupported parameter": it manages
# output budgets and sampling itself. background is meaningless with store=false.
UNSUPPORTED_RESPONSES_PARAMS = frozenset(
    {"max_output_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
     "background"}
)  # fmt: skip


def _user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def responses_request_for_upstream(
    body: Any, *, default_instructions: str | None = None
) -> dict[str, Any]:
    """Check a ``/v1/responses`` body and shape it for the upstream (a new dict).

    Forces ``store: false`` and ``stream: true`` and drops parameters the upstream rejects;
    whether the client wanted a stream is for the caller to read from the original body.
    """
    if not isinstance(body, Mapping):
        raise ClientInputError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ClientInputError("'model' is required and must be a non-empty string", "model")
    items = body.get("input")
    if isinstance(items, str):
        items = [_user_message(items)]
    elif isinstance(items, list):
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ClientInputError(f"input[{index}] must be an object", f"input[{index}]")
    else:
        raise ClientInputError("'input' is required: a string or a list of items", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ClientInputError("'instructions' must be a string", "instructions")
    for name in ("tools", "include"):
        if body.get(name) is not None and not isinstance(body[name], list):
            raise ClientInputError(f"'{name}' must be a list", name)
    out = {k: v for k, v in body.items() if k not in UNSUPPORTED_RESPONSES_PARAMS}
    out["input"] = items
    if instructions is None and default_instructions is not None:
        out["instructions"] = default_instructions
    out["store"] = False
    out["stream"] = True
    return out


def openai_models_list(models: Iterable[Any]) -> dict[str, Any]:
    """The upstream model catalog as ``GET /v1/models`` answers it."""
    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for model in models:
        slug = model.get("slug") if isinstance(model, Mapping) else None
        if isinstance(slug, str) and slug and slug not in seen:
            seen.add(slug)
            data.append({"id": slug, "object": "model", "created": 0, "owned_by": "openai"})
    return {"object": "list", "data": data}


# --- Chat Completions request → Responses request ----------------------------------------

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def _text(content: Any, where: str) -> str:
    """The text of a content that may only hold text (system, developer, tool messages)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ClientInputError(f"{where}.content must be a string or a list", f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS):
            raise ClientInputError(
                f"{where}.content[{index}] must be a text part", f"{where}.content"
            )
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise ClientInputError(f"{where}.content must be a string or a list", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "input_text", "text": str(part.get("text") or "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str) or not url:
                raise ClientInputError(f"{where}.content[{index}] needs image_url.url", where)
            detail = image.get("detail") if isinstance(image, Mapping) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        elif kind == "file" and isinstance(part.get("file"), Mapping):
            file = part["file"]
            keys = ("file_data", "file_id", "filename")
            parts.append({"type": "input_file", **{k: file[k] for k in keys if k in file}})
        else:
            raise ClientInputError(
                f"{where}.content[{index}] has an unsupported part type {kind!r}", where
            )
    return parts


def _assistant_items(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "refusal":
                parts.append({"type": "refusal", "refusal": str(part.get("refusal") or "")})
            else:
                parts.append({"type": "output_text", "text": _text([part], where)})
    elif text := _text(content, where):
        parts.append({"type": "output_text", "text": text})
    if parts:
        items.append({"type": "message", "role": "assistant", "content": parts})
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ClientInputError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    for index, call in enumerate(calls):
        if (
            not isinstance(call, Mapping)
            or not isinstance(function := call.get("function"), Mapping)
            or not isinstance(name := function.get("name"), str)
            or not name
        ):
            raise ClientInputError(
                f"{where}.tool_calls[{index}].function.name is required", f"{where}.tool_calls"
            )
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = "" if arguments is None else json.dumps(arguments)
        call_id = str(call.get("id") or f"call_{index}")
        items.append({"type": "function_call", "call_id": call_id, "name": name,
                      "arguments": arguments})  # fmt: skip
    return items


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("tools")
    if raw is None and isinstance(body.get("functions"), list):  # the legacy spelling
        raw = [{"type": "function", "function": function} for function in body["functions"]]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ClientInputError("'tools' must be a list", "tools")
    tools = []
    for index, tool in enumerate(raw):
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(function := tool.get("function"), Mapping)
        ):
            raise ClientInputError(f"tools[{index}] must be a function tool", f"tools[{index}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ClientInputError(f"tools[{index}].function.name is required", "tools")
        converted: dict[str, Any] = {
            "type": "function",
            "name": function["name"],
            "parameters": function.get("parameters") or {"type": "object", "properties": {}},
        }
        for key in ("description", "strict"):
            if function.get(key) is not None:
                converted[key] = function[key]
        tools.append(converted)
    return tools


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "name": name}
    raise ClientInputError(
        "'tool_choice' must be auto, none, required or a function", "tool_choice"
    )


def _text_format(response_format: Any) -> dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
        schema = response_format["json_schema"]
        out = {"type": "json_schema", "name": schema.get("name") or "response"}
        out.update({k: schema[k] for k in ("schema", "strict", "description") if k in schema})
        return out
    raise ClientInputError("unsupported response_format", "response_format")


def chat_to_responses_request(body: Any, *, default_instructions: str = "") -> dict[str, Any]:
    """Translate a Chat Completions request into the upstream Responses request.

    System and developer messages become ``instructions``; the rest become input items.
    ``max_tokens``/``max_completion_tokens`` and sampling knobs are dropped: the upstream
    rejects them. The answer is always requested as a stream with ``store: false``.
    """
    if not isinstance(body, Mapping):
        raise ClientInputError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ClientInputError("'model' is required and must be a non-empty string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientInputError("'messages' must be a non-empty list", "messages")
    if body.get("n") not in (None, 1):
        raise ClientInputError("only n=1 is supported", "n")
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ClientInputError(f"{where} must be an object", where)
        role = message.get("role")
        if role in ("system", "developer"):
            if text := _text(message.get("content"), where):
                instructions.append(text)
        elif role == "user":
            parts = _user_parts(message.get("content"), where)
            items.append({"type": "message", "role": "user", "content": parts})
        elif role == "assistant":
            items.extend(_assistant_items(message, where))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ClientInputError(f"{where}.tool_call_id is required", f"{where}.tool_call_id")
            output = _text(message.get("content"), where)
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        else:
            raise ClientInputError(f"{where}.role {role!r} is not supported", f"{where}.role")
    request: dict[str, Any] = {
        "model": model,
        "instructions": "\n\n".join(instructions) if instructions else default_instructions,
        "input": items,
        "tools": _tools(body),
        "tool_choice": "auto",
        "store": False,
        "stream": True,
    }
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is not None:
        request["tool_choice"] = _tool_choice(choice)
    if isinstance(body.get("parallel_tool_calls"), bool):
        request["parallel_tool_calls"] = body["parallel_tool_calls"]
    if isinstance(effort := body.get("reasoning_effort"), str):
        request["reasoning"] = {"effort": effort}
    if (text_format := _text_format(body.get("response_format"))) is not None:
        request["text"] = {"format": text_format}
    if isinstance(body.get("prompt_cache_key"), str):
        request["prompt_cache_key"] = body["prompt_cache_key"]
    return request


# --- Responses answer → Chat Completions answer ------------------------------------------


def chat_usage(usage: Any) -> dict[str, Any] | None:
    """Responses ``usage`` in Chat Completions terms."""
    if not isinstance(usage, Mapping):
        return None
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }
    details = usage.get("input_tokens_details")
    if isinstance(details, Mapping) and details.get("cached_tokens") is not None:
        out["prompt_tokens_details"] = {"cached_tokens": int(details["cached_tokens"])}
    details = usage.get("output_tokens_details")
    if isinstance(details, Mapping) and details.get("reasoning_tokens") is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": int(details["reasoning_tokens"])}
    return out


def _finish_reason(response: Mapping[str, Any], *, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "stop"


def _message_text(item: Mapping[str, Any], kind: str, key: str) -> str:
    content = item.get("content")
    parts = content if isinstance(content, list) else []
    return "".join(
        str(part.get(key) or "")
        for part in parts
        if isinstance(part, Mapping) and part.get("type") == kind
    )


def chat_completion_from_response(
    response: Mapping[str, Any], model: str, created: int, completion_id: str
) -> dict[str, Any]:
    """A whole ``chat.completion`` from the final Responses ``response`` object."""
    output = response.get("output")
    text, refusal, tool_calls = "", "", []
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, Mapping):
            continue
        if item.get("type") == "message":
            text += _message_text(item, "output_text", "text")
            refusal += _message_text(item, "refusal", "refusal")
        elif item.get("type") == "function_call":
            tool_calls.append(
                {
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
        "refusal": refusal or None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    completion: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(response, tool_calls=bool(tool_calls)),
            }
        ],
    }
    if (usage := chat_usage(response.get("usage"))) is not None:
        completion["usage"] = usage
    return completion


@dataclass(slots=True)
class _Call:
    index: int
    sent: str = ""  # the arguments already passed to the client


class ChatStreamTranslator:
    """Turns Responses stream events into ``chat.completion.chunk`` dicts, one request each.

    The first chunk carries the role; text deltas become ``content``; function calls become
    ``tool_calls`` deltas with a stable index; the terminal event gives a chunk with
    ``finish_reason`` (then, with ``include_usage``, OpenAI's usage-only chunk). A failed
    response becomes ``{"error": …}``, which OpenAI's SDKs raise as an APIError.
    """

    def __init__(
        self, model: str, created: int, completion_id: str, *, include_usage: bool = False
    ) -> None:
        self._model = model
        self._created = created
        self._completion_id = completion_id
        self._include_usage = include_usage
        self._started = False
        self._calls: dict[str, _Call] = {}  # by item id, and by "#<output_index>"
        self._call_count = 0
        self._texted: set[str] = set()  # message items whose text came as deltas
        self.finished = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._completion_id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
        }  # fmt: skip

    def _call_delta(self, call: _Call, **fields: Any) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": call.index, **fields}]})

    def _find(self, payload: Mapping[str, Any], item: Mapping[str, Any]) -> _Call | None:
        for key in (item.get("id"), payload.get("item_id"), f"#{payload.get('output_index')}"):
            if isinstance(key, str) and key in self._calls:
                return self._calls[key]
        return None

    def feed(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.finished:
            return []
        chunks: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        kind = payload.get("type")
        raw_item = payload.get("item")
        item: Mapping[str, Any] = raw_item if isinstance(raw_item, Mapping) else {}
        delta = payload.get("delta")
        if kind == "response.output_text.delta" and isinstance(delta, str) and delta:
            self._texted.add(str(payload.get("item_id")))
            chunks.append(self._chunk({"content": delta}))
        elif kind == "response.refusal.delta" and isinstance(delta, str) and delta:
            chunks.append(self._chunk({"refusal": delta}))
        elif kind == "response.output_item.added" and item.get("type") == "function_call":
            chunks.extend(self._start_call(payload, item))
        elif kind == "response.function_call_arguments.delta" and isinstance(delta, str):
            if (call := self._find(payload, item)) is not None and delta:
                call.sent += delta
                chunks.append(self._call_delta(call, function={"arguments": delta}))
        elif kind == "response.output_item.done":
            chunks.extend(self._item_done(payload, item))
        elif kind in ("response.completed", "response.incomplete"):
            chunks.extend(self._finish(payload))
        elif kind in ("response.failed", "error"):
            self.finished = True
            chunks.append({"error": _stream_error(payload)})
        return chunks

    def _start_call(
        self, payload: Mapping[str, Any], item: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        call = _Call(index=self._call_count)
        self._call_count += 1
        for key in (item.get("id"), f"#{payload.get('output_index')}"):
            if isinstance(key, str):
                self._calls[key] = call
        fields = {"id": item.get("call_id") or item.get("id"), "type": "function",
                  "function": {"name": item.get("name") or "", "arguments": ""}}  # fmt: skip
        return [self._call_delta(call, **fields)]

    def _item_done(
        self, payload: Mapping[str, Any], item: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        if item.get("type") == "function_call":
            call = self._find(payload, item)
            if call is None:  # never announced: announce it now
                chunks.extend(self._start_call(payload, item))
                call = self._find(payload, item)
            arguments = item.get("arguments")
            if call is not None and isinstance(arguments, str) and arguments.startswith(call.sent):
                if rest := arguments[len(call.sent) :]:
                    call.sent = arguments
                    chunks.append(self._call_delta(call, function={"arguments": rest}))
        elif item.get("type") == "message" and str(item.get("id")) not in self._texted:
            if text := _message_text(item, "output_text", "text"):
                chunks.append(self._chunk({"content": text}))
        return chunks

    def _finish(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.finished = True
        raw = payload.get("response")
        response: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        if payload.get("type") == "response.incomplete" and "status" not in response:
            response = {**response, "status": "incomplete"}
        self.finish_reason = _finish_reason(response, tool_calls=self._call_count > 0)
        self.usage = chat_usage(response.get("usage"))
        chunks = [self._chunk({}, self.finish_reason)]
        if self._include_usage:
            chunks.append({**self._chunk({}), "choices": [], "usage": self.usage})
        return chunks


def _stream_error(payload: Mapping[str, Any]) -> dict[str, Any]:
    response = payload.get("response")
    err = response.get("error") if isinstance(response, Mapping) else payload.get("error")
    err_map: Mapping[str, Any] = err if isinstance(err, Mapping) else payload
    return {
        "message": str(err_map.get("message") or "the upstream response failed"),
        "type": "server_error",
        "code": err_map.get("code"),
    }


class ResponseAccumulator:
    """Collects a Responses stream into the final ``response`` object (non-stream answers).

    Fills ``output`` from the ``response.output_item.done`` items (in output_index order)
    when the terminal event's own ``output`` is empty, as the ChatGPT backend sends it.
    """

    def __init__(self) -> None:
        self._items: dict[int, dict[str, Any]] = {}
        self._text: list[str] = []
        self.terminal_type: str | None = None
        self._response: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.terminal_type is not None

    def feed(self, payload: Mapping[str, Any]) -> None:
        kind = payload.get("type")
        if self.finished:
            return
        if kind == "response.output_text.delta" and isinstance(payload.get("delta"), str):
            self._text.append(payload["delta"])
        elif kind == "response.output_item.done" and isinstance(payload.get("item"), Mapping):
            index = payload.get("output_index")
            key = index if isinstance(index, int) else len(self._items) + 1_000_000
            self._items[key] = dict(payload["item"])
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.terminal_type = str(kind)
            raw = payload.get("response")
            self._response = dict(raw) if isinstance(raw, Mapping) else {}
        elif kind == "error":
            self.terminal_type = "error"
            self._response = {"status": "failed", "error": _stream_error(payload), "output": []}

    @property
    def response(self) -> dict[str, Any] | None:
        """The final response with its output filled in; None until a terminal event."""
        if self._response is None:
            return None
        response = dict(self._response)
        if not response.get("output"):
            if self._items:
                response["output"] = [self._items[key] for key in sorted(self._items)]
            elif self._text:
                text = "".join(self._text)
                response["output"] = [
                    {"type": "message", "role": "assistant", "status": "completed",
                     "content": [{"type": "output_text", "text": text, "annotations": []}]}
                ]  # fmt: skip
        return response
