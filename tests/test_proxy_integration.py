"""The proxy end to end on loopback: SSE relay, failover, refresh on 401, stream death, flips."""

from __future__ import annotations

import time

import trio

from tests.fakes.faults import Fault
from tests.stack import CODEX_BODY, open_stack, read_sse

CODEX_HEADERS = {"session-id": "sess-1", "originator": "codex_exec", "authorization": "Bearer client-own",
                 "chatgpt-account-id": "client-own"}


async def post_turn(http, *, headers=None, body=None):
    async with http.stream("POST", "/backend-api/codex/responses", json=body or CODEX_BODY,
                           headers=headers or CODEX_HEADERS) as response:
        if response.status_code != 200:
            await response.aread()
            return response, []
        return response, await read_sse(response)


async def test_sse_turn_is_relayed_with_pooled_credentials(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            response, events = await post_turn(http)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            types = [e["type"] for e in events]
            assert types[0] == "response.created"
            assert types[-1] == "response.completed"
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert text == fake_upstream.reply_text
            seen = fake_upstream.requests_for("responses")[-1]
            assert seen.headers["chatgpt-account-id"] == "acct-a"
            assert seen.headers["authorization"] != "Bearer client-own"
            assert seen.headers["session-id"] == "sess-1"
            assert seen.headers["originator"] == "codex_exec"
            # live usage from the x-codex-* headers reaches the store (written in the background)
            with trio.fail_after(20):
                while (await stack.store.get(stack.accounts["acct-a"].id)).usage.primary is None:
                    await trio.sleep(0.01)


async def test_rate_limited_account_fails_over_and_cools_down(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack, stack.http() as http:
            resets_at = int(time.time()) + 3600
            session = {**CODEX_HEADERS, "session-id": "s2"}
            response, _ = await post_turn(http, headers=session)
            first = fake_account_of_last(stack)  # the session sticks to it...
            other = "acct-b" if first == "acct-a" else "acct-a"
            fake_upstream.fault(first, "responses", Fault.rate_limited(resets_at=resets_at))
            response, events = await post_turn(http, headers=session)  # ...until it is limited
            assert response.status_code == 200
            assert events[-1]["type"] == "response.completed"
            assert fake_upstream.requests_for("responses")[-1].headers["chatgpt-account-id"] == other
            cooled = await stack.store.get(stack.accounts[first].id)
            assert cooled.cooldown_until == resets_at

            # both cooling down → 429 usage_limit_reached with the earliest resets_at
            fake_upstream.fault(other, "responses", Fault.rate_limited(resets_at=resets_at + 60))
            response, _ = await post_turn(http, headers={**CODEX_HEADERS, "session-id": "s3"})
            assert response.status_code == 429
            error = response.json()["error"]
            assert error["type"] == "usage_limit_reached"
            assert error["code"] == "usage_limit_reached"
            assert error["resets_at"] == resets_at


async def test_usage_limit_after_the_first_byte_still_cools_the_account_down(
    tmp_path, fake_upstream, chaos
):
    # Too late to fail over (the client has events), not too late to rest the account: the
    # next request goes to the other one instead of hitting the same limit again.
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack, \
                stack.http() as http:
            resets_at = int(time.time()) + 3600
            session = {**CODEX_HEADERS, "session-id": "late-limit"}
            await post_turn(http, headers=session)
            first = fake_account_of_last(stack)
            other = "acct-b" if first == "acct-a" else "acct-a"
            fake_upstream.fault(first, "responses", Fault.stream_failed(
                "usage_limit_reached", after_events=4, resets_at=resets_at))
            response, events = await post_turn(http, headers=session)
            assert response.status_code == 200
            assert len(events) == 5  # the client saw the stream, then its one terminal event
            assert events[-1]["type"] == "response.failed"
            assert events[-1]["response"]["error"]["code"] == "usage_limit_reached"
            assert fake_account_of_last(stack) == first  # no replay after the first byte
            assert (await stack.store.get(stack.accounts[first].id)).cooldown_until == resets_at
            await post_turn(http, headers=session)
            assert fake_account_of_last(stack) == other


def fake_account_of_last(stack) -> str:
    return stack.fake.requests_for("responses")[-1].headers["chatgpt-account-id"]


async def test_401_once_refreshes_and_succeeds_on_same_account(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            fake_upstream.fault("acct-a", "responses", Fault.unauthorized())
            tokens_before = fake_upstream.count("token", "acct-a")
            response, events = await post_turn(http)
            assert response.status_code == 200
            assert events[-1]["type"] == "response.completed"
            assert fake_upstream.count("token", "acct-a") == tokens_before + 1
            assert fake_upstream.count("responses", "acct-a") == 2


# No hedge in the fault tests below: on a loaded machine the headers can take longer than
# hedge_after (2 s), and a hedge that wins would serve the turn from a request without the
# fault (seen under stress: response.completed instead of response.failed).
NO_HEDGE = {"hedge_after": 3600.0}


async def test_stream_dying_midway_ends_with_response_failed(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream=NO_HEDGE) as stack, stack.http() as http:
            fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=4, mode="close"))
            response, events = await post_turn(http)
            assert fake_upstream.count("responses") == 1  # the faulted request, alone
            assert response.status_code == 200
            assert events[-1]["type"] == "response.failed"
            assert events[-1]["response"]["error"]["code"] in ("upstream_connection_lost", "upstream_error")
            account = await stack.store.get(stack.accounts["acct-a"].id)
            assert account.cooldown_until is None  # not penalised
            assert account.status == "active"
            # and the next turn works
            response, events = await post_turn(http)
            assert events[-1]["type"] == "response.completed"


async def test_silent_stream_ends_instead_of_hanging(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"stream_idle_timeout": 1.5, **NO_HEDGE}
                              ) as stack, stack.http() as http:
            fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=4, mode="silent"))
            started = trio.current_time()
            response, events = await post_turn(http)
            assert events[-1]["type"] == "response.failed"
            assert "silent" in events[-1]["response"]["error"]["message"]
            assert trio.current_time() - started < 20  # the 1.5 s idle timeout, not 240 s


