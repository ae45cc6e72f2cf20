"""The real Codex CLI (pinned version) runs a turn through the proxy against the fake upstream.

Codex logs in as an account the pool does not hold (``acct-cli``): the proxy must replace those
credentials with the pooled account's (``acct-a``), so everything the fake sees on the backend
comes from ``acct-a`` and nothing from ``acct-cli``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.codex_cli import (
    CODEX_VERSION,
    CodexRun,
    LoopbackSink,
    prepare_codex_dirs,
    run_codex_exec,
)
from tests.fakes.upstream import FakeAccount, FakeUpstream
from tests.stack import Stack, open_stack

pytestmark = pytest.mark.e2e

PROMPT = "say hi"
REPLY = "Hello from the pooled fake upstream, via the proxy."
TEST_DEADLINE = 150.0
CLIENT_ACCOUNT_ID = "acct-cli"  # Codex's own login; not in the pool
POOLED_ACCOUNT_ID = "acct-a"  # the stack's only pooled account


async def codex_turn(
    tmp_path: Path, stack: Stack, codex_binary: Path, sink: LoopbackSink, *, websockets: bool
) -> tuple[CodexRun, FakeAccount]:
    """Run one ``codex exec`` turn logged in as a fresh non-pooled account; returns that account."""
    fake = stack.fake
    fake.reply_text = REPLY
    own_login = fake.add_account(email="cli@example.com", chatgpt_account_id=CLIENT_ACCOUNT_ID)
    dirs = prepare_codex_dirs(tmp_path / "codex", proxy_url=stack.url, websockets=websockets,
                              auth=fake.auth_json(own_login), sink_url=sink.url)
    run = await run_codex_exec(codex_binary, dirs, PROMPT, sink_url=sink.url)
    return run, own_login


def assert_codex_succeeded(run: CodexRun) -> None:
    assert run.returncode == 0, run.describe()
    assert REPLY in run.stdout, run.describe()


def assert_pooled_credentials(
    headers: dict[str, str], pooled: FakeAccount, own: FakeAccount
) -> None:
    assert headers["chatgpt-account-id"] == pooled.chatgpt_account_id
    assert headers["authorization"] == f"Bearer {pooled.access_token}"
    assert own.access_token not in headers["authorization"]


def assert_stayed_on_loopback(run: CodexRun, sink: LoopbackSink, fake: FakeUpstream) -> None:
    """Codex reached no foreign host and never refreshed its own login."""
    assert run.foreign_host_lines() == [], run.describe()
    # Everything that went to the sink was ChatGPT web API traffic (workspace routing),
    # which follows chatgpt_base_url; none of it was a token refresh or revoke.
    assert [r.path for r in sink.requests if not r.path.startswith("/backend-api/")] == []
    assert fake.count("token", CLIENT_ACCOUNT_ID) == 0


def assert_models_fetched_through_pool(fake: FakeUpstream) -> None:
    models = fake.requests_for("models")
    assert models, "Codex never fetched the model catalog"
    assert {r.account_id for r in models} == {POOLED_ACCOUNT_ID}
    assert all(r.body == {"client_version": CODEX_VERSION} for r in models)


def mentions_prompt(body: dict[str, Any]) -> bool:
    return PROMPT in json.dumps(body.get("input"))


async def test_codex_exec_over_sse_is_served_by_the_pooled_account(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink
):
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                        websockets=False)
            pooled = fake_upstream.account(POOLED_ACCOUNT_ID)

            assert_codex_succeeded(run)
            assert_stayed_on_loopback(run, loopback_sink, fake_upstream)
            assert_models_fetched_through_pool(fake_upstream)
            assert fake_upstream.count("ws_connections") == 0
            assert fake_upstream.count("ws_turns") == 0

            turns = fake_upstream.requests_for("responses")
            assert turns, "the turn never reached the upstream"
            assert fake_upstream.count("responses", CLIENT_ACCOUNT_ID) == 0
            for turn in turns:
                assert_pooled_credentials(turn.headers, pooled, own)
            turn = turns[-1]
            # The body arrived as plain JSON: no content-encoding (zstd or other) on the way.
            assert "content-encoding" not in turn.headers
            assert isinstance(turn.body, dict), f"unparsable body; headers: {turn.headers}"
            assert mentions_prompt(turn.body)
            assert turn.body["stream"] is True
            assert turn.body["store"] is False
            assert turn.headers["accept"] == "text/event-stream"
            assert turn.headers["originator"] == "codex_exec"
            assert turn.headers["user-agent"].startswith(f"codex_exec/{CODEX_VERSION}")
            for name in ("session-id", "thread-id", "x-client-request-id", "x-codex-window-id"):
                assert turn.headers.get(name), f"{name} did not reach the upstream"
            assert json.loads(turn.headers["x-codex-turn-metadata"])["session_id"] == \
                turn.headers["session-id"]


async def test_codex_exec_over_websocket_is_served_by_the_pooled_account(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink
):
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                        websockets=True)
            pooled = fake_upstream.account(POOLED_ACCOUNT_ID)

            assert_codex_succeeded(run)
            assert_stayed_on_loopback(run, loopback_sink, fake_upstream)
            assert_models_fetched_through_pool(fake_upstream)
            # The turn went over the WebSocket relay, not the SSE fallback.
            assert fake_upstream.count("responses") == 0
            assert fake_upstream.count("ws_turns", CLIENT_ACCOUNT_ID) == 0
            assert fake_upstream.count("ws_turns", POOLED_ACCOUNT_ID) >= 1

            upgrades = fake_upstream.requests_for("ws_connections")
            assert upgrades
            for upgrade in upgrades:
                assert_pooled_credentials(upgrade.headers, pooled, own)
                assert upgrade.headers["openai-beta"] == "responses_websockets=2026-02-06"
                assert upgrade.headers["originator"] == "codex_exec"
                assert upgrade.headers.get("session-id")

            frames = [r.body for r in fake_upstream.requests_for("ws_turns")]
            assert all(frame["type"] == "response.create" for frame in frames)
            # Codex first sends a prewarm frame (generate: false), then the real turn.
            real_turns = [frame for frame in frames if frame.get("generate", True)]
            assert len(real_turns) == 1
            assert mentions_prompt(real_turns[0])
            assert real_turns[0]["store"] is False


async def test_codex_on_websocket_is_relayed_over_sse_when_upstream_refuses_websockets(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink
):
    fake_upstream.websocket_enabled = False  # the upgrade is answered 426
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                        websockets=True)
            pooled = fake_upstream.account(POOLED_ACCOUNT_ID)

            assert_codex_succeeded(run)
            assert_stayed_on_loopback(run, loopback_sink, fake_upstream)
            assert fake_upstream.count("ws_connections") >= 1
            assert fake_upstream.count("ws_turns") == 0
            turns = fake_upstream.requests_for("responses")
            for turn in turns:
                assert_pooled_credentials(turn.headers, pooled, own)
                assert turn.body["stream"] is True
                assert "type" not in turn.body  # the WS frame's envelope stays behind
            assert any(mentions_prompt(turn.body) and turn.body.get("generate", True)
                       for turn in turns)


async def test_prewarm_frame_does_not_become_an_upstream_http_turn(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink
):
    """Codex opens each WebSocket session with a prewarm ``response.create`` carrying
    ``generate: false``. Over SSE Codex never sends one, so relaying it as a POST
    /codex/responses asks the real upstream for something no client asks it for (at best a
    wasted turn on the account's quota).
    """
    fake_upstream.websocket_enabled = False
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, _own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                         websockets=True)
            assert_codex_succeeded(run)
            bodies = [turn.body for turn in fake_upstream.requests_for("responses")]
            assert [body.get("generate", True) for body in bodies] == [True]


@pytest.mark.parametrize("websockets", [False, True], ids=["sse", "websocket"])
async def test_upstream_sees_no_remote_addr_from_the_proxy(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink, websockets
):
    """Quart puts the client's address into request headers as ``Remote-Addr``; it must not
    travel upstream (it is the proxy's bookkeeping, like ``x-real-ip``).

    The fake is a Quart app too, so it records exactly one ``remote-addr`` of its own (its
    peer, the chaos proxy); a second value joined in means the proxy forwarded its own.
    """
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, _own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                         websockets=websockets)
            assert_codex_succeeded(run)
            endpoint = "ws_connections" if websockets else "responses"
            seen = fake_upstream.requests_for(endpoint)
            assert seen
            assert [r.headers.get("remote-addr") for r in seen] == ["127.0.0.1"] * len(seen)


async def test_codex_websocket_session_survives_upstream_socket_closing_between_turns(
    tmp_path, fake_upstream, chaos, codex_binary, loopback_sink
):
    """A multi-turn WebSocket session (Codex's prewarm turn, then the real turn) in which the
    upstream closes its socket after every turn, as an idle socket dies or the backend's
    60-minute cap ends it. Codex must not notice: the next turn goes out on a fresh upstream
    socket of the same pooled account.
    """
    fake_upstream.websocket_close_after_turns = 1
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            run, own = await codex_turn(tmp_path, stack, codex_binary, loopback_sink,
                                        websockets=True)
            pooled = fake_upstream.account(POOLED_ACCOUNT_ID)

            assert_codex_succeeded(run)
            assert_stayed_on_loopback(run, loopback_sink, fake_upstream)
            assert "error" not in run.stdout.lower(), run.describe()
            assert fake_upstream.count("responses") == 0  # no fallback to HTTP
            frames = [r.body for r in fake_upstream.requests_for("ws_turns")]
            assert [frame.get("generate", True) for frame in frames] == [False, True], frames
            assert mentions_prompt(frames[1])
            # Each turn had its own upstream socket, all on the pooled account.
            assert fake_upstream.count("ws_idle_closes", POOLED_ACCOUNT_ID) == 2
            upgrades = fake_upstream.requests_for("ws_connections")
            assert len(upgrades) == 2
            for upgrade in upgrades:
                assert_pooled_credentials(upgrade.headers, pooled, own)
            # The session kept its identity across sockets.
            assert upgrades[0].headers["session-id"] == upgrades[1].headers["session-id"]
