"""Loopback is not a trust boundary: the proxy tried as a hostile page and a careless import.

Everything here goes through real sockets (``open_stack``: hypercorn on 127.0.0.1 port 0 in
front of the fake upstream behind the chaos proxy). A refused request must get its 4xx JSON
answer *and* never reach the upstream; the server keeps serving afterwards.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import httpx
import pytest
import trio
import zstandard

from tests.fakes.jwt import mint_jwt
from tests.fakes.upstream import FakeUpstream
from tests.stack import CODEX_BODY, Stack, open_stack, read_sse
from tests.test_bad_input import (
    CODEX_HEADERS,
    CODEX_PATH,
    WS_UPGRADE,
    assert_openai_error,
    assert_still_serving,
)

JSON = {"content-type": "application/json"}
KEY = "test-proxy-key-0123456789abcdef"
AUTH_NS = "https://api.openai.com/auth"


def origin_of(stack: Stack) -> str:
    return stack.url.rstrip("/")


def port_of(stack: Stack) -> str:
    return stack.url.rsplit(":", 1)[1].strip("/")


async def codex_post(http: httpx.AsyncClient, **headers: str) -> httpx.Response:
    async with http.stream("POST", CODEX_PATH, json=CODEX_BODY,
                           headers={**CODEX_HEADERS, **headers}) as response:
        if response.status_code == 200:
            events = await read_sse(response)
            assert events[-1]["type"] == "response.completed"
        else:
            await response.aread()
        return response


# --- Host: DNS rebinding -------------------------------------------------------------------

HOSTILE_HOSTS = ["rebind.evil.example", "rebind.evil.example:2455", "10.0.0.8", "[2001:db8::1]",
                 "127.0.0.1.evil.example", "localhost.evil.example:80"]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
async def test_hostile_host_is_refused_on_every_route(tmp_path, fake_upstream, chaos, host):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            for method, path in (("GET", "/api/accounts"), ("GET", "/health"),
                                 ("GET", "/v1/models"), ("POST", "/api/clients/rotate")):
                response = await http.request(method, path, headers={"host": host})
                assert_openai_error(response, 403, code="host_not_allowed")
                assert "acct-a" not in response.text
            refused = await codex_post(http, host=host)
            assert_openai_error(refused, 403, code="host_not_allowed")
            assert fake_upstream.count("responses") == 0
            await assert_still_serving(stack, http)


async def test_loopback_names_and_listed_hosts_are_served(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"allowed_hosts": ("proxy.lan",)}) as stack, \
                stack.http() as http:
            port = port_of(stack)
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                         "127.8.9.10", f"proxy.lan:{port}", "Proxy.LAN"):
                response = await http.get("/api/accounts", headers={"host": host})
                assert response.status_code == 200, (host, response.text)
            refused = await http.get("/api/accounts", headers={"host": "other.lan"})
            assert_openai_error(refused, 403, code="host_not_allowed")


async def test_trust_any_host_behind_a_reverse_proxy_still_needs_the_key(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, auth={"api_keys": (KEY,)},
                              server={"trust_any_host": True}) as stack, stack.http() as http:
            public = {"host": "pool.example.com"}
            assert_openai_error(await http.get("/api/accounts", headers=public), 401,
                                code="invalid_api_key")
            ok = await http.get("/api/accounts", headers={**public,
                                                          "authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200


async def test_hostile_host_websocket_upgrade_is_refused(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            refused = await http.get(CODEX_PATH, headers={**CODEX_HEADERS, **WS_UPGRADE,
                                                          "host": "rebind.evil.example"})
            assert_openai_error(refused, 403, code="host_not_allowed")
            assert refused.headers.get("connection", "").lower() == "close"
            assert fake_upstream.count("ws_connections") == 0
            await assert_still_serving(stack, http)


# --- Origin: cross-site pages ----------------------------------------------------------------

HOSTILE_ORIGINS = ["http://evil.example", "https://evil.example", "null",
                   "http://127.0.0.1.evil.example", "http://localhost:1"]


@pytest.mark.parametrize("origin", HOSTILE_ORIGINS)
async def test_hostile_origin_is_refused_on_http(tmp_path, fake_upstream, chaos, origin):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            refused = await codex_post(http, origin=origin)
            assert_openai_error(refused, 403, code="origin_not_allowed")
            for method, path in (("GET", "/api/accounts"), ("POST", "/api/refresh"),
                                 ("GET", "/v1/models")):
                response = await http.request(method, path, headers={"origin": origin})
                assert_openai_error(response, 403, code="origin_not_allowed")
            assert fake_upstream.count("responses") == 0
            await assert_still_serving(stack, http)


@pytest.mark.parametrize("origin", HOSTILE_ORIGINS[:3])
async def test_hostile_origin_websocket_is_refused_before_any_turn(
    tmp_path, fake_upstream, chaos, origin
):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            refused = await http.get(CODEX_PATH, headers={**CODEX_HEADERS, **WS_UPGRADE,
                                                          "origin": origin})
            assert_openai_error(refused, 403, code="origin_not_allowed")
            assert refused.headers.get("connection", "").lower() == "close"
            # The handshake exactly as a browser writes it, on a raw socket.
            host, port = stack.url.removeprefix("http://").strip("/").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    f"GET {CODEX_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Origin: {origin}\r\n\r\n".encode())
                answer = b""
                while chunk := await stream.receive_some(65536):  # the server closes it
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403"), head
            assert json.loads(body)["error"]["code"] == "origin_not_allowed"
            assert fake_upstream.count("ws_connections") == 0
            assert fake_upstream.count("ws_turns") == 0
            await assert_still_serving(stack, http)


async def test_same_origin_page_can_use_http_and_websocket(tmp_path, fake_upstream, chaos):
    from trio_websocket import open_websocket_url

    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            own = origin_of(stack)
            ok = await codex_post(http, origin=own, referer=own + "/dashboard")
            assert ok.status_code == 200
            (recorded,) = fake_upstream.requests_for("responses")
            assert "origin" not in recorded.headers  # a browser's page is not upstream's business
            assert "referer" not in recorded.headers
            url = stack.url.replace("http://", "ws://", 1) + CODEX_PATH
            headers = [(k.encode(), v.encode()) for k, v in CODEX_HEADERS.items()]
            async with open_websocket_url(url, extra_headers=[*headers,
                                                              (b"origin", own.encode())]) as ws:
                body = {k: v for k, v in CODEX_BODY.items() if k != "stream"}
                await ws.send_message(json.dumps({"type": "response.create", **body}))
                events: list[dict[str, Any]] = []
                while not events or events[-1]["type"] not in ("response.completed",
                                                               "response.failed"):
                    events.append(json.loads(await ws.get_message()))
            assert events[-1]["type"] == "response.completed"


async def test_listed_origin_is_allowed(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"allowed_origins": ("https://tools.example.com",)}) as stack, \
                stack.http() as http:
            ok = await http.get("/api/accounts", headers={"origin": "https://tools.example.com"})
            assert ok.status_code == 200
            refused = await http.get("/api/accounts", headers={"origin": "https://example.com"})
            assert_openai_error(refused, 403, code="origin_not_allowed")


# --- CSRF ---------------------------------------------------------------------------------


async def test_text_plain_csrf_attempts_are_refused(tmp_path, fake_upstream: FakeUpstream, chaos):
    # A page can POST text/plain cross-site without a preflight; it cannot send
    # application/json without one. The old check looked for "json" anywhere in the type.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=0) as stack, \
                stack.http() as http:
            victim = fake_upstream.add_account(email="v@example.com", chatgpt_account_id="acct-v")
            payload = json.dumps(fake_upstream.auth_json(victim)).encode()
            for content_type in ("text/plain;x=json", "text/plain", "application/json-patch",
                                 "application/x-www-form-urlencoded; json",
                                 "application/json; charset=latin-1",
                                 "multipart/form-data; boundary=json"):
                for path in ("/api/accounts/import", "/v1/responses", CODEX_PATH):
                    response = await http.post(path, content=payload,
                                               headers={"content-type": content_type})
                    assert_openai_error(response, 415)
            assert await stack.store.list_accounts() == []
            assert fake_upstream.count("responses") == 0
            # The exact type, with or without charset=utf-8, is what works.
            for content_type in ("application/json", "Application/JSON; charset=UTF-8"):
                done = await http.post("/api/accounts/import", content=payload,
                                       headers={"content-type": content_type})
                assert done.status_code in (200, 201), done.text


async def test_browser_state_changes_need_the_csrf_token(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            own = {"origin": origin_of(stack)}
            token = (await http.get("/api/csrf-token", headers=own)).json()["csrf_token"]
            refused = await http.post("/api/clients/rotate", headers=own)
            assert_openai_error(refused, 403, code="csrf_token_invalid")
            wrong = await http.post("/api/clients/rotate", headers={**own, "x-csrf-token": "x"})
            assert_openai_error(wrong, 403, code="csrf_token_invalid")
            fetch_meta = await http.post("/api/clients/rotate",
                                         headers={"sec-fetch-site": "same-origin"})
            assert_openai_error(fetch_meta, 403, code="csrf_token_invalid")
            assert (await http.get("/api/clients")).json()["generation"] == 1
            ok = await http.post("/api/clients/rotate", headers={**own, "x-csrf-token": token})
            assert ok.status_code == 200, ok.text
            assert ok.json()["rotated"] is True
            # GETs need no token; a CLI (no Origin) needs none either.
            assert (await http.get("/api/accounts", headers=own)).status_code == 200
            cli = await http.post("/api/clients/rotate")
            assert cli.status_code == 200, cli.text


# --- keys -----------------------------------------------------------------------------------


async def test_a_digest_is_never_accepted_as_the_key(tmp_path, fake_upstream, chaos):
    from service.config import hash_api_key

    digest = hash_api_key(KEY)  # "sha256:<hex>", as config.toml may store it
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              auth={"api_keys": (digest,)}) as stack, stack.http() as http:
            for presented in (digest, digest.removeprefix("sha256:"), KEY[:-1], KEY + " x"):
                response = await http.get("/api/accounts",
                                          headers={"authorization": f"Bearer {presented}"})
                assert_openai_error(response, 401, code="invalid_api_key")
            ok = await http.get("/api/accounts", headers={"authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200


# --- validation at the door -------------------------------------------------------------------


def _poisoned(fake: FakeUpstream, what: str) -> tuple[bytes, str]:
    """An auth.json with one bad value, as raw JSON text, and the field the refusal names."""
    account = fake.add_account(email=f"{what}@example.com", chatgpt_account_id=f"acct-{what}")
    data = fake.auth_json(account)
    tokens = data["tokens"]
    id_claims = {"email": f"{what}@example.com", "exp": 2_000_000_000,
                 AUTH_NS: {"chatgpt_account_id": f"acct-{what}", "chatgpt_plan_type": "plus"}}
    field = what
    if what == "account_id":
        id_claims[AUTH_NS]["chatgpt_account_id"] = "acct-\u2603"
        tokens["account_id"] = "acct-\u2603"
        tokens["id_token"] = mint_jwt(id_claims)
    elif what == "refresh_token":
        tokens["refresh_token"] += "\r\nX-Injected: 1"
    elif what == "access_token":
        tokens["access_token"] = "abc\ndef"
    elif what == "id_token":
        tokens["id_token"] = tokens["id_token"] + "\u00e9"
    elif what == "email":
        id_claims["email"] = "\x1b[2J\x1b[Hroot@example.com"
        tokens["id_token"] = mint_jwt(id_claims)
    elif what == "surrogate":
        field = "email"
        raw_claims = json.dumps(id_claims).replace("surrogate@", "\\ud800@")
        import base64
        payload = base64.urlsafe_b64encode(raw_claims.encode()).rstrip(b"=").decode()
        tokens["id_token"] = tokens["id_token"].split(".")[0] + "." + payload + ".sig"
    elif what == "exp":
        field = "access token exp"
        tokens["access_token"] = mint_jwt({"exp": 10**400})
    elif what == "exp_inf":
        field = "access token exp"
        tokens["access_token"] = mint_jwt({"exp": float("inf")})
    elif what == "last_refresh":
        text = json.dumps(data).replace(json.dumps(data["last_refresh"]), "1" + "0" * 400)
        return text.encode(), "last_refresh"
    elif what == "plan":
        field = "chatgpt_plan_type"
        id_claims[AUTH_NS]["chatgpt_plan_type"] = "plus\x07"
        tokens["id_token"] = mint_jwt(id_claims)
    return json.dumps(data).encode(), field


POISONS = ["account_id", "refresh_token", "access_token", "id_token", "email", "surrogate", "exp",
           "exp_inf", "last_refresh", "plan"]


async def test_poisoned_imports_are_refused_naming_the_field(tmp_path, fake_upstream, chaos):
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            for what in POISONS:
                body, field = _poisoned(fake_upstream, what)
                response = await http.post("/api/accounts/import", content=body, headers=JSON)
                error = assert_openai_error(response, 400)
                assert field in error["message"], (what, error)
                assert "\n" not in error["message"] and "\x1b" not in error["message"]
            assert len(await stack.store.list_accounts()) == 1  # only the stack's own account
            listed = await http.get("/api/accounts")
            assert json.loads(listed.text, parse_constant=_no_constants)["accounts"]
            await assert_still_serving(stack, http)


def _no_constants(name: str) -> Any:
    raise AssertionError(f"invalid JSON constant {name} in an answer")


@pytest.mark.parametrize("what", ["refresh_token", "email", "last_refresh"])
async def test_poisoned_auth_file_is_one_line_from_the_cli(tmp_path, fake_upstream, what):
    from tests.test_cli_and_crash import cli, table_rows

    with trio.fail_after(60):
        body, field = _poisoned(fake_upstream, what)
        auth_file = tmp_path / "auth.json"
        auth_file.write_bytes(body)
        home = tmp_path / "home"
        result = await cli(home, "accounts", "import", str(auth_file))
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0], result.stderr
        assert "\x1b" not in result.stderr and "Traceback" not in result.stderr
        assert table_rows(home) == 0


# --- bodies: flags, numbers, encodings, odd paths -------------------------------------------------


BAD_BODIES = [
    ("/v1/responses", b'{"model": "gpt-5", "input": "hi", "stream": "false"}', "stream"),
    ("/v1/chat/completions",
     b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}], "stream": "no"}',
     "stream"),
    (CODEX_PATH, json.dumps({**CODEX_BODY, "stream": 1}).encode(), "stream"),
    (CODEX_PATH, json.dumps(CODEX_BODY).replace('"hi"', "NaN").encode(), "NaN"),
    ("/v1/responses", b'{"model": "gpt-5", "input": "hi", "temperature": Infinity}', "Infinity"),
    ("/v1/responses", b'{"model": "gpt-5", "input": "hi", "temperature": -Infinity}', "Infinity"),
    ("/v1/responses", b'{"model": "gpt-5", "input": "hi", "temperature": 1e400}', "range"),
]


@pytest.mark.parametrize(("path", "body", "says"), BAD_BODIES,
                         ids=["stream-string", "chat-stream-string", "codex-stream-int", "nan",
                              "infinity", "minus-infinity", "overflow"])
async def test_bad_json_values_are_400_and_never_go_upstream(
    tmp_path, fake_upstream, chaos, path, body, says
):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            response = await http.post(path, content=body, headers={**CODEX_HEADERS, **JSON})
            error = assert_openai_error(response, 400)
            assert says in error["message"] or error.get("param") == says, error
            assert fake_upstream.count("responses") == 0
            await assert_still_serving(stack, http)


def _encoded(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
async def test_encoded_bodies_are_decoded_and_forwarded_plain(
    tmp_path, fake_upstream, chaos, encoding
):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            body = _encoded(encoding, json.dumps(CODEX_BODY).encode())
            async with http.stream("POST", CODEX_PATH, content=body, headers={
                **CODEX_HEADERS, **JSON, "content-encoding": encoding}) as response:
                assert response.status_code == 200
                events = await read_sse(response)
            assert events[-1]["type"] == "response.completed"
            (recorded,) = fake_upstream.requests_for("responses")
            assert recorded.body["input"] == CODEX_BODY["input"]
            assert "content-encoding" not in recorded.headers
            # corrupt data in that encoding: 400; truncated: 400
            for bad in (b"\x00\x01garbage" * 10, body[: len(body) // 2]):
                refused = await http.post(CODEX_PATH, content=bad, headers={
                    **CODEX_HEADERS, **JSON, "content-encoding": encoding})
                assert_openai_error(refused, 400)
            unknown = await http.post(CODEX_PATH, content=body, headers={
                **CODEX_HEADERS, **JSON, "content-encoding": "br"})
            assert_openai_error(unknown, 415)
            assert fake_upstream.count("responses") == 1
            await assert_still_serving(stack, http)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_compression_bomb_is_413_on_the_decoded_size(tmp_path, fake_upstream, chaos,
                                                           encoding):
    limit = 2 * 1024 * 1024
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"max_body_bytes": limit}) as stack, stack.http() as http:
            inflated = b'{"input": "' + b"a" * (64 * limit) + b'"}'
            bomb = _encoded(encoding, inflated)
            assert len(bomb) < limit // 4
            del inflated
            response = await http.post(CODEX_PATH, content=bomb, headers={
                **CODEX_HEADERS, **JSON, "content-encoding": encoding})
            assert_openai_error(response, 413, code="request_too_large")
            async with stack.http() as fresh:
                await assert_still_serving(stack, fresh)


@pytest.mark.parametrize("path", ["/api/accounts/..%2f/pause", "/api/accounts//pause",
                                  "/api/accounts/x/", "/v1//models", "/api/accounts/%2e%2e/x/y"])
async def test_odd_paths_answer_json_not_html_redirects(tmp_path, fake_upstream, chaos, path):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            for method in ("POST", "GET"):
                response = await http.request(method, path)
                assert 400 <= response.status_code < 500, (path, response.status_code)
                assert_openai_error(response, response.status_code)
            await assert_still_serving(stack, http)
