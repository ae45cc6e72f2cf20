"""The fakes themselves work: real sockets, httpx and trio-websocket as clients."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import trio
import trio_websocket

from actors.accounts import identity_from_id_token, token_expiry
from tests.fakes.chaos import ChaosProxy
from tests.fakes.upstream import CLIENT_ID, FakeAccount, FakeUpstream, Fault

TIMEOUT = 30.0


def backend_headers(account: FakeAccount) -> dict[str, str]:
    return {
        "authorization": f"Bearer {account.access_token}",
        "chatgpt-account-id": account.chatgpt_account_id,
    }


def ws_headers(account: FakeAccount) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in backend_headers(account).items()] + [
        (b"openai-beta", b"responses_websockets=2026-02-06")
    ]


async def close_ws_transport(ws: trio_websocket.WebSocketConnection) -> None:
    """Close the TCP stream under a client WebSocket that the *server* closed.

    trio-websocket 0.12 never closes it in that case (``aclose()`` returns early once a close
    reason is set), which leaks the socket and trips ResourceWarning.
    """
    await trio.aclose_forcefully(ws._stream)


def refresh_body(refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "refresh_token": refresh_token,
        "scope": "openid profile email",
    }


async def read_sse(response: httpx.Response) -> AsyncGenerator[dict[str, Any]]:
    """Parse ``event:``/``data:`` frames as they arrive."""
    event_type = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event_type = line.removeprefix("event: ")
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["type"] == event_type
            yield event


RESPONSES_BODY = {"model": "gpt-5.1-codex", "input": [], "stream": True, "store": False}


async def stream_turn(
    client: httpx.AsyncClient,
    account: FakeAccount,
    received: list[str],
    after_each: Callable[[list[str]], None] = lambda _received: None,
) -> None:
    """POST a turn and append each event type to ``received`` as it arrives."""
    async with client.stream(
        "POST", "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
    ) as response:
        assert response.status_code == 200
        async for event in read_sse(response):
            received.append(event["type"])
            after_each(received)


async def read_ws_until_closed(ws: trio_websocket.WebSocketConnection, received: list[str]) -> None:
    while True:
        received.append(json.loads(await ws.get_message())["type"])


# --- tokens ---------------------------------------------------------------------------


async def test_minted_tokens_are_readable_by_the_account_helpers(
    fake_upstream: FakeUpstream,
) -> None:
    account = fake_upstream.add_account(email="b@example.com", chatgpt_account_id="acct-b")
    identity = identity_from_id_token(account.id_token)
    assert (identity.email, identity.chatgpt_account_id, identity.plan) == (
        "b@example.com",
        "acct-b",
        "plus",
    )
    assert identity.chatgpt_user_id == account.chatgpt_user_id
    expiry = token_expiry(account.access_token)
    assert expiry is not None
    assert abs(expiry - (time.time() + 3600)) < 5
    auth_json = fake_upstream.auth_json(account)
    assert auth_json["tokens"]["account_id"] == "acct-b"
    assert auth_json["tokens"]["refresh_token"] == account.refresh_token


async def test_refresh_rotates_the_triple_and_is_single_use(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    old = (account.access_token, account.refresh_token, account.id_token)
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.auth_base_url) as client:
            first = await client.post("/oauth/token", json=refresh_body(old[1]))
            assert first.status_code == 200
            tokens = first.json()
            assert set(tokens) >= {"access_token", "refresh_token", "id_token", "expires_in"}
            assert tokens["refresh_token"] == account.refresh_token != old[1]
            assert tokens["access_token"] != old[0]

            again = await client.post("/oauth/token", json=refresh_body(old[1]))
            assert again.status_code == 401
            assert again.json()["error"]["code"] == "refresh_token_reused"

            unknown = await client.post("/oauth/token", json=refresh_body("rt_nonsense"))
            assert unknown.status_code == 400
            assert unknown.json()["error"] == "invalid_grant"

        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as backend:
            stale = await backend.get(
                "/wham/usage",
                headers={"authorization": f"Bearer {old[0]}", "chatgpt-account-id": "acct-a"},
            )
            assert stale.status_code == 401
            assert stale.json()["error"]["code"] == "token_invalidated"
            fresh = await backend.get("/wham/usage", headers=backend_headers(account))
            assert fresh.status_code == 200
    assert fake_upstream.count("token", "acct-a") == 2
    assert fake_upstream.count("token") == 3


async def test_token_error_fault_keeps_the_refresh_token_alive(
    fake_upstream: FakeUpstream,
) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault(
        "acct-a", "token", Fault.token_error("refresh_token_expired", shape="oauth")
    )
    refresh_token = account.refresh_token
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.auth_base_url) as client:
            failed = await client.post("/oauth/token", json=refresh_body(refresh_token))
            assert failed.status_code == 401
            assert failed.json() == {
                "error": "refresh_token_expired",
                "error_description": "fake: refresh_token_expired",
            }
            retried = await client.post("/oauth/token", json=refresh_body(refresh_token))
            assert retried.status_code == 200


async def test_slow_token_answer_still_rotates_the_tokens(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    old_refresh = account.refresh_token
    fake_upstream.fault("acct-a", "token", Fault.slow_headers(5.0))
    timeout = httpx.Timeout(5.0, read=0.3)
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(
            base_url=fake_upstream.auth_base_url, timeout=timeout
        ) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/oauth/token", json=refresh_body(old_refresh))
            # The upstream did the work: the answer is lost and the old token is spent.
            assert account.refresh_token != old_refresh
            lost = await client.post("/oauth/token", json=refresh_body(old_refresh))
            assert lost.json()["error"]["code"] == "refresh_token_reused"


# --- responses ------------------------------------------------------------------------


async def test_sse_stream_yields_the_events_and_completes_with_usage(
    fake_upstream: FakeUpstream,
) -> None:
    account = fake_upstream.add_account()
    fake_upstream.set_usage("acct-a", primary_used=42.0, primary_reset_at=time.time() + 600)
    with trio.fail_after(TIMEOUT):
        async with (
            httpx.AsyncClient(base_url=fake_upstream.base_url) as client,
            client.stream(
                "POST",
                "/codex/responses",
                json=RESPONSES_BODY,
                headers={**backend_headers(account), "accept": "text/event-stream"},
            ) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-codex-primary-used-percent"] == "42"
            assert response.headers["x-codex-secondary-window-minutes"] == "10080"
            events = [event async for event in read_sse(response)]
    types = [event["type"] for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-2:] == ["codex.rate_limits", "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 2
    assert "".join(deltas) == fake_upstream.reply_text
    completed = events[-1]["response"]
    assert completed["output"][0]["content"][0]["text"] == fake_upstream.reply_text
    assert completed["usage"]["total_tokens"] == (
        completed["usage"]["input_tokens"] + completed["usage"]["output_tokens"]
    )
    assert events[-2]["rate_limits"]["primary"]["used_percent"] == 42.0
    (recorded,) = fake_upstream.requests_for("responses", "acct-a")
    assert recorded.body == RESPONSES_BODY
    assert recorded.headers["chatgpt-account-id"] == "acct-a"


async def test_sse_events_arrive_incrementally(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.event_delay = 0.05
    with trio.fail_after(TIMEOUT):
        async with (
            httpx.AsyncClient(base_url=fake_upstream.base_url) as client,
            client.stream(
                "POST", "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
            ) as response,
        ):
            start = trio.current_time()
            arrivals: list[tuple[str, float]] = []
            async with aclosing(read_sse(response)) as events:
                async for event in events:
                    arrivals.append((event["type"], trio.current_time() - start))
    first, last = arrivals[0][1], arrivals[-1][1]
    assert arrivals[0][0] == "response.created"
    # Spread out, not one buffered lump (had the first event waited for the rest, they would
    # all arrive together). Only a lower bound: a loaded machine stretches it, never shrinks it.
    assert last - first >= 0.05 * (len(arrivals) - 1) * 0.9


async def test_rate_limited_fault_answers_429_once(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    resets_at = time.time() + 120
    fake_upstream.fault("acct-a", "responses", Fault.rate_limited(resets_at=resets_at))
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            limited = await client.post(
                "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
            )
            assert limited.status_code == 429
            error = limited.json()["error"]
            assert error["type"] == "usage_limit_reached"
            assert error["resets_at"] == int(resets_at)
            assert 100 <= error["resets_in_seconds"] <= 120
            assert error["message"]
            again = await client.post(
                "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
            )
            assert again.status_code == 200
    assert fake_upstream.count("responses", "acct-a") == 2


async def test_stop_midway_silent_hangs_after_some_events(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=3))
    received: list[str] = []
    timeout = httpx.Timeout(5.0, read=0.5)
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url, timeout=timeout) as client:
            with pytest.raises(httpx.ReadTimeout):
                await stream_turn(client, account, received)
    assert received == ["response.created", "response.in_progress", "response.output_item.added"]


async def test_stop_midway_close_drops_the_connection(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=2, mode="close"))
    received: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await stream_turn(client, account, received)
    assert received == ["response.created", "response.in_progress"]


async def test_stream_failed_and_invalid_payload(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("*", "responses", Fault.stream_failed("server_is_overloaded"))
    fake_upstream.fault("acct-a", "models", Fault.invalid_payload())
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            async with client.stream(
                "POST", "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
            ) as response:
                assert response.status_code == 200
                events = [event async for event in read_sse(response)]
            assert [e["type"] for e in events] == ["response.failed"]
            assert events[0]["response"]["error"]["code"] == "server_is_overloaded"

            invalid = await client.get(
                "/codex/models",
                params={"client_version": "0.169.0"},
                headers=backend_headers(account),
            )
            assert invalid.status_code == 200
            assert "models" not in invalid.json()
            models = await client.get(
                "/codex/models",
                params={"client_version": "0.169.0"},
                headers=backend_headers(account),
            )
            assert [m["slug"] for m in models.json()["models"]] == [
                "gpt-5.1-codex",
                "gpt-5.1-codex-mini",
            ]
            assert models.json()["models"][0]["x_fake_future_field"]["nested"] == [1, 2, 3]
    assert fake_upstream.requests_for("models")[0].body == {"client_version": "0.169.0"}


async def test_usage_and_compact(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account(plan="pro")
    fake_upstream.set_usage("acct-a", secondary_used=77.5, secondary_reset_at=2_000_000_000)
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            usage = (await client.get("/wham/usage", headers=backend_headers(account))).json()
            compact = await client.post(
                "/codex/responses/compact",
                json={"model": "gpt-5.1-codex", "input": [{"type": "message"}] * 3},
                headers=backend_headers(account),
            )
    assert usage["plan_type"] == "pro"
    secondary = usage["rate_limit"]["secondary_window"]
    assert (secondary["used_percent"], secondary["reset_at"]) == (77.5, 2_000_000_000)
    assert secondary["limit_window_seconds"] == 7 * 24 * 3600
    assert usage["rate_limit"]["primary_window"]["limit_window_seconds"] == 5 * 3600
    assert set(usage["credits"]) == {"has_credits", "unlimited", "balance"}
    assert compact.status_code == 200
    assert "3 items" in compact.json()["output"][0]["content"][0]["text"]


# --- websocket ------------------------------------------------------------------------


async def test_websocket_carries_two_turns_on_one_socket(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    url = f"ws://127.0.0.1:{fake_upstream.port}/backend-api/codex/responses"
    turns: list[list[dict[str, Any]]] = []
    with trio.fail_after(TIMEOUT):
        async with trio_websocket.open_websocket_url(url, extra_headers=ws_headers(account)) as ws:
            for _ in range(2):
                await ws.send_message(json.dumps({"type": "response.create", **RESPONSES_BODY}))
                events: list[dict[str, Any]] = []
                while not events or events[-1]["type"] != "response.completed":
                    events.append(json.loads(await ws.get_message()))
                turns.append(events)
    for events in turns:
        assert events[0]["type"] == "response.created"
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == fake_upstream.reply_text
        assert "usage" in events[-1]["response"]
    assert fake_upstream.count("ws_connections", "acct-a") == 1
    assert fake_upstream.count("ws_turns", "acct-a") == 2
    assert fake_upstream.requests_for("ws_turns")[0].body["model"] == "gpt-5.1-codex"


def upgrade_headers(account: FakeAccount) -> dict[str, str]:
    return {
        **backend_headers(account),
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(secrets.token_bytes(16)).decode(),
    }


async def test_websocket_disabled_answers_426(fake_upstream: FakeUpstream) -> None:
    # Raw upgrades through httpx: trio-websocket 0.12 leaks its socket on ConnectionRejected.
    account = fake_upstream.add_account()
    fake_upstream.websocket_enabled = False
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            refused = await client.get("/codex/responses", headers=upgrade_headers(account))
            fake_upstream.websocket_enabled = True
            accepted = await client.get("/codex/responses", headers=upgrade_headers(account))
    assert refused.status_code == 426
    assert accepted.status_code == 101
    assert fake_upstream.count("ws_connections", "acct-a") == 2


async def test_websocket_upgrade_takes_status_faults(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("acct-a", "ws", Fault.rate_limited())
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as client:
            limited = await client.get("/codex/responses", headers=upgrade_headers(account))
            stale = await client.get(
                "/codex/responses",
                headers={**upgrade_headers(account), "authorization": "Bearer stale"},
            )
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "usage_limit_reached"
    assert stale.status_code == 401
    assert fake_upstream.faults.pending() == {}


async def test_websocket_turn_fault_becomes_an_error_event(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    url = f"ws://127.0.0.1:{fake_upstream.port}/backend-api/codex/responses"
    with trio.fail_after(TIMEOUT):
        async with trio_websocket.open_websocket_url(url, extra_headers=ws_headers(account)) as ws:
            fake_upstream.fault("acct-a", "ws", Fault.rate_limited())
            await ws.send_message(json.dumps({"type": "response.create", **RESPONSES_BODY}))
            error = json.loads(await ws.get_message())
            await ws.send_message(json.dumps({"type": "response.create", **RESPONSES_BODY}))
            first = json.loads(await ws.get_message())
    assert error["type"] == "error"
    assert error["status"] == 429
    assert error["error"]["type"] == "usage_limit_reached"
    assert first["type"] == "response.created"


async def test_websocket_stop_midway_close_ends_the_socket(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("acct-a", "ws", Fault.stop_midway(after_events=2, mode="close"))
    url = f"ws://127.0.0.1:{fake_upstream.port}/backend-api/codex/responses"
    received: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with trio_websocket.open_websocket_url(url, extra_headers=ws_headers(account)) as ws:
            await ws.send_message(json.dumps({"type": "response.create", **RESPONSES_BODY}))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await read_ws_until_closed(ws, received)
            await close_ws_transport(ws)
    assert received == ["response.created", "response.in_progress"]
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1011


# --- logins ---------------------------------------------------------------------------


async def test_pkce_authorize_redirects_and_the_code_exchanges(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.add_account()
    second = fake_upstream.add_account(email="c@example.com", chatgpt_account_id="acct-c")
    fake_upstream.next_login = second
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect_uri = "http://localhost:1455/auth/callback"
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": "openid profile email offline_access",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-123",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
    }
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.auth_base_url) as client:
            redirect = await client.get("/oauth/authorize?" + urlencode(query))
            assert redirect.status_code == 302
            location = urlsplit(redirect.headers["location"])
            assert f"{location.scheme}://{location.netloc}{location.path}" == redirect_uri
            params = parse_qs(location.query)
            assert params["state"] == ["st-123"]
            form = {
                "grant_type": "authorization_code",
                "client_id": CLIENT_ID,
                "code": params["code"][0],
                "code_verifier": verifier,
                "redirect_uri": redirect_uri,
            }
            wrong = await client.post("/oauth/token", data={**form, "code_verifier": "nope"})
            assert wrong.status_code == 400
            exchanged = await client.post("/oauth/token", data=form)
            assert exchanged.status_code == 200
            replayed = await client.post("/oauth/token", data=form)
            assert replayed.status_code == 400
    identity = identity_from_id_token(exchanged.json()["id_token"])
    assert (identity.email, identity.chatgpt_account_id) == ("c@example.com", "acct-c")
    assert exchanged.json()["refresh_token"] == second.refresh_token


async def test_device_flow_polls_until_approved(fake_upstream: FakeUpstream) -> None:
    account = fake_upstream.add_account()
    fake_upstream.device_auto_approve_after = 2
    auth = fake_upstream.auth_base_url
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=auth) as client:
            usercode = await client.post(
                "/api/accounts/deviceauth/usercode", json={"client_id": CLIENT_ID}
            )
            device = usercode.json()
            assert set(device) == {"device_auth_id", "user_code", "interval", "expires_in"}
            poll = {"device_auth_id": device["device_auth_id"], "user_code": device["user_code"]}
            statuses = []
            while True:
                answer = await client.post("/api/accounts/deviceauth/token", json=poll)
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    break
                assert answer.json() == {"error": "authorization_pending"}
            granted = answer.json()
            exchanged = await client.post(
                "/oauth/token",
                data={
                    "grant_type": "authorization_code",
                    "client_id": CLIENT_ID,
                    "code": granted["authorization_code"],
                    "code_verifier": granted["code_verifier"],
                    "redirect_uri": f"{auth}/deviceauth/callback",
                },
            )
    assert statuses == [403, 403, 200]
    assert exchanged.status_code == 200
    assert identity_from_id_token(exchanged.json()["id_token"]).chatgpt_account_id == "acct-a"
    assert exchanged.json()["access_token"] == account.access_token


# --- chaos proxy ----------------------------------------------------------------------


async def test_chaos_passes_requests_and_streams(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    account = fake_upstream.add_account()
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url_for(chaos.port)) as client:
            usage = await client.get("/wham/usage", headers=backend_headers(account))
            async with client.stream(
                "POST", "/codex/responses", json=RESPONSES_BODY, headers=backend_headers(account)
            ) as response:
                events = [event async for event in read_sse(response)]
    assert usage.status_code == 200
    assert events[-1]["type"] == "response.completed"
    assert chaos.accepted == 1  # keep-alive: both requests rode one connection
    assert chaos.bytes_down > 0
    assert chaos.bytes_up > 0


async def test_blackhole_existing_stalls_pooled_connections_only(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    account = fake_upstream.add_account()
    base_url = fake_upstream.base_url_for(chaos.port)
    timeout = httpx.Timeout(5.0, read=0.5)
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as pooled:
            assert (await pooled.get("/wham/usage", headers=backend_headers(account))).is_success
            chaos.blackhole_existing()
            with pytest.raises(httpx.ReadTimeout):
                await pooled.get("/wham/usage", headers=backend_headers(account))
            async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as fresh:
                answer = await fresh.get("/wham/usage", headers=backend_headers(account))
                assert answer.status_code == 200
    assert chaos.accepted == 2
    assert fake_upstream.count("usage", "acct-a") == 2  # the black-holed request never arrived


async def test_blackhole_all_holds_until_pass_all(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    account = fake_upstream.add_account()
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url_for(chaos.port)) as client:
            chaos.blackhole_all()
            with trio.move_on_after(0.5) as held:
                await client.get("/wham/usage", headers=backend_headers(account))
            assert held.cancelled_caught
            assert chaos.accepted == 1
            assert fake_upstream.count("usage") == 0

            async def ask() -> None:
                answer = await client.get("/wham/usage", headers=backend_headers(account))
                assert answer.status_code == 200

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(0.2)
                assert fake_upstream.count("usage") == 0
                chaos.pass_all()
    # Held bytes are delivered late, like TCP after an outage: the abandoned request too.
    assert fake_upstream.count("usage") == 2


async def test_refuse_gives_connect_error_until_pass_all(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    account = fake_upstream.add_account()
    port = chaos.port
    with trio.fail_after(TIMEOUT):
        chaos.refuse()
        async with httpx.AsyncClient(base_url=fake_upstream.base_url_for(port)) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/wham/usage", headers=backend_headers(account))
            chaos.pass_all()
            assert chaos.port == port
            answer = await client.get("/wham/usage", headers=backend_headers(account))
            assert answer.status_code == 200


async def test_reset_existing_breaks_a_stream_with_a_read_error(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    account = fake_upstream.add_account()
    fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=2))
    received: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url_for(chaos.port)) as client:

            def reset_after_two(received: list[str]) -> None:
                if len(received) == 2:
                    chaos.reset_existing()

            with pytest.raises(httpx.ReadError):
                await stream_turn(client, account, received, reset_after_two)
    assert received == ["response.created", "response.in_progress"]
    with trio.fail_after(TIMEOUT):
        await chaos.wait_active(0)


async def test_delay_slows_each_chunk(fake_upstream: FakeUpstream, chaos: ChaosProxy) -> None:
    account = fake_upstream.add_account()
    chaos.delay = 0.2
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url_for(chaos.port)) as client:
            start = trio.current_time()
            answer = await client.get("/wham/usage", headers=backend_headers(account))
            elapsed = trio.current_time() - start
    assert answer.status_code == 200
    assert elapsed >= 0.4  # at least one chunk each way


# --- control API and lifecycle --------------------------------------------------------


async def test_http_control_api(fake_upstream: FakeUpstream) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=fake_upstream.auth_base_url) as client:
            added = await client.post(
                "/_fake/accounts", json={"email": "d@example.com", "chatgpt_account_id": "acct-d"}
            )
            assert added.status_code == 201
            account = added.json()
            assert account["auth_json"]["tokens"]["access_token"] == account["access_token"]
            queued = await client.post(
                "/_fake/fault",
                json={
                    "account": "acct-d",
                    "endpoint": "usage",
                    "fault": {"kind": "server_error", "http_status": 503},
                    "times": 2,
                },
            )
            assert queued.status_code == 200
            bad = await client.post("/_fake/fault", json={"endpoint": "nowhere", "fault": {}})
            assert bad.status_code == 400
            headers = {
                "authorization": f"Bearer {account['access_token']}",
                "chatgpt-account-id": "acct-d",
            }
            statuses = [
                (await client.get("/backend-api/wham/usage", headers=headers)).status_code
                for _ in range(3)
            ]
            assert statuses == [503, 503, 200]
            counters = (await client.get("/_fake/counters")).json()
            assert counters["counters"]["usage"] == {"acct-d": 3}
            settings = await client.post("/_fake/settings", json={"websocket_enabled": False})
            assert settings.status_code == 200
            await client.post("/_fake/reset")
            counters = (await client.get("/_fake/counters")).json()
    assert counters == {"counters": {}, "pending_faults": {}}
    assert fake_upstream.websocket_enabled is False


async def test_aclose_stops_promptly_under_a_hung_stream() -> None:
    # A long graceful timeout: only dropping the hung stream can make aclose prompt.
    fake = FakeUpstream(graceful_timeout=60.0)
    account = fake.add_account()
    fake.fault("acct-a", "responses", Fault.stop_midway(after_events=1))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(fake.serve)
            assert port == fake.port

            async def hang() -> None:
                async with httpx.AsyncClient(base_url=fake.base_url) as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await stream_turn(client, account, [])

            nursery.start_soon(hang)
            await fake.wait_for_count("responses")
            start = trio.current_time()
            await fake.aclose()
            assert trio.current_time() - start < 30.0  # not the 60 s graceful wait
    with pytest.raises(RuntimeError):
        _ = fake.port
