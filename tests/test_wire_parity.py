"""Today's Codex wire on every path, through real sockets: proxy ↔ chaos ↔ fake backend.

WebSocket parity with HTTP (live usage, cooldowns, failover before the first event), frames
beyond response.create, the upstream socket's lifetime (idle death, the 60-minute cap),
forwarded upgrade headers, path death mid-wait, transcription, credits and limit families,
and the root ``/responses`` alias.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
import zstandard

from actors.messages import RotationReason
from service.status import run_status
from tests.fakes.faults import Fault
from tests.stack import CODEX_BODY, Stack, open_stack, read_sse

DEADLINE = 30
TERMINAL = ("response.completed", "response.failed", "response.incomplete", "error")
HEADERS = {"session-id": "wire-1", "originator": "codex_exec",
           "authorization": "Bearer client-own", "chatgpt-account-id": "client-own",
           "openai-beta": "responses_websockets=2026-02-06"}
TURN = {k: v for k, v in CODEX_BODY.items() if k != "stream"}
# No usage poll during a test: live readings are the only source of new usage.
QUIET = {"refresh": {"usage_interval": 3600.0}}


@asynccontextmanager
async def client_socket(stack: Stack, path: str = "/backend-api/codex/responses",
                        ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    url = stack.url.replace("http://", "ws://", 1) + path
    extra = [(k.encode(), v.encode()) for k, v in HEADERS.items()]
    async with trio_websocket.open_websocket_url(url, extra_headers=extra) as ws:
        yield ws


async def read_turn(ws: trio_websocket.WebSocketConnection) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in TERMINAL:
        frames.append(json.loads(await ws.get_message()))
    return frames


async def ws_turn(ws: trio_websocket.WebSocketConnection, raw: str | None = None,
                  **extra: Any) -> list[dict[str, Any]]:
    await ws.send_message(raw or json.dumps({"type": "response.create", **TURN, **extra}))
    return await read_turn(ws)


def terminal_count(frames: list[dict[str, Any]]) -> int:
    return sum(frame["type"] in TERMINAL for frame in frames)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a store-backed condition (usage is written by a background task); no deadline
    of its own: the test's fail_after bounds it."""
    while not await check():  # noqa: ASYNC110 - the store has no change notification
        await trio.sleep(0.02)


def session_account(stack: Stack) -> str:
    """The fake account id whose socket the session opened first."""
    return stack.fake.requests_for("ws_connections")[0].account_id or ""


async def store_account(stack: Stack, fake_id: str) -> Any:
    return await stack.store.get(stack.accounts[fake_id].id)


# --- WebSocket parity with HTTP --------------------------------------------------------------