async def test_sticky_session_stays_on_one_account(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=3) as stack, stack.http() as http:
            chosen = set()
            for _ in range(4):
                response, events = await post_turn(http, headers={**CODEX_HEADERS, "session-id": "sticky-1"})
                assert events[-1]["type"] == "response.completed"
                chosen.add(fake_account_of_last(stack))
            assert len(chosen) == 1


async def test_black_holed_pool_recovers_after_one_rotation(tmp_path, fake_upstream, chaos):
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            response, events = await post_turn(http)
            assert events[-1]["type"] == "response.completed"
            generation = (await stack.engine.clients.stats()).generation
            chaos.blackhole_existing()  # the network flipped under the pooled connection
            started = trio.current_time()
            results = []
            for _ in range(3):
                response, events = await post_turn(http)
                results.append((response.status_code, events[-1]["type"] if events else None))
            assert results == [(200, "response.completed")] * 3
            # Only the first request met the dead pool: one rotation (no wall-clock bound: a
            # loaded machine stretches the 2 s header timeout and the hedge delay).
            print(f"three turns across the flip: {trio.current_time() - started:.2f}s")
            stats = await stack.engine.clients.stats()
            assert stats.generation == generation + 1
            assert sum(stats.rotations.values()) == 1  # a hedge's or the header timeout's


async def test_no_accounts_gives_503_with_a_hint(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=0) as stack, stack.http() as http:
            response, _ = await post_turn(http)
            assert response.status_code == 503
            assert "accounts import" in response.json()["error"]["message"]


async def test_websocket_turns_relay_over_one_upstream_socket(tmp_path, fake_upstream, chaos):
    import json

    import trio_websocket

    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            url = stack.url.replace("http://", "ws://") + "/backend-api/codex/responses"
            headers = [(k.encode(), v.encode()) for k, v in CODEX_HEADERS.items()]
            headers.append((b"openai-beta", b"responses_websockets=2026-02-06"))
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                for turn in range(2):
                    await ws.send_message(json.dumps({"type": "response.create", **CODEX_BODY}))
                    frames = []
                    while True:
                        frame = json.loads(await ws.get_message())
                        frames.append(frame)
                        if frame["type"] in ("response.completed", "response.failed", "error"):
                            break
                    assert frames[-1]["type"] == "response.completed", frames[-1]
                # a bad frame gets an error event, and the socket keeps serving
                await ws.send_message("not json")
                bad = json.loads(await ws.get_message())
                assert bad["type"] == "error"
                assert bad["error"]["code"] == "invalid_frame"
            assert fake_upstream.count("ws_turns") == 2
            assert fake_upstream.count("ws_connections") == 1


async def test_websocket_falls_back_to_http_when_upstream_refuses(tmp_path, fake_upstream, chaos):
    import json

    import trio_websocket

    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            fake_upstream.websocket_enabled = False
            url = stack.url.replace("http://", "ws://") + "/backend-api/codex/responses"
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"type": "response.create", **CODEX_BODY}))
                frames = []
                while not frames or frames[-1]["type"] not in ("response.completed", "response.failed"):
                    frames.append(json.loads(await ws.get_message()))
                assert frames[-1]["type"] == "response.completed"
            assert fake_upstream.count("ws_turns") == 0
            assert fake_upstream.count("responses") >= 1
