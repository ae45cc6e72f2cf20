"""The upstream wire format: headers, SSE framing, usage, error classification, and the
OpenAI-compatible translations (actors.upstream and actors.openai_compat)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from actors import errors
from actors.accounts import AccountStatus, Credits, Usage, UsageWindow
from actors.openai_compat import (
    ChatStreamTranslator,
    ResponseAccumulator,
    chat_completion_from_response,
    chat_to_responses_request,
    openai_models_list,
    responses_request_for_upstream,
)
from actors.upstream import (
    DEACTIVATED_CODES,
    REAUTH_CODES,
    TERMINAL_EVENT_TYPES,
    ClientInputError,
    EventTooLarge,
    InvalidPayload,
    SSEEvent,
    SSEParser,
    UpstreamFailure,
    classify_response,
    classify_stream_error_event,
    encode_sse,
    error_code,
    failed_event,
    merge_usage,
    openai_error,
    parse_event_json,
    permanent_account_status,
    upstream_headers,
    usage_from_headers,
    usage_from_rate_limits_event,
    usage_from_wham,
    usage_limit_error,
)

NOW = 1_700_000_000.0

# --- headers -------------------------------------------------------------------------------

CODEX_HEADERS = {
    "Authorization": "Bearer client-own-token",
    "ChatGPT-Account-Id": "client-own-account",
    "Host": "127.0.0.1:2455",
    "Content-Length": "123",
    "Connection": "keep-alive, Upgrade, X-Hop",
    "Keep-Alive": "timeout=5",
    "Upgrade": "websocket",
    "X-Hop": "drop me",
    "Proxy-Authorization": "Basic xyz",
    "TE": "trailers",
    "Transfer-Encoding": "chunked",
    "Forwarded": "for=1.2.3.4",
    "X-Forwarded-For": "1.2.3.4",
    "X-Forwarded-Proto": "https",
    "X-Real-IP": "1.2.3.4",
    "Sec-WebSocket-Key": "abc",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Extensions": "permessage-deflate",
    "Accept-Encoding": "gzip, br",
    "Session-Id": "sess-1",
    "Thread-Id": "thread-1",
    "Originator": "codex_cli_rs",
    "Version": "0.169.0",
    "User-Agent": "codex_cli_rs/0.169.0",
    "OpenAI-Beta": "responses_websockets=2026-02-06",
    "Accept": "text/event-stream",
    "Content-Type": "application/json",
    "X-Client-Request-Id": "req-1",
    "X-Codex-Window-Id": "win-1",
    "X-Codex-Turn-Metadata": '{"turn":1}',
    "X-Codex-Beta-Features": "a,b",
}


def test_upstream_headers_rewrites_credentials_and_drops_hop_by_hop() -> None:
    out = upstream_headers(CODEX_HEADERS, access_token="pool-token", chatgpt_account_id="acct-9")
    assert out == {
        "authorization": "Bearer pool-token",
        "chatgpt-account-id": "acct-9",
        "session-id": "sess-1",
        "thread-id": "thread-1",
        "originator": "codex_cli_rs",
        "version": "0.169.0",
        "user-agent": "codex_cli_rs/0.169.0",
        "openai-beta": "responses_websockets=2026-02-06",
        "accept": "text/event-stream",
        "content-type": "application/json",
        "x-client-request-id": "req-1",
        "x-codex-window-id": "win-1",
        "x-codex-turn-metadata": '{"turn":1}',
        "x-codex-beta-features": "a,b",
    }


def test_upstream_headers_accepts_byte_pairs_and_joins_repeats() -> None:
    pairs = [
        (b"authorization", b"Bearer client"),
        (b"x-codex-beta-features", b"a"),
        (b"X-Codex-Beta-Features", b"b"),
        (b"cookie", b"session=proxy"),
        (b"x-api-key", b"proxy-key"),
        (b":authority", b"localhost"),
    ]
    out = upstream_headers(pairs, access_token="t", chatgpt_account_id="c")
    assert out == {
        "x-codex-beta-features": "a, b",
        "authorization": "Bearer t",
        "chatgpt-account-id": "c",
    }


# --- SSE -----------------------------------------------------------------------------------

STREAM = (
    b": keep-alive comment\n\n"
    b'event: response.created\ndata: {"type":"response.created"}\n\n'
    b'event: response.output_text.delta\r\ndata: {"type":"response.output_text.delta",'
    b'"delta":"h\\u00e9"}\r\n\r\n'
    b"event: multi\ndata: line one\n: a comment inside\ndata: line two\nid: 7\nretry: 10\n\n"
    b"data:no-space\rdata:  two spaces\r\r"
    b'\n\nevent: response.completed\ndata: {"type":"response.completed"}\n\n'
)


def parse_all(chunks: list[bytes], parser: SSEParser | None = None) -> list[SSEEvent]:
    parser = parser or SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    assert parser.buffered == 0
    return events


def test_sse_parser_fields() -> None:
    events = parse_all([STREAM])
    assert [(e.event, e.data) for e in events] == [
        (None, ""),
        ("response.created", '{"type":"response.created"}'),
        ("response.output_text.delta", '{"type":"response.output_text.delta","delta":"h\\u00e9"}'),
        ("multi", "line one\nline two"),
        (None, "no-space\n two spaces"),
        ("response.completed", '{"type":"response.completed"}'),
    ]
    # "\r\r\n\n" is CR (ends the line), CRLF (ends the block), LF (a stray blank line);
    # stray blank lines between blocks ride along with the next block.
    assert events[-2].raw.endswith(b"two spaces\r\r\n")
    assert events[-1].raw.startswith(b"\nevent: response.completed")


def test_sse_parser_byte_by_byte_reproduces_raw_bytes() -> None:
    whole = parse_all([STREAM])
    one_byte = parse_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert one_byte == whole
    assert b"".join(e.raw for e in one_byte) == STREAM


@pytest.mark.parametrize("seed", range(20))
def test_sse_parser_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 30)))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    events = parse_all(chunks)
    assert events == parse_all([STREAM])
    assert b"".join(e.raw for e in events) == STREAM


def test_sse_parser_crlf_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []
    events = parser.feed(b"\n")
    assert [(e.data, e.raw) for e in events] == [("a", b"data: a\r\n\r\n")]


def test_sse_parser_strips_a_leading_bom_but_keeps_it_in_raw() -> None:
    events = parse_all([b"\xef\xbb", b"\xbfevent: x\ndata: 1\n\n"])
    assert (events[0].event, events[0].data) == ("x", "1")
    assert events[0].raw == b"\xef\xbb\xbfevent: x\ndata: 1\n\n"


def test_sse_parser_multibyte_utf8_split() -> None:
    payload = "data: 日本語\n\n".encode()
    events = parse_all([payload[:8], payload[8:]])
    assert events[0].data == "日本語"


def test_sse_parser_event_too_large() -> None:
    parser = SSEParser(max_event_bytes=64)
    assert parser.feed(b"data: " + b"x" * 40) == []
    with pytest.raises(EventTooLarge):
        parser.feed(b"x" * 40)
    assert issubclass(EventTooLarge, InvalidPayload)


def test_sse_parser_event_too_large_in_one_chunk() -> None:
    with pytest.raises(EventTooLarge):
        SSEParser(max_event_bytes=16).feed(b"data: " + b"y" * 32 + b"\n\n")


def test_sse_parser_handles_a_large_event_in_many_chunks() -> None:
    body = b"data: " + b"z" * (2 * 1024 * 1024) + b"\n\n"
    parser = SSEParser()
    events = []
    for start in range(0, len(body), 65536):
        events.extend(parser.feed(body[start : start + 65536]))
    assert len(events) == 1
    assert events[0].raw == body


def test_sse_parser_flush_returns_an_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b'event: done\ndata: {"a":1}') == []
    assert parser.buffered > 0
    events = parser.flush()
    assert [(e.event, e.data, e.raw) for e in events] == [
        ("done", '{"a":1}', b'event: done\ndata: {"a":1}')
    ]
    assert parser.buffered == 0
    assert parser.flush() == []


def test_encode_sse_round_trips() -> None:
    payload = {"type": "response.output_text.delta", "delta": "line\nbreak é"}
    raw = encode_sse("response.output_text.delta", payload)
    assert raw.startswith(b"event: response.output_text.delta\ndata: {")
    assert raw.endswith(b"\n\n")
    (event,) = SSEParser().feed(raw)
    assert event.raw == raw
    assert parse_event_json(event) == payload


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("", None),
        ("[DONE]", None),
        ("not json", None),
        ("[1, 2]", None),
        ('{"type": "x", "a": 1}', {"type": "x", "a": 1}),
        ('{"a": 1}', {"a": 1, "type": "from-event-line"}),
    ],
)
def test_parse_event_json(data: str, expected: dict[str, Any] | None) -> None:
    assert parse_event_json(SSEEvent(event="from-event-line", data=data, raw=b"")) == expected


# --- usage ---------------------------------------------------------------------------------


def test_usage_from_headers() -> None:
    headers = {
        "X-Codex-Primary-Used-Percent": "42.5",
        "x-codex-primary-window-minutes": "300",
        "x-codex-primary-reset-at": "1700003600",
        "x-codex-secondary-used-percent": "7",
        "x-codex-secondary-window-minutes": "10080",
        "x-codex-secondary-reset-at": "1700500000",
    }
    assert usage_from_headers(headers, NOW) == Usage(
        primary=UsageWindow(used_percent=42.5, reset_at=1700003600.0, window_seconds=18000),
        secondary=UsageWindow(used_percent=7.0, reset_at=1700500000.0, window_seconds=604800),
        updated_at=NOW,
    )


def test_usage_from_headers_partial_and_absent() -> None:
    usage = usage_from_headers({"x-codex-secondary-used-percent": "12"}, NOW)
    assert usage is not None
    assert usage.primary is None
    assert usage.secondary == UsageWindow(used_percent=12.0)
    assert usage_from_headers({"content-type": "text/event-stream"}, NOW) is None
    assert usage_from_headers({"x-codex-primary-used-percent": "garbage"}, NOW) is None


def test_usage_from_rate_limits_event_absolute_and_relative_resets() -> None:
    event = {
        "type": "codex.rate_limits",
        "rate_limits": {
            "primary": {"used_percent": 40.0, "window_minutes": 300, "resets_at": 1700009000},
            "secondary": {"used_percent": 5, "window_minutes": 10080, "resets_in_seconds": 600},
        },
    }
    assert usage_from_rate_limits_event(event, NOW) == Usage(
        primary=UsageWindow(used_percent=40.0, reset_at=1700009000.0, window_seconds=18000),
        secondary=UsageWindow(used_percent=5.0, reset_at=NOW + 600, window_seconds=604800),
        updated_at=NOW,
    )


def test_usage_from_rate_limits_event_is_lenient() -> None:
    event = {
        "type": "codex.rate_limits",
        "primary": {"used_percent": "9", "reset_at": 1700001000000},
    }
    usage = usage_from_rate_limits_event(event, NOW)
    assert usage is not None
    assert usage.primary == UsageWindow(used_percent=9.0, reset_at=1700001000.0)  # ms → s
    assert usage_from_rate_limits_event({"type": "codex.rate_limits"}, NOW) is None
    assert usage_from_rate_limits_event({"rate_limits": {"primary": None}}, NOW) is None


def test_usage_from_wham() -> None:
    body = {
        "plan_type": "plus",
        "rate_limit": {
            "primary_window": {
                "used_percent": 12,
                "reset_at": 1700010000,
                "limit_window_seconds": 18000,
                "reset_after_seconds": 10000,
            },
            "secondary_window": {
                "used_percent": 3,
                "limit_window_seconds": 604800,
                "reset_after_seconds": 3600,
            },
        },
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
    }
    assert usage_from_wham(body, NOW) == Usage(
        primary=UsageWindow(used_percent=12.0, reset_at=1700010000.0, window_seconds=18000),
        secondary=UsageWindow(used_percent=3.0, reset_at=NOW + 3600, window_seconds=604800),
        updated_at=NOW,
        credits=Credits(has_credits=False, unlimited=False, balance="0"),
    )
    assert usage_from_wham({"rate_limit": None}, NOW) == Usage(updated_at=NOW)


@pytest.mark.parametrize("body", [None, [], "text", {"plan_type": "plus"}, {"rate_limit": 3}])
def test_usage_from_wham_rejects_bad_payloads(body: Any) -> None:
    with pytest.raises(InvalidPayload):
        usage_from_wham(body, NOW)


def test_merge_usage_keeps_missing_windows() -> None:
    old = Usage(primary=UsageWindow(used_percent=1), secondary=UsageWindow(used_percent=2))
    new = Usage(primary=UsageWindow(used_percent=50), updated_at=NOW)
    assert merge_usage(old, new) == Usage(
        primary=UsageWindow(used_percent=50), secondary=UsageWindow(used_percent=2), updated_at=NOW
    )


# --- error codes and classification --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"code": "refresh_token_reused", "message": "m"}}, "refresh_token_reused"),
        ({"error": {"error": "nested_code"}}, "nested_code"),
        ({"error": "invalid_grant", "error_description": "d"}, "invalid_grant"),
        ({"error_code": "token_expired"}, "token_expired"),
        ({"code": "account_deactivated"}, "account_deactivated"),
        ({"error": {"code": "first", "error": "second"}, "code": "third"}, "first"),
        ({"error": {"code": None, "message": "m"}, "error_code": "fallback"}, "fallback"),
        ({"error": {"type": "invalid_request_error"}}, "http_400"),
        ({"error": ""}, "http_400"),
        ({}, "http_400"),
        ("not an object", "http_400"),
        (None, "http_400"),
        ([{"code": "x"}], "http_400"),
    ],
)
def test_error_code(body: Any, expected: str) -> None:
    assert error_code(body, 400) == expected


def test_permanent_codes_map_to_statuses() -> None:
    assert {"refresh_token_reused", "invalid_grant", "token_revoked"} <= REAUTH_CODES
    assert DEACTIVATED_CODES == {"account_deactivated", "account_suspended", "account_deleted"}
    assert permanent_account_status("refresh_token_expired") is AccountStatus.REAUTH_REQUIRED
    assert permanent_account_status("account_suspended") is AccountStatus.DEACTIVATED
    assert permanent_account_status("rate_limit_exceeded") is None


def classify(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> UpstreamFailure | None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify_response(status, raw, headers or {}, NOW)


def test_classify_success_is_none() -> None:
    assert classify(200, b"") is None
    assert classify(204, b"") is None


def test_classify_429_with_resets_at() -> None:
    body = {"error": {"type": "usage_limit_reached", "message": "limit", "resets_at": 1700001234}}
    assert classify(429, body) == UpstreamFailure(
        kind="rate_limited",
        status=429,
        code="usage_limit_reached",
        message="limit",
        resets_at=1700001234.0,
    )


def test_classify_429_with_resets_in_seconds() -> None:
    failure = classify(429, {"error": {"type": "rate_limit_exceeded", "resets_in_seconds": 90}})
    assert failure is not None
    assert (failure.kind, failure.code, failure.resets_at) == (
        "rate_limited",
        "rate_limit_exceeded",
        NOW + 90,
    )


def test_classify_429_falls_back_to_retry_after() -> None:
    failure = classify(429, b"slow down", {"Retry-After": "30"})
    assert failure is not None
    assert (failure.kind, failure.code, failure.resets_at) == ("rate_limited", "http_429", NOW + 30)
    assert failure.message == "slow down"
    dated = classify(429, b"", {"retry-after": "Tue, 14 Nov 2023 22:15:00 GMT"})
    assert dated is not None
    assert dated.resets_at == 1700000100.0


def test_classify_429_falls_back_to_exhausted_usage_headers() -> None:
    headers = {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": "1700000500"}
    failure = classify(429, {"error": {"message": "nope"}}, headers)
    assert failure is not None
    assert failure.resets_at == 1700000500.0


def test_classify_429_without_any_reset_hint() -> None:
    failure = classify(429, {"detail": "Too many requests"})
    assert failure is not None
    assert (failure.kind, failure.message, failure.resets_at) == (
        "rate_limited",
        "Too many requests",
        None,
    )


def test_classify_rate_limit_code_on_other_status() -> None:
    failure = classify(400, {"error": {"code": "usage_limit_reached"}})
    assert failure is not None
    assert failure.kind == "rate_limited"


@pytest.mark.parametrize("code", ["insufficient_quota", "usage_not_included", "quota_exceeded"])
def test_classify_quota(code: str) -> None:
    failure = classify(429, {"error": {"code": code, "message": "m", "resets_in_seconds": 5}})
    assert failure is not None
    assert (failure.kind, failure.code, failure.resets_at) == ("quota", code, NOW + 5)


def test_classify_auth() -> None:
    failure = classify(401, {"error": {"message": "bad token", "code": "invalid_api_key"}})
    assert failure is not None
    assert (failure.kind, failure.code, failure.message) == ("auth", "invalid_api_key", "bad token")
    expired = classify(403, {"error": {"code": "token_expired"}})
    assert expired is not None
    assert expired.kind == "auth"  # a refresh decides whether it is permanent


def test_classify_permanent_auth() -> None:
    failure = classify(403, {"error": {"code": "account_deactivated", "message": "gone"}})
    assert failure is not None
    assert (failure.kind, failure.status, failure.code) == (
        "permanent_auth",
        403,
        "account_deactivated",
    )


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b"internal"),
        (502, b"<html>bad gateway</html>"),
        (503, {"error": {"message": "try later"}}),
        (400, {"error": {"code": "server_is_overloaded"}}),
        (400, {"error": {"message": "The model is at capacity, try again"}}),
    ],
)
def test_classify_server(status: int, body: Any) -> None:
    failure = classify(status, body)
    assert failure is not None
    assert failure.kind == "server"
    assert failure.status == status
    assert failure.resets_at is None


def test_classify_client() -> None:
    failure = classify(400, {"detail": "Unsupported parameter: max_output_tokens"})
    assert failure is not None
    assert failure.kind == "client"
    assert failure.code == "http_400"
    assert failure.message == "Unsupported parameter: max_output_tokens"
    typed = classify(404, {"error": {"message": "no such model", "type": "invalid_request_error"}})
    assert typed is not None
    assert (typed.kind, typed.code) == ("client", "invalid_request_error")


def test_classify_stream_response_failed() -> None:
    payload = {
        "type": "response.failed",
        "response": {
            "id": "resp_1",
            "status": "failed",
            "error": {"code": "rate_limit_exceeded", "message": "Please try again in 1.5s."},
        },
    }
    failure = classify_stream_error_event(payload, NOW)
    assert failure == UpstreamFailure(
        kind="rate_limited",
        status=429,
        code="rate_limit_exceeded",
        message="Please try again in 1.5s.",
        resets_at=NOW + 1.5,
    )


@pytest.mark.parametrize(
    ("payload", "kind", "status"),
    [
        ({"type": "error", "code": "insufficient_quota", "message": "m"}, "quota", 429),
        ({"type": "error", "error": {"type": "usage_limit_reached"}}, "rate_limited", 429),
        ({"type": "error", "error": {"code": "server_is_overloaded"}}, "server", 503),
        ({"type": "error", "message": "Model at capacity"}, "server", 503),
        (
            {"type": "response.failed", "response": {"error": {"code": "account_suspended"}}},
            "permanent_auth",
            403,
        ),
    ],
)
def test_classify_stream_error_kinds(payload: dict[str, Any], kind: str, status: int) -> None:
    failure = classify_stream_error_event(payload, NOW)
    assert failure is not None
    assert (failure.kind, failure.status) == (kind, status)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "response.failed", "response": {"error": {"code": "context_length_exceeded"}}},
        {"type": "response.failed", "response": {"status": "failed"}},
        {"type": "response.completed", "response": {}},
        {"type": "error", "message": "invalid prompt"},
    ],
)
def test_classify_stream_ignores_other_events(payload: dict[str, Any]) -> None:
    assert classify_stream_error_event(payload, NOW) is None


# --- terminal events and error bodies --------------------------------------------------------


def test_terminal_event_types() -> None:
    assert TERMINAL_EVENT_TYPES == {
        "response.completed",
        "response.failed",
        "response.incomplete",
        "error",
    }


def test_failed_event_shape() -> None:
    event = failed_event("upstream_connection_lost", "the path died", "resp_42")
    assert event == {
        "type": "response.failed",
        "response": {
            "id": "resp_42",
            "object": "response",
            "status": "failed",
            "error": {"code": "upstream_connection_lost", "message": "the path died"},
            "output": [],
        },
    }
    generated = failed_event("x", "y")["response"]["id"]
    assert generated.startswith("resp_")
    assert generated != failed_event("x", "y")["response"]["id"]


def test_openai_error_shape() -> None:
    assert openai_error("bad", "invalid_request_error") == {
        "error": {"message": "bad", "type": "invalid_request_error", "code": None}
    }
    assert openai_error("bad", "invalid_request_error", "missing", param="model") == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "code": "missing",
            "param": "model",
        }
    }


def test_usage_limit_error_for_codex() -> None:
    body = usage_limit_error(NOW + 59.2, NOW)
    assert body["error"]["type"] == "usage_limit_reached"
    assert body["error"]["code"] == "usage_limit_reached"
    assert body["error"]["resets_at"] == int(NOW) + 60
    assert body["error"]["resets_in_seconds"] == 60
    assert error_code(body, 429) == "usage_limit_reached"


# --- /v1/responses and /v1/models --------------------------------------------------------------


def test_responses_request_wraps_string_input_and_forces_stream() -> None:
    body = {
        "model": "gpt-5",
        "input": "hi",
        "store": True,
        "stream": False,
        "max_output_tokens": 100,
        "temperature": 0.2,
        "prompt_cache_key": "k",
    }
    out = responses_request_for_upstream(body)
    assert out == {
        "model": "gpt-5",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        ],
        "store": False,
        "stream": True,
        "prompt_cache_key": "k",
    }
    assert body["stream"] is False  # the caller's copy is untouched


def test_responses_request_keeps_list_input_and_fills_instructions() -> None:
    items = [{"type": "message", "role": "user", "content": "x"}]
    out = responses_request_for_upstream(
        {"model": "m", "input": items}, default_instructions="be brief"
    )
    assert out["input"] == items
    assert out["instructions"] == "be brief"
    kept = responses_request_for_upstream(
        {"model": "m", "input": items, "instructions": "mine"}, default_instructions="be brief"
    )
    assert kept["instructions"] == "mine"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"input": "x"}, "model"),
        ({"model": "", "input": "x"}, "model"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": ["text"]}, "input[0]"),
        ({"model": "m", "input": "x", "instructions": 1}, "instructions"),
        ({"model": "m", "input": "x", "tools": {}}, "tools"),
    ],
)
def test_responses_request_rejects_bad_shapes(body: Any, param: str | None) -> None:
    with pytest.raises(ClientInputError) as caught:
        responses_request_for_upstream(body)
    assert caught.value.param == param


def test_openai_models_list() -> None:
    models = [
        {"slug": "gpt-5", "display_name": "GPT-5"},
        {"slug": "gpt-5-codex"},
        {"display_name": "no slug"},
        {"slug": "gpt-5"},
        "junk",
    ]
    assert openai_models_list(models) == {
        "object": "list",
        "data": [
            {"id": "gpt-5", "object": "model", "created": 0, "owned_by": "openai"},
            {"id": "gpt-5-codex", "object": "model", "created": 0, "owned_by": "openai"},
        ],
    }


# --- Chat Completions → Responses --------------------------------------------------------------


def test_chat_request_translation() -> None:
    body = {
        "model": "gpt-5",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q":"cat"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "assistant", "content": "It is a cat."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Look something up",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "parallel_tool_calls": False,
        "reasoning_effort": "high",
        "max_tokens": 100,
        "max_completion_tokens": 100,
        "temperature": 0.5,
        "stream": False,
    }
    assert chat_to_responses_request(body, default_instructions="default") == {
        "model": "gpt-5",
        "instructions": "You are terse.\n\nUse tools.",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this image?"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,AAA",
                        "detail": "auto",
                    },
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                ],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "lookup",
                "arguments": '{"q":"cat"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "It is a cat."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Thanks"}],
            },
        ],
        "tools": [
            {
                "type": "function",
                "name": "lookup",
                "description": "Look something up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            }
        ],
        "tool_choice": {"type": "function", "name": "lookup"},
        "parallel_tool_calls": False,
        "reasoning": {"effort": "high"},
        "store": False,
        "stream": True,
    }


def test_chat_request_defaults() -> None:
    out = chat_to_responses_request(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        default_instructions="default",
    )
    assert out["instructions"] == "default"
    assert out["tools"] == []
    assert out["tool_choice"] == "auto"
    assert (out["store"], out["stream"]) == (False, True)
    assert "reasoning" not in out


def test_chat_request_response_format_and_dict_arguments() -> None:
    out = chat_to_responses_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
                },
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
            },
        }
    )
    assert out["input"] == [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a": 1}'}
    ]
    assert out["text"] == {
        "format": {
            "type": "json_schema",
            "name": "answer",
            "schema": {"type": "object"},
            "strict": True,
        }
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("nope", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": {}}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0]",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
            "messages[0].tool_calls",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search"}],
            },
            "tools[0]",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": 3},
            "tool_choice",
        ),
    ],
)
def test_chat_request_rejects_malformed_input(body: Any, param: str | None) -> None:
    with pytest.raises(ClientInputError) as caught:
        chat_to_responses_request(body)
    assert caught.value.param == param


# --- Responses stream → Chat chunks ------------------------------------------------------------

TEXT_STREAM: list[dict[str, Any]] = [
    {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
    {"type": "codex.rate_limits", "rate_limits": {}},
    {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {"type": "message", "id": "msg_1", "role": "assistant", "content": []},
    },
    {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "delta": "Hel"},
    {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "delta": "lo"},
    {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello"}],
        },
    },
    {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "status": "completed",
            "output": [],
            "usage": {
                "input_tokens": 10,
                "output_tokens": 2,
                "total_tokens": 12,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens_details": {"reasoning_tokens": 1},
            },
        },
    },
]

TOOL_STREAM: list[dict[str, Any]] = [
    {"type": "response.created", "response": {"id": "resp_2"}},
    {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {"type": "reasoning", "id": "rs_1"},
    },
    {
        "type": "response.output_item.added",
        "output_index": 1,
        "item": {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_a",
            "name": "lookup",
            "arguments": "",
        },
    },
    {
        "type": "response.function_call_arguments.delta",
        "item_id": "fc_1",
        "output_index": 1,
        "delta": '{"q":',
    },
    {
        "type": "response.function_call_arguments.delta",
        "item_id": "fc_1",
        "output_index": 1,
        "delta": '"cat"}',
    },
    {
        "type": "response.output_item.done",
        "output_index": 1,
        "item": {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_a",
            "name": "lookup",
            "arguments": '{"q":"cat"}',
        },
    },
    # The second call's arguments arrive only with its done event.
    {
        "type": "response.output_item.added",
        "output_index": 2,
        "item": {
            "type": "function_call",
            "id": "fc_2",
            "call_id": "call_b",
            "name": "other",
            "arguments": "",
        },
    },
    {
        "type": "response.output_item.done",
        "output_index": 2,
        "item": {
            "type": "function_call",
            "id": "fc_2",
            "call_id": "call_b",
            "name": "other",
            "arguments": "{}",
        },
    },
    {
        "type": "response.completed",
        "response": {
            "id": "resp_2",
            "status": "completed",
            "usage": {"input_tokens": 3, "output_tokens": 4},
        },
    },
]


def translate(
    events: list[dict[str, Any]], **kwargs: Any
) -> tuple[ChatStreamTranslator, list[dict[str, Any]]]:
    translator = ChatStreamTranslator("gpt-5", 1234, "chatcmpl-1", **kwargs)
    chunks = [chunk for event in events for chunk in translator.feed(event)]
    return translator, chunks


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]


def test_chat_stream_text() -> None:
    translator, chunks = translate(TEXT_STREAM)
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == ("chatcmpl-1", 1234, "gpt-5")
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert translator.finished
    assert translator.usage == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    assert translator.feed({"type": "response.output_text.delta", "delta": "late"}) == []


def test_chat_stream_include_usage_adds_a_usage_chunk() -> None:
    _, chunks = translate(TEXT_STREAM, include_usage=True)
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["total_tokens"] == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_tool_calls() -> None:
    translator, chunks = translate(TOOL_STREAM)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"cat"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "other", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert translator.finish_reason == "tool_calls"


def test_chat_stream_text_only_in_done_item_is_not_lost() -> None:
    events: list[dict[str, Any]] = [
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {
                "type": "message",
                "id": "m",
                "content": [{"type": "output_text", "text": "whole"}],
            },
        },
        {"type": "response.completed", "response": {"status": "completed"}},
    ]
    _, chunks = translate(events)
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "whole"}, {}]


def test_chat_stream_incomplete_is_length() -> None:
    events: list[dict[str, Any]] = [
        {"type": "response.output_text.delta", "item_id": "m", "delta": "cut"},
        {
            "type": "response.incomplete",
            "response": {
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
            },
        },
    ]
    translator, chunks = translate(events)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert translator.finished


def test_chat_stream_failure_becomes_an_error_chunk() -> None:
    events = [
        {"type": "response.created", "response": {}},
        failed_event("upstream_connection_lost", "path died"),
    ]
    translator, chunks = translate(events)
    assert chunks[-1] == {
        "error": {
            "message": "path died",
            "type": "server_error",
            "code": "upstream_connection_lost",
        }
    }
    assert translator.finished


# --- non-stream answers -------------------------------------------------------------------------


def accumulate(events: list[dict[str, Any]]) -> dict[str, Any]:
    accumulator = ResponseAccumulator()
    for event in events:
        accumulator.feed(event)
    assert accumulator.finished
    response = accumulator.response
    assert response is not None
    return response


def test_accumulator_backfills_empty_output_from_done_items() -> None:
    response = accumulate(TOOL_STREAM)
    assert [item["call_id"] for item in response["output"]] == ["call_a", "call_b"]
    text = accumulate(TEXT_STREAM)
    assert text["output"][0]["content"] == [{"type": "output_text", "text": "Hello"}]


def test_accumulator_keeps_a_populated_output_and_synthesises_from_deltas() -> None:
    populated = [{"type": "response.completed", "response": {"output": [{"type": "message"}]}}]
    assert accumulate(populated)["output"] == [{"type": "message"}]
    only_deltas: list[dict[str, Any]] = [
        {"type": "response.output_text.delta", "delta": "a"},
        {"type": "response.output_text.delta", "delta": "b"},
        {"type": "response.completed", "response": {"status": "completed"}},
    ]
    output = accumulate(only_deltas)["output"]
    assert output[0]["content"][0]["text"] == "ab"
    pending = ResponseAccumulator()
    pending.feed({"type": "response.created", "response": {}})
    assert (pending.finished, pending.response) == (False, None)


def test_chat_completion_from_response_text() -> None:
    completion = chat_completion_from_response(accumulate(TEXT_STREAM), "gpt-5", 99, "chatcmpl-9")
    assert completion == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 99,
        "model": "gpt-5",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }


def test_chat_completion_from_response_tool_calls() -> None:
    completion = chat_completion_from_response(accumulate(TOOL_STREAM), "gpt-5", 99, "chatcmpl-9")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"q":"cat"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "other", "arguments": "{}"}},
    ]
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_completion_from_incomplete_response() -> None:
    response = {
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "par"}]}],
    }
    completion = chat_completion_from_response(response, "m", 1, "c")
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["message"]["content"] == "par"
    assert "usage" not in completion


def test_chat_request_legacy_functions_and_function_call() -> None:
    out = chat_to_responses_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "functions": [{"name": "f", "parameters": {"type": "object"}}],
            "function_call": {"name": "f"},
        }
    )
    assert out["tools"] == [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "function", "name": "f"}


def test_input_errors_fit_the_error_tree() -> None:
    error = ClientInputError("'model' is required", "model")
    assert isinstance(error, ValueError)
    assert errors.classify(error) is error
    assert errors.openai_error_body(error) == {
        "error": {
            "message": "'model' is required",
            "type": "invalid_request_error",
            "code": "invalid_request_error",
            "param": "model",
        }
    }
    assert isinstance(errors.classify(EventTooLarge("big")), errors.InvalidResponse)