async def test_websocket_usage_comes_from_the_upgrade_and_from_rate_limit_frames(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            fake_upstream.set_usage("acct-a", primary_used=37.0)
            polls = fake_upstream.count("usage")
            async with client_socket(stack) as ws:
                # The upgrade answer's x-codex-* headers, before any turn.
                await eventually(lambda: _primary_is(stack, 37.0))
                fake_upstream.set_usage("acct-a", primary_used=64.0, has_credits=True,
                                        credits_balance="12.5")
                frames = await ws_turn(ws)
                assert frames[-1]["type"] == "response.completed"
                assert any(f["type"] == "codex.rate_limits" for f in frames)
                # The in-turn codex.rate_limits frame (no headers ride on a socket's turns).
                await eventually(lambda: _primary_is(stack, 64.0))
            account = await store_account(stack, "acct-a")
            assert account.usage.credits is not None
            assert account.usage.credits.balance == "12.5"
            assert fake_upstream.count("usage") == polls  # no poll explains it


async def _primary_is(stack: Stack, used: float) -> bool:
    usage = (await store_account(stack, "acct-a")).usage
    return usage.primary is not None and usage.primary.used_percent == used


async def test_in_turn_usage_limit_cools_down_and_replays_the_turn_on_another_account(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2, **QUIET) as stack:
            async with client_socket(stack) as ws:
                first = session_account(stack)
                other = "acct-b" if first == "acct-a" else "acct-a"
                resets_at = int(time.time()) + 1800
                fake_upstream.fault(first, "ws", Fault.rate_limited(resets_at=resets_at))
                frames = await ws_turn(ws)
                # The client saw one clean turn: no error, one terminal event.
                assert frames[-1]["type"] == "response.completed", frames[-1]
                assert terminal_count(frames) == 1
                assert fake_upstream.count("ws_turns", first) == 1
                assert fake_upstream.count("ws_turns", other) == 1
                assert (await store_account(stack, first)).cooldown_until == resets_at
                # The session stays on the account that served it.
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
                assert fake_upstream.count("ws_turns", other) == 2
                assert fake_upstream.count("ws_turns", first) == 1


async def test_address_evidence_closes_the_upstream_websocket_of_a_silent_turn(
    tmp_path, fake_upstream, chaos
):
    # The route moved to another local address: the turn's upstream socket, bound to the old
    # one, is shut at once and the turn ends with its terminal event (not after 240 s of
    # silence); the next turn goes out on a fresh socket.
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"stream_idle_timeout": 240.0,
                                        "dead_path_silence": 30.0}, **QUIET) as stack:
            async with client_socket(stack) as ws:
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
                first = session_account(stack)
                fake_upstream.fault(first, "ws", Fault.stop_midway(after_events=3, mode="silent"))
                frames: list[dict[str, Any]] = []

                async def turn() -> None:
                    frames.extend(await ws_turn(ws))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(turn)
                    await fake_upstream.wait_for_count("ws_turns", 2)
                    await trio.sleep(0.3)
                    changed = trio.current_time()
                    await stack.engine.clients.address_changed(old="127.0.0.1",
                                                               new="127.0.0.2")
                # The generation's path death alone would end the turn after 30 s of silence.
                assert trio.current_time() - changed < 15.0
                assert frames[-1]["type"] == "response.failed", frames[-1]
                assert terminal_count(frames) == 1
                stats = await stack.engine.clients.stats()
                assert stats.sockets_closed["address"] >= 1
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"


async def test_usage_limit_with_no_other_account_reaches_the_client_and_cools_down(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with client_socket(stack) as ws:
                resets_at = int(time.time()) + 900
                fake_upstream.fault("acct-a", "ws", Fault.rate_limited(resets_at=resets_at))
                frames = await ws_turn(ws)
                assert [f["type"] for f in frames] == ["error"]
                assert frames[0]["error"]["type"] == "usage_limit_reached"
                assert (await store_account(stack, "acct-a")).cooldown_until == resets_at


async def test_turn_cut_after_its_first_event_is_never_replayed(tmp_path, fake_upstream, chaos):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2, **QUIET) as stack:
            async with client_socket(stack) as ws:
                first = session_account(stack)
                fake_upstream.fault(first, "ws", Fault.stop_midway(after_events=5, mode="close"))
                frames = await ws_turn(ws)
                assert frames[-1]["type"] == "response.failed"
                assert frames[-1]["response"]["error"]["code"] == "upstream_connection_lost"
                assert terminal_count(frames) == 1
                assert any(f["type"] == "response.output_text.delta" for f in frames)
                assert fake_upstream.count("ws_turns") == 1  # not replayed anywhere
                # The session goes on: the next turn opens a fresh socket, same account.
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
                assert fake_upstream.count("ws_connections", first) == 2
                assert fake_upstream.count("ws_turns") == 2


# --- frames beyond response.create -----------------------------------------------------------


