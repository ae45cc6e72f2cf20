"""Bad client input on real sockets: a 4xx in OpenAI's error shape, then the server keeps serving.

Every case here goes through hypercorn and quart-trio on loopback (``open_stack``), so the
error handling under test is the one a client meets. After each refusal a normal Codex turn
must still complete, and the refused request must never have reached the upstream. The last
tests cover the proxy's API keys and the rule that no access token ever appears in an error
body or a log line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from tests.fakes.upstream import FakeAccount, FakeUpstream
from tests.stack import CODEX_BODY, Stack, open_stack, read_sse

CODEX_PATH = "/backend-api/codex/responses"
JSON = {"content-type": "application/json"}
CLIENT_OWN_TOKEN = "client-own-token-7f3a9c"  # what Codex CLI sends: its own login, never ours
CODEX_HEADERS = {"session-id": "bad-input", "originator": "codex_exec",
                 "authorization": f"Bearer {CLIENT_OWN_TOKEN}", "chatgpt-account-id": "client-own"}
# The CLI quiets these the same way (service.cli.setup_logging); everything else is captured.
QUIETED_LOGGERS = ("httpx", "httpcore", "hpack")


def assert_openai_error(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Check the status and OpenAI's ``{"error": {"message", "type", "code"}}``; return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    for key in ("message", "type", "code"):
        assert isinstance(error.get(key), str), (key, error)
        assert error[key], (key, error)
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error.get("param") == param, error
    return error


async def codex_turn(
    http: httpx.AsyncClient, *, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """One streaming Codex turn; the events, or none when the status is not 200."""
    async with http.stream("POST", CODEX_PATH, json=CODEX_BODY,
                           headers=headers or CODEX_HEADERS) as response:
        if response.status_code != 200:
            await response.aread()
            return response, []
        return response, await read_sse(response)


async def assert_still_serving(stack: Stack, http: httpx.AsyncClient, **headers: str) -> None:
    """A normal turn completes on the same client (and so on a kept-alive connection if any)."""
    response, events = await codex_turn(http, headers={**CODEX_HEADERS, **headers})
    assert response.status_code == 200, response.text
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == stack.fake.reply_text


@dataclass(frozen=True)
class BadRequest:
    """One bad request and the refusal it must get."""

    name: str
    method: str
    path: str
    status: int
    code: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None
    says: str = ""  # a word the message must contain, so a client can tell what to fix

    def send(self, http: httpx.AsyncClient) -> Any:
        return http.request(self.method, self.path, content=self.content,
                            headers={**CODEX_HEADERS, **self.headers})


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


BAD_REQUESTS = [
    BadRequest("malformed-json-codex", "POST", CODEX_PATH, 400, "invalid_request_error",
               content=b'{"model": "gpt-5-codex", "input": [', headers=JSON, says="JSON"),
    BadRequest("malformed-json-chat", "POST", "/v1/chat/completions", 400, "invalid_request_error",
               content=b"{'model': 'single quotes'}", headers=JSON, says="JSON"),
    BadRequest("not-utf8", "POST", "/v1/responses", 400, "invalid_request_error",
               content=b'{"model": "\xff\xfe"}', headers=JSON, says="JSON"),
    BadRequest("empty-body", "POST", CODEX_PATH, 400, "invalid_request_error",
               content=b"", headers=JSON, says="JSON"),
    BadRequest("text-plain", "POST", CODEX_PATH, 415, "invalid_request_error",
               content=_json_bytes(CODEX_BODY), headers={"content-type": "text/plain"},
               says="Content-Type"),
    BadRequest("no-content-type", "POST", "/v1/responses", 415, "invalid_request_error",
               content=_json_bytes({"model": "gpt-5", "input": "hi"}), says="Content-Type"),
    BadRequest("json-list", "POST", CODEX_PATH, 400, "invalid_request_error",
               content=_json_bytes([CODEX_BODY]), headers=JSON, says="object"),
    BadRequest("json-null", "POST", "/v1/chat/completions", 400, "invalid_request_error",
               content=b"null", headers=JSON, says="object"),
    BadRequest("unknown-route", "GET", "/v1/nothing-here", 404, "not_found",
               says="/v1/nothing-here"),
    BadRequest("unknown-codex-route", "POST", "/backend-api/codex/nothing", 404, "not_found",
               content=_json_bytes(CODEX_BODY), headers=JSON, says="/backend-api/codex/nothing"),
    BadRequest("wrong-method-chat", "GET", "/v1/chat/completions", 405, "method_not_allowed",
               says="GET"),
    BadRequest("wrong-method-health", "DELETE", "/health", 405, "method_not_allowed",
               says="DELETE"),
    BadRequest("responses-without-model", "POST", "/v1/responses", 400, "invalid_request_error",
               content=_json_bytes({"input": "hi"}), headers=JSON, param="model", says="model"),
    BadRequest("responses-blank-model", "POST", "/v1/responses", 400, "invalid_request_error",
               content=_json_bytes({"model": "  ", "input": "hi"}), headers=JSON, param="model"),
    BadRequest("responses-input-number", "POST", "/v1/responses", 400, "invalid_request_error",
               content=_json_bytes({"model": "gpt-5", "input": 42}), headers=JSON,
               param="input", says="input"),
    BadRequest("responses-input-item-not-object", "POST", "/v1/responses", 400,
               "invalid_request_error", content=_json_bytes({"model": "gpt-5", "input": ["hi"]}),
               headers=JSON, param="input[0]"),
    BadRequest("chat-without-messages", "POST", "/v1/chat/completions", 400,
               "invalid_request_error", content=_json_bytes({"model": "gpt-5"}), headers=JSON,
               param="messages", says="messages"),
    BadRequest("chat-empty-messages", "POST", "/v1/chat/completions", 400,
               "invalid_request_error", content=_json_bytes({"model": "gpt-5", "messages": []}),
               headers=JSON, param="messages"),
]


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[b.name for b in BAD_REQUESTS])
async def test_bad_request_is_refused_in_openai_shape_and_server_keeps_serving(
    tmp_path, fake_upstream, chaos, bad: BadRequest
):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            upstream_calls = fake_upstream.count("responses")
            error = assert_openai_error(await bad.send(http), bad.status, code=bad.code,
                                        param=bad.param)
            assert error["type"] == "invalid_request_error"
            assert bad.says.lower() in error["message"].lower()
            assert fake_upstream.count("responses") == upstream_calls  # never forwarded
            await assert_still_serving(stack, http)
            assert fake_upstream.count("responses") == upstream_calls + 1


async def test_many_bad_requests_on_one_connection_then_a_good_one(tmp_path, fake_upstream, chaos):
    # Refusals must not poison a kept-alive connection or leak per-request state.
    with trio.fail_after(30):
        limits = httpx.Limits(max_connections=1)
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, \
                stack.http(limits=limits) as http:
            for _ in range(3):
                for bad in BAD_REQUESTS:
                    assert_openai_error(await bad.send(http), bad.status, code=bad.code)
            assert fake_upstream.count("responses") == 0
            await assert_still_serving(stack, http)


async def test_oversize_body_is_413_and_server_keeps_serving(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"max_body_bytes": 1024}) as stack, stack.http() as http:
            big = {**CODEX_BODY, "instructions": "x" * 4096}
            response = await http.post(CODEX_PATH, json=big, headers=CODEX_HEADERS)
            error = assert_openai_error(response, 413, code="request_too_large")
            assert "1024" in error["message"]
            assert "max_body_bytes" in error["message"]  # says which knob to turn
            assert fake_upstream.count("responses") == 0
            # a body just under the limit still goes through
            await assert_still_serving(stack, http)


async def test_oversize_chunked_body_without_length_is_413(tmp_path, fake_upstream, chaos):
    # No Content-Length to refuse up front: the limit must hold while the body streams in.
    async def chunks():
        payload = json.dumps({**CODEX_BODY, "instructions": "y" * 4096}).encode()
        for start in range(0, len(payload), 512):
            yield payload[start:start + 512]

    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"max_body_bytes": 1024}) as stack, stack.http() as http:
            response = await http.post(CODEX_PATH, content=chunks(),
                                       headers={**CODEX_HEADERS, **JSON})
            assert "content-length" not in response.request.headers
            assert_openai_error(response, 413, code="request_too_large")
            assert fake_upstream.count("responses") == 0
            await assert_still_serving(stack, http)


async def _slow_oversize_chunks():
    # The answer is decided after the first 1.5 KB; the rest of the body is still on its way.
    payload = json.dumps({**CODEX_BODY, "instructions": "z" * 8192}).encode()
    for start in range(0, len(payload), 512):
        if start == 2048:
            await trio.sleep(0.3)
        yield payload[start:start + 512]


@pytest.mark.parametrize("auth", [{}, {"api_keys": ["sekret"]}], ids=["413", "401"])
async def test_an_early_answer_keeps_the_connection_usable(tmp_path, fake_upstream, chaos, auth):
    # A 413 (or a 401) decided before the client finished its body used to end the response
    # while Hypercorn still expected body bytes: the connection was neither recycled nor
    # closed, and the next request on it waited forever.
    headers = {**CODEX_HEADERS, **JSON}
    if auth:
        headers["authorization"] = "Bearer wrong-key-123456"
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, auth=auth,
                              server={"max_body_bytes": 1024}) as stack, \
                stack.http(limits=httpx.Limits(max_connections=1)) as http:
            for _ in range(3):
                response = await http.post(CODEX_PATH, content=_slow_oversize_chunks(),
                                           headers=headers)
                assert response.status_code == (401 if auth else 413), response.text
                assert response.headers.get("connection") != "close"  # kept alive
            good = {"authorization": "Bearer sekret"} if auth else {}
            with trio.fail_after(10):
                await assert_still_serving(stack, http, **good)


async def test_a_body_that_never_ends_gets_its_answer_and_a_close(tmp_path, fake_upstream, chaos):
    # Content-Length promises more than ever arrives: a 408 comes after body_idle_timeout, within the drain
    # bound, with Connection: close, and the server goes on serving others.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"max_body_bytes": 1024, "body_idle_timeout": 1.0}
                              ) as stack, stack.http() as http:
            sock = await trio.open_tcp_stream("127.0.0.1", httpx.URL(stack.url).port)
            async with sock:
                await sock.send_all(
                    b"POST " + CODEX_PATH.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"content-type: application/json\r\ncontent-length: 900\r\n\r\n"
                    + b"{" + b" " * 100)
                received = b""
                with trio.fail_after(15):
                    while b"\r\n\r\n" not in received:
                        chunk = await sock.receive_some(65536)
                        assert chunk, received
                        received += chunk
                head = received.split(b"\r\n\r\n")[0].lower()
                assert head.startswith(b"http/1.1 408"), head
                assert b"connection: close" in head, head
            await assert_still_serving(stack, http)


async def test_deeply_nested_json_is_400_not_500(tmp_path, fake_upstream, chaos):
    # json.loads raises RecursionError (not ValueError) past ~1000 levels: still bad input.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            for path in (CODEX_PATH, "/v1/responses", "/v1/chat/completions"):
                response = await http.post(path, content=b"[" * 100_000, headers=JSON)
                error = assert_openai_error(response, 400, code="invalid_request_error")
                assert "JSON" in error["message"]
            await assert_still_serving(stack, http)


async def test_malformed_admin_rotate_body_is_refused_not_ignored(tmp_path, fake_upstream, chaos):
    # An empty body means "rotate unconditionally"; a body that is not a JSON object must not.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            before = (await stack.engine.clients.stats()).generation
            for content in (b"{bad", b"[1]"):
                response = await http.post("/api/clients/rotate", content=content, headers=JSON)
                assert_openai_error(response, 400, code="invalid_request_error")
            assert (await stack.engine.clients.stats()).generation == before
            rotated = await http.post("/api/clients/rotate")
            assert rotated.json()["generation"] == before + 1
            await assert_still_serving(stack, http)


# --- WebSocket ---------------------------------------------------------------------------

WS_UPGRADE = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
              "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def _close_transport_after_server_close(ws: Any) -> None:
    # trio-websocket 0.12 leaks the socket when the server closes first (tests/README.md).
    await trio.aclose_forcefully(ws._stream)


async def _ws_turn(ws: Any) -> list[dict[str, Any]]:
    """Send one response.create and read its events up to the terminal one."""
    body = {k: v for k, v in CODEX_BODY.items() if k != "stream"}
    await ws.send_message(json.dumps({"type": "response.create", **body}))
    events = []
    while not events or events[-1]["type"] not in ("response.completed", "response.failed"):
        events.append(json.loads(await ws.get_message()))
    return events


@pytest.mark.parametrize("frame", ["this is not json", '{"type": "response.cancel"}', "[1, 2]",
                                   '{"model": "gpt-5-codex"}', b"\x00binary\xff"],
                         ids=["not-json", "not-response-create", "json-list", "no-type", "binary"])
async def test_bad_websocket_frame_gets_error_event_or_clear_close(
    tmp_path, fake_upstream, chaos, frame: str | bytes
):
    from trio_websocket import ConnectionClosed, open_websocket_url

    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            url = stack.url.replace("http://", "ws://", 1) + CODEX_PATH
            headers = [(k.encode(), v.encode()) for k, v in CODEX_HEADERS.items()]
            headers.append((b"openai-beta", b"responses_websockets=2026-02-06"))
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message(frame)
                close_reason = None
                try:
                    reply = await ws.get_message()
                except ConnectionClosed as closed:
                    await _close_transport_after_server_close(ws)
                    close_reason = closed.reason
                if close_reason is not None:
                    # A deliberate close says why: policy/unsupported/invalid data, with a reason.
                    assert close_reason.code in (1003, 1007, 1008), close_reason
                    assert close_reason.reason, "the close frame must carry a reason"
                else:
                    event = json.loads(reply)
                    assert event["type"] == "error", event
                    error = event["error"]
                    assert isinstance(error, dict), event
                    assert error.get("message"), event
                    assert "Traceback" not in error["message"]
                    # the socket stays usable: the next good frame is a normal turn
                    events = await _ws_turn(ws)
                    assert events[-1]["type"] == "response.completed"
                    assert fake_upstream.count("ws_turns") == 1  # only the good frame went up
            await assert_still_serving(stack, http)


async def test_websocket_upgrade_to_unknown_path_is_404_json(tmp_path, fake_upstream, chaos,
                                                            caplog: pytest.LogCaptureFixture):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            for path in ("/v1/nothing-here", "/health"):
                response = await http.get(path, headers=WS_UPGRADE)
                assert 400 <= response.status_code < 500, (path, response.status_code)
                assert_openai_error(response, response.status_code)
            assert "Traceback" not in caplog.text
            await assert_still_serving(stack, http)


async def test_websocket_upgrade_without_api_key_does_not_take_the_server_down(
    tmp_path, fake_upstream, chaos
):
    # hypercorn 0.18 crashes its whole serve() on a request that follows a refused upgrade
    # on the same keep-alive connection (tests/README.md): every refusal must close it.
    with trio.fail_after(30):
        one_connection = httpx.Limits(max_connections=1)
        async with open_stack(tmp_path, fake_upstream, chaos,
                              auth={"api_keys": ["sekret"]}) as stack, \
                stack.http(limits=one_connection) as http:
            refused = await http.get(CODEX_PATH, headers=WS_UPGRADE)
            assert_openai_error(refused, 401, code="invalid_api_key")
            # The same client next: it reuses the connection unless the refusal closed it.
            health = await http.get("/health")
            assert health.status_code == 200
            async with stack.http() as fresh:
                await assert_still_serving(stack, fresh, authorization="Bearer sekret")
            assert refused.headers.get("connection", "").lower() == "close"


# --- the connection itself misbehaves ------------------------------------------------------

RAW_GARBAGE = [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # both framings: request smuggling shape
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello on a plain port
]


@pytest.mark.parametrize("garbage", RAW_GARBAGE, ids=["not-http", "two-framings",
                                                      "huge-header", "tls-hello"])
async def test_protocol_garbage_is_refused_and_server_keeps_serving(
    tmp_path, fake_upstream, chaos, garbage: bytes
):
    # These never reach the app (hypercorn answers or hangs up), so the JSON shape is not
    # ours to give; what matters is a refusal, not a hang, and a server that lives on.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            host, _, port = stack.url.removeprefix("http://").partition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                try:
                    await stream.send_all(garbage)
                    answer = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    answer = b""  # reset while we were still sending: also a refusal
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]
            await assert_still_serving(stack, http)


async def _post_raw_and_hang_up(host: str, port: int, *, after: bytes) -> bytes:
    """POST a Codex turn over a bare socket, read until ``after`` shows up, then hang up.

    A bare socket keeps the client's own half-read httpx generators out of the picture.
    """
    body = json.dumps(CODEX_BODY).encode()
    head = (f"POST {CODEX_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in CODEX_HEADERS.items()) + "\r\n")
    received = b""
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(head.encode() + body)
        while after not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"the proxy ended the stream early: {received[-200:]!r}"
            received += chunk
    return received


async def _wait_for_no_leases(stack: Stack) -> None:
    """Poll the client stats until no lease is held (the caller's fail_after bounds it)."""
    for _ in range(1_000):
        if sum((await stack.engine.clients.stats()).leases.values()) == 0:
            return
        await trio.sleep(0.05)
    raise AssertionError("a lease is still held after the client left")


async def test_client_leaving_mid_stream_frees_its_lease(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            fake_upstream.event_delay = 0.05
            fake_upstream.reply_text = " ".join(["slow"] * 200)  # ten seconds of events
            host, _, port = stack.url.removeprefix("http://").partition(":")
            received = await _post_raw_and_hang_up(host, int(port), after=b"output_text.delta")
            assert received.startswith(b"HTTP/1.1 200")
            # The relay notices on its next send to the gone client and lets go of the lease.
            await _wait_for_no_leases(stack)
            fake_upstream.event_delay = 0.0
            fake_upstream.reply_text = "Hello from the fake upstream."
            await assert_still_serving(stack, http)


# --- proxy API keys ------------------------------------------------------------------


async def test_api_key_is_required_except_on_health(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              auth={"api_keys": ["sekret"]}) as stack, stack.http() as http:
            without = {k: v for k, v in CODEX_HEADERS.items() if k != "authorization"}
            refusals = [
                await http.post(CODEX_PATH, json=CODEX_BODY, headers=without),
                await http.post(CODEX_PATH, json=CODEX_BODY,
                                headers={**CODEX_HEADERS, "authorization": "Bearer wrong"}),
                await http.post(CODEX_PATH, json=CODEX_BODY,
                                headers={**CODEX_HEADERS, "authorization": "Basic sekret"}),
                await http.post(CODEX_PATH, json=CODEX_BODY,
                                headers={**CODEX_HEADERS, "authorization": "Bearer"}),
                await http.get("/api/accounts"),
                await http.get("/v1/models", headers={"authorization": "Bearer sekretX"}),
            ]
            for response in refusals:
                error = assert_openai_error(response, 401, code="invalid_api_key")
                assert "sekret" not in response.text
                assert "Authorization" in error["message"]
            assert fake_upstream.count("responses") == 0

            health = await http.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"

            keyed = {**CODEX_HEADERS, "authorization": "Bearer sekret"}
            await assert_still_serving(stack, http, authorization="Bearer sekret")
            # The proxy's key is ours: the upstream gets the pooled account's token instead.
            seen = fake_upstream.requests_for("responses")[-1].headers
            assert seen["authorization"] == f"Bearer {fake_upstream.account('acct-a').access_token}"
            accounts = await http.get("/api/accounts", headers=keyed)
            assert accounts.status_code == 200
            assert len(accounts.json()["accounts"]) == 1


async def test_bad_input_with_a_key_configured_still_gets_the_input_error(
    tmp_path, fake_upstream, chaos
):
    # The key check must not mask a useful 4xx for an authorised client (or vice versa).
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              auth={"api_keys": ["sekret"]}) as stack, stack.http() as http:
            keyed = {"authorization": "Bearer sekret", **JSON}
            response = await http.post("/v1/responses", content=b"[]", headers=keyed)
            assert_openai_error(response, 400, code="invalid_request_error")
            response = await http.post("/v1/responses", content=b"[]", headers=JSON)
            assert_openai_error(response, 401, code="invalid_api_key")
            await assert_still_serving(stack, http, authorization="Bearer sekret")


# --- no token in an error body or a log line ---------------------------------------------


def _secrets_of(account: FakeAccount) -> set[str]:
    """The account's current token triple, plus each JWT's claims segment on its own."""
    found: set[str] = set()
    for session in account.sessions:
        for token in (session.access_token, session.refresh_token, session.id_token):
            found.add(token)
            parts = token.split(".")
            if len(parts) == 3:
                found.add(parts[1])
    return found


def _proxy_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the proxy logged (the fakes' own records are not the proxy's)."""
    lines = []
    for record in caplog.records:
        if record.name.startswith("tests."):
            continue
        lines.append(record.getMessage())
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(lines)


async def test_no_token_in_error_bodies_or_log_lines(tmp_path, fake_upstream: FakeUpstream, chaos,
                                                     caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    for name in QUIETED_LOGGERS:
        caplog.set_level(logging.WARNING, logger=name)
    secrets: set[str] = {CLIENT_OWN_TOKEN, "sekret"}
    bodies: list[str] = []

    def remember() -> None:
        for account in fake_upstream.accounts.values():
            secrets.update(_secrets_of(account))

    with trio.fail_after(45):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2,
                              auth={"api_keys": ["sekret"]}) as stack, stack.http() as http:
            keyed = {**CODEX_HEADERS, "authorization": "Bearer sekret"}
            remember()
            # refused by the key check, and refused for bad input
            for headers in (CODEX_HEADERS, {**CODEX_HEADERS, "authorization": "Bearer nope"}):
                response = await http.post(CODEX_PATH, json=CODEX_BODY, headers=headers)
                bodies.append(response.text)
            for bad in BAD_REQUESTS:
                response = await http.request(bad.method, bad.path, content=bad.content,
                                              headers={**keyed, **bad.headers})
                bodies.append(response.text)

            # stale access tokens: 401 upstream → forced refresh → success
            refreshes = fake_upstream.count("token")
            for account in fake_upstream.accounts.values():
                fake_upstream.revoke_access_token(account.chatgpt_account_id)
            response, events = await codex_turn(http, headers={**keyed, "session-id": "s-a"})
            assert events[-1]["type"] == "response.completed", response.text
            assert fake_upstream.count("token") > refreshes  # new tokens went through the proxy
            remember()

            # both accounts' logins dead: the refresh itself fails for good → an error body
            for account in fake_upstream.accounts.values():
                fake_upstream.revoke_sessions(account.chatgpt_account_id)
            response, events = await codex_turn(http, headers={**keyed, "session-id": "s-b"})
            assert response.status_code in (401, 503), response.text
            assert_openai_error(response, response.status_code)
            bodies.append(response.text)
            remember()

    logged = _proxy_log_text(caplog)
    assert logged, "expected the proxy to log something about these failures"
    for secret in sorted(secrets):
        assert secret not in logged, f"a secret ({secret[:12]}…) reached a log line"
        for body in bodies:
            assert secret not in body, f"a secret ({secret[:12]}…) reached an error body"