async def test_every_well_formed_frame_goes_up_exactly_as_the_client_wrote_it(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with client_socket(stack) as ws:
                # Odd spacing and key order: a re-serialising relay would change both.
                raw = '{ "type" : "response.create",  "zz_last": 1, ' + json.dumps(TURN)[1:]
                frames = await ws_turn(ws, raw=raw)
                assert frames[-1]["type"] == "response.completed"
                response_id = frames[-1]["response"]["id"]
                processed = f'{{"type":"response.processed",   "response_id":"{response_id}"}}'
                await ws.send_message(processed)
                await fake_upstream.wait_for_count("ws_processed", 1)
                # Malformed frames are answered by the proxy and go nowhere.
                for bad in (b"\x00binary", "not json", '{"no_type": 1}'):
                    await ws.send_message(bad)
                    answer = json.loads(await ws.get_message())
                    assert answer["error"]["code"] == "invalid_frame", answer
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
            assert fake_upstream.ws_raw_frames[:2] == [raw, processed]
            assert fake_upstream.requests_for("ws_processed")[0].body["response_id"] == response_id
            assert fake_upstream.count("ws_turns") == 2


# --- the upstream socket's lifetime ----------------------------------------------------------


async def test_socket_closed_between_turns_is_replaced_on_the_same_account(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2, **QUIET) as stack:
            async with client_socket(stack) as ws:
                first = session_account(stack)
                turn1 = await ws_turn(ws)
                assert fake_upstream.close_idle_websockets() == 1
                await fake_upstream.wait_for_count("ws_idle_closes", 1)
                turn2 = await ws_turn(ws, previous_response_id=turn1[-1]["response"]["id"])
                assert turn2[-1]["type"] == "response.completed"
                assert all(f["type"] != "error" for f in turn2)
                # And once more without waiting for the close to be noticed first.
                fake_upstream.close_idle_websockets()
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
            assert fake_upstream.count("ws_connections", first) == 3
            assert fake_upstream.count("ws_connections") == 3
            second_socket_turn = fake_upstream.requests_for("ws_turns")[1].body
            assert second_socket_turn["previous_response_id"] == turn1[-1]["response"]["id"]


async def test_sixty_minute_cap_opens_a_fresh_socket_and_resends_the_turn(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with client_socket(stack) as ws:
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
                fake_upstream.age_out_websockets()
                frames = await ws_turn(ws)
                terminals = [f["type"] for f in frames if f["type"] in TERMINAL]
                assert terminals == ["response.completed"]
                assert "websocket_connection_limit_reached" not in json.dumps(frames)
            assert fake_upstream.count("ws_limit_closes") == 1
            assert fake_upstream.count("ws_connections") == 2
            assert fake_upstream.count("ws_turns") == 3  # turn 1, the refused one, its resend


async def test_account_that_cannot_open_a_fresh_socket_answers_the_turn_plainly(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2, **QUIET) as stack:
            async with client_socket(stack) as ws:
                first = session_account(stack)
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
                fake_upstream.close_idle_websockets()
                await fake_upstream.wait_for_count("ws_idle_closes", 1)
                fake_upstream.fault(first, "ws", Fault.server_error(503), times=None)
                frames = await ws_turn(ws)
                assert [f["type"] for f in frames] == ["error"]
                error = frames[0]["error"]
                assert error["code"] == "account_unavailable"
                assert stack.accounts[first].id in error["message"]
                fake_upstream.clear_faults()
            # Never moved to another account: its responses are unknown there.
            assert fake_upstream.count("ws_connections", first) >= 2
            assert fake_upstream.count("ws_turns") == 1


async def test_upgrade_headers_codex_reads_reach_the_client(tmp_path, fake_upstream, chaos):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with client_socket(stack) as ws:
                headers = {k.decode().lower(): v.decode() for k, v in ws.handshake_headers}
                assert headers["x-codex-turn-state"].startswith("fake-turn-state-")
                assert headers["x-models-etag"] == fake_upstream.models_etag
                assert headers["openai-model"] == "gpt-5.1-codex"
                assert headers["x-reasoning-included"] == "true"
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"


async def test_silent_turn_ends_soon_after_its_path_is_proven_dead(tmp_path, fake_upstream, chaos):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with client_socket(stack) as ws:
                fake_upstream.fault("acct-a", "ws", Fault.stop_midway(after_events=4))
                await ws.send_message(json.dumps({"type": "response.create", **TURN}))
                frames = [json.loads(await ws.get_message()) for _ in range(4)]
                generation = (await stack.engine.clients.stats()).generation
                started = trio.current_time()
                # A wake is evidence enough (a transport failure alone is only suspicion).
                await stack.engine.clients.rotate(seen_generation=generation,
                                                  reason=RotationReason.WAKE)
                frames += await read_turn(ws)
                waited = trio.current_time() - started
                assert frames[-1]["type"] == "response.failed"
                assert "path died" in frames[-1]["response"]["error"]["message"]
                # dead_path_silence (3 s), not the 240 s idle timeout (the bound only separates
                # the two; a loaded machine stretches the 3 s).
                assert waited < 20.0, waited
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"


# --- the root alias ----------------------------------------------------------------------------


async def test_root_responses_alias_over_sse_and_websocket(tmp_path, fake_upstream, chaos):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with stack.http() as http, http.stream(
                "POST", "/responses", json=CODEX_BODY, headers=HEADERS
            ) as response:
                assert response.status_code == 200
                assert (await read_sse(response))[-1]["type"] == "response.completed"
            async with client_socket(stack, "/responses") as ws:
                assert (await ws_turn(ws))[-1]["type"] == "response.completed"
            assert fake_upstream.count("responses") == 1
            assert fake_upstream.count("ws_turns") == 1


# --- credits and limit families ---------------------------------------------------------------


async def test_credits_and_limit_families_reach_api_status_and_the_balancer(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2, **QUIET) as stack:
            reset = time.time() + 3600
            # Both out of their plan's 5-hour window; only the younger one has credits.
            fake_upstream.set_usage("acct-a", primary_used=100.0, primary_reset_at=reset)
            fake_upstream.set_usage("acct-b", primary_used=100.0, primary_reset_at=reset,
                                    has_credits=True, credits_balance="42",
                                    extra_limits={"codex-bengalfox": ("GPT-5.3-Codex-Spark", 7.0)})
            async with stack.http() as http:
                for account in ("acct-a", "acct-b"):  # a direct HTTP turn on each: live headers
                    own = [("session-id", f"s-{account}")]
                    await _turn_on(stack, http, account, own)
                await eventually(lambda: _credits_known(stack))
                # The balancer: the account on credits wins over the spent one (and the oldest).
                fake_upstream.reset()
                for _ in range(3):
                    async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY,
                                           headers={"session-id": "x"}) as response:
                        await read_sse(response)
                assert fake_upstream.count("responses", "acct-b") == 3
                body = (await http.get("/api/accounts")).json()
            shown = {a["chatgpt_account_id"]: a["usage"] for a in body["accounts"]}
            assert shown["acct-b"]["credits"] == {"has_credits": True, "unlimited": False,
                                                  "balance": "42"}
            family = shown["acct-b"]["families"][0]
            assert family["name"] == "codex-bengalfox"
            assert family["limit_name"] == "GPT-5.3-Codex-Spark"
            assert family["primary"]["used_percent"] == 7.0
            assert shown["acct-a"]["credits"]["has_credits"] is False
            out, err = _Buffer(), _Buffer()
            code = await trio.to_thread.run_sync(lambda: run_status(stack.url, out=out, err=err))
            assert code == 0, err.text
            assert "credits   balance 42  (plan limit reached; still usable on credits)" in out.text
            assert ("credits   none  (plan limit reached; no credits: waits for the reset)"
                    in out.text)
            assert "GPT-5.3-Codex-Spark:" in out.text


async def _turn_on(stack: Stack, http: httpx.AsyncClient, account: str, headers: list) -> None:
    """One HTTP turn served by ``account`` (the other paused for the moment)."""
    others = [a for a in stack.accounts if a != account]
    for other in others:
        await http.post(f"/api/accounts/{stack.accounts[other].id}/pause")
    async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY,
                           headers=dict(headers)) as response:
        assert (await read_sse(response))[-1]["type"] == "response.completed"
    for other in others:
        await http.post(f"/api/accounts/{stack.accounts[other].id}/resume")


async def _credits_known(stack: Stack) -> bool:
    a, b = await store_account(stack, "acct-a"), await store_account(stack, "acct-b")
    return (a.usage.credits is not None and b.usage.credits is not None
            and bool(b.usage.families) and a.status.value == "active"
            and b.status.value == "active")


class _Buffer:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# --- transcription -----------------------------------------------------------------------------


AUDIO = bytes(range(256)) * 2048  # 512 KiB of "audio"


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]
        await trio.lowlevel.checkpoint()


def multipart(fields: list[tuple[str, str | tuple[str, str, bytes]]], boundary: str) -> bytes:
    out = b""
    for name, value in fields:
        if isinstance(value, tuple):
            filename, content_type, data = value
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n').encode()
            out += data + b"\r\n"
        else:
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                    f"{value}\r\n").encode()
    return out + f"--{boundary}--\r\n".encode()


async def test_backend_transcribe_streams_the_upload_to_a_pooled_account(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            boundary = "b-test-1"
            body = multipart([("file", ("clip.wav", "audio/wav", AUDIO)),
                              ("prompt", "names: Ada")], boundary)
            async with stack.http() as http:
                response = await http.post(
                    "/backend-api/transcribe", content=chunked(body), headers={
                        "content-type": f"multipart/form-data; boundary={boundary}",
                        "authorization": "Bearer client-own"})
            assert response.status_code == 200, response.text
            assert response.json() == {"text": f"fake transcription of {len(AUDIO)} bytes"}
            seen = fake_upstream.requests_for("transcribe", "acct-a")[0]
            assert seen.body["size"] == len(AUDIO)
            assert seen.body["filename"] == "clip.wav"
            assert seen.body["prompt"] == "names: Ada"
            pooled = fake_upstream.account("acct-a").access_token
            assert seen.headers["authorization"] == f"Bearer {pooled}"
            # Streamed, not buffered: chunked on the way up, no content-length from us.
            assert "content-length" not in seen.headers
            assert seen.headers.get("transfer-encoding") == "chunked"


async def test_openai_transcriptions_map_onto_the_backend(tmp_path, fake_upstream, chaos):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            fake_upstream.transcription_text = "hello world"
            boundary = "b-openai"
            # OpenAI's field order: model first, prompt after the file; model is ignored.
            body = multipart([("model", "whisper-1"), ("file", ("a.mp3", "audio/mpeg", AUDIO)),
                              ("prompt", "spell: Trio"), ("response_format", "json")], boundary)
            async with stack.http() as http:
                response = await http.post(
                    "/v1/audio/transcriptions", content=chunked(body),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
                assert response.status_code == 200, response.text
                assert response.json() == {"text": "hello world"}
                seen = fake_upstream.requests_for("transcribe")[0].body
                assert seen["size"] == len(AUDIO)
                assert seen["sha256"] == hashlib.sha256(AUDIO).hexdigest()
                assert seen["filename"] == "a.mp3"
                assert seen["content_type"] == "audio/mpeg"
                assert seen["prompt"] == "spell: Trio"
                assert seen["fields"] == ["prompt"]  # model and response_format dropped
                missing = await http.post(
                    "/v1/audio/transcriptions", content=multipart([("model", "m")], boundary),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
                assert missing.status_code == 400
                assert "file" in missing.json()["error"]["message"]
                wrong = await http.post("/v1/audio/transcriptions", json={"file": "x"})
                assert wrong.status_code == 415


async def test_transcription_over_the_size_limit_is_413_while_streaming(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"max_body_bytes": 256 * 1024}, **QUIET) as stack:
            boundary = "b-big"
            body = multipart([("file", ("big.wav", "audio/wav", AUDIO))], boundary)
            async with stack.http() as http:
                response = await http.post(  # no content-length: only streaming can catch it
                    "/backend-api/transcribe", content=chunked(body),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
                assert response.status_code == 413, response.text
                assert response.json()["error"]["code"] == "request_too_large"
            async with stack.http() as http:  # and the server still serves
                assert (await http.get("/health")).status_code == 200


# The fake backend parses uploads with Quart's form parser, which leaves its temporary file to
# the garbage collector when the upload it was reading is cut off (as here, by the proxy).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_stalled_transcription_upload_is_408_not_held_forever(
    tmp_path, fake_upstream, chaos
):
    # The client sends half its upload and goes quiet: the pooled upstream request must not
    # wait on it forever.
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              server={"body_idle_timeout": 0.5}, **QUIET) as stack:
            boundary = "b-stall"
            body = multipart([("file", ("s.wav", "audio/wav", AUDIO))], boundary)
            half = body[: len(body) // 2]
            sock = await trio.open_tcp_stream("127.0.0.1", httpx.URL(stack.url).port)
            async with sock:  # a raw client: it waits for the answer while it stays quiet
                await sock.send_all(
                    b"POST /backend-api/transcribe HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"content-type: multipart/form-data; boundary=" + boundary.encode()
                    + b"\r\ntransfer-encoding: chunked\r\n\r\n"
                    + f"{len(half):x}\r\n".encode() + half + b"\r\n")
                received = b""
                while not received.endswith(b"}") :
                    chunk = await sock.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
            head, _, payload = received.partition(b"\r\n\r\n")
            assert head.lower().startswith(b"http/1.1 408"), received
            assert b"connection: close" in head.lower()
            error = json.loads(payload)["error"]
            assert error["code"] == "request_timeout"
            assert "body_idle_timeout" in error["message"]
            async with stack.http() as http:
                assert (await http.get("/health")).status_code == 200


# --- the fake decodes compressed bodies as the backend does ------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
async def test_fake_backend_decodes_compressed_request_bodies(fake_upstream, encoding):
    account = fake_upstream.add_account()
    raw = json.dumps(CODEX_BODY).encode()
    packed = {"gzip": gzip.compress, "deflate": zlib.compress,
              "zstd": zstandard.ZstdCompressor().compress}[encoding](raw)
    auth = {"authorization": f"Bearer {account.access_token}", "chatgpt-account-id": "acct-a",
            "content-type": "application/json"}
    with trio.fail_after(DEADLINE):
        async with httpx.AsyncClient(base_url=fake_upstream.base_url) as http:
            async with http.stream("POST", "/codex/responses", content=packed,
                                   headers={**auth, "content-encoding": encoding}) as response:
                assert response.status_code == 200
                assert (await read_sse(response))[-1]["type"] == "response.completed"
            assert fake_upstream.requests_for("responses")[-1].body == CODEX_BODY
            corrupt = await http.post("/codex/responses", content=b"\x00garbage",
                                      headers={**auth, "content-encoding": encoding})
            assert corrupt.status_code == 400
            unknown = await http.post("/codex/responses", content=raw,
                                      headers={**auth, "content-encoding": "br"})
            assert unknown.status_code == 415


# --- the parsing underneath (pure) -------------------------------------------------------------


NOW = 1_700_000_000.0


def test_credits_and_families_from_headers_round_trip_through_the_usage_json():
    from actors.accounts import Credits, Usage
    from actors.upstream import merge_usage, usage_from_headers

    usage = usage_from_headers({
        "X-Codex-Primary-Used-Percent": "100", "x-codex-primary-reset-at": str(int(NOW) + 60),
        "x-codex-credits-has-credits": "True", "x-codex-credits-unlimited": "false",
        "x-codex-credits-balance": "17.25",
        "x-codex-bengalfox-primary-used-percent": "3.5",
        "x-codex-bengalfox-primary-window-minutes": "300",
        "x-codex-bengalfox-limit-name": "GPT-5.3-Codex-Spark",
        "x-codex-turn-state": "not a family",
    }, NOW)
    assert usage is not None
    assert usage.credits == Credits(has_credits=True, unlimited=False, balance="17.25")
    [family] = usage.families
    assert (family.name, family.limit_name) == ("codex-bengalfox", "GPT-5.3-Codex-Spark")
    assert family.primary is not None
    assert family.primary.used_percent == 3.5
    assert family.primary.window_seconds == 18000
    assert Usage.from_json(json.loads(json.dumps(usage.to_json()))) == usage
    # Credits alone are a reading; a later reading without them keeps them.
    only_credits = usage_from_headers({"x-codex-credits-has-credits": "false"}, NOW)
    assert only_credits is not None
    assert only_credits.credits == Credits(has_credits=False)
    merged = merge_usage(usage, Usage(updated_at=NOW + 1))
    assert merged.credits == usage.credits
    assert merged.families == usage.families
    assert usage_from_headers({"x-codex-credits-has-credits": "maybe"}, NOW) is None


def test_credits_from_the_rate_limits_event():
    from actors.accounts import Credits
    from actors.upstream import usage_from_rate_limits_event

    event = {"type": "codex.rate_limits", "rate_limits": {"primary": {"used_percent": 5}},
             "credits": {"has_credits": True, "unlimited": True, "balance": None}}
    usage = usage_from_rate_limits_event(event, NOW)
    assert usage is not None
    assert usage.credits == Credits(has_credits=True, unlimited=True, balance=None)
    credits_only = usage_from_rate_limits_event(
        {"type": "codex.rate_limits", "credits": {"has_credits": False}}, NOW)
    assert credits_only is not None
    assert credits_only.primary is None


@pytest.mark.parametrize(("frame", "kind"), [
    ('{"type":"response.create"}', "response.create"),
    ('{"response_id":"r","type":"response.processed"}', "response.processed"),
    ('{"type":"some.future.frame","x":[1]}', "some.future.frame"),
])
def test_well_formed_frames_are_relayed_whatever_their_type(frame, kind):
    from actors.proxy_websocket import frame_type

    assert frame_type(frame) == kind


@pytest.mark.parametrize("frame", [b"{}", "nope", "[1]", '{"type": 3}', '{"type": ""}', "{}",
                                   '{"type":"x","pad":"' + "a" * (16 * 1024 * 1024) + '"}'],
                         ids=["binary", "not-json", "list", "type-number", "type-empty",
                              "no-type", "oversize"])
def test_malformed_frames_are_refused(frame):
    from actors.proxy_websocket import frame_type

    with pytest.raises(ValueError, match=r"."):
        frame_type(frame)


def test_upstream_frames_are_read_without_parsing_unless_the_relay_acts_on_them():
    from actors.ws_session import _peek

    assert _peek('{"type":"response.output_text.delta","delta":"{\\"type\\":\\"error\\"}"}') == (
        "response.output_text.delta", None)
    kind, payload = _peek('{"sequence_number":1,"type":"error","error":{"code":"x"}}')
    assert kind == "error"
    assert payload is not None
    assert payload["error"]["code"] == "x"
    assert _peek("not json") == (None, None)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
async def test_compressed_codex_body_reaches_the_backend_through_the_proxy(
    tmp_path, fake_upstream, chaos, encoding
):
    """Codex may send its Responses body zstd-compressed: the proxy decodes it (within the size
    limit) and the backend, which decodes what it is told is encoded, gets the same JSON."""
    raw = json.dumps(CODEX_BODY).encode()
    packed = {"gzip": gzip.compress, "deflate": zlib.compress,
              "zstd": zstandard.ZstdCompressor().compress}[encoding](raw)
    with trio.fail_after(DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos, **QUIET) as stack:
            async with stack.http() as http, http.stream(
                "POST", "/backend-api/codex/responses", content=packed,
                headers={**HEADERS, "content-type": "application/json",
                         "content-encoding": encoding},
            ) as response:
                assert response.status_code == 200
                assert (await read_sse(response))[-1]["type"] == "response.completed"
            seen = fake_upstream.requests_for("responses")[-1]
            assert seen.body == CODEX_BODY
            assert seen.headers.get("content-encoding") in (None, "identity")
