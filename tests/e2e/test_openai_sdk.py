"""The OpenAI Python SDK against the proxy's OpenAI-compatible surface (``/v1``).

``AsyncOpenAI`` runs on trio (its transport goes through anyio). One exception: a Chat
Completions stream ends with ``data: [DONE]``, on which the SDK stops iterating its inner
async generator without closing it; trio's async-generator finalizer then reports it as a
ResourceWarning, an error in this suite. That test drives the sync client in a thread, where
no async generator is involved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest
import trio

from tests.fakes.upstream import FakeUpstream
from tests.stack import Stack, open_stack

pytestmark = pytest.mark.e2e

MODEL = "gpt-5.1-codex"
REPLY = "Hello from the pooled fake upstream, via /v1."
TEST_DEADLINE = 30.0
SDK_TIMEOUT = 20.0
POOLED_ACCOUNT_ID = "acct-a"


@asynccontextmanager
async def sdk_client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    # max_retries=0: a failure must show up as itself, not as a retried success.
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="sk-client-own",
                                  max_retries=0, timeout=SDK_TIMEOUT) as client:
        yield client


def assert_turn_used_pooled_account(fake: FakeUpstream, *, turns: int = 1) -> None:
    seen = fake.requests_for("responses")
    assert len(seen) == turns
    pooled = fake.account(POOLED_ACCOUNT_ID)
    for request in seen:
        assert request.headers["chatgpt-account-id"] == POOLED_ACCOUNT_ID
        assert request.headers["authorization"] == f"Bearer {pooled.access_token}"
        assert isinstance(request.body, dict)
        assert request.body["model"] == MODEL
        assert request.body["store"] is False
        assert request.body["stream"] is True  # the upstream only streams


async def test_responses_create_returns_the_upstream_text(tmp_path, fake_upstream, chaos):
    fake_upstream.reply_text = REPLY
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, sdk_client(stack) as client:
            response = await client.responses.create(model=MODEL, input="say hi")
            assert response.output_text == REPLY
            assert response.status == "completed"
            assert response.usage is not None
            assert response.usage.output_tokens > 0
            assert_turn_used_pooled_account(fake_upstream)
            assert "say hi" in str(fake_upstream.requests_for("responses")[0].body["input"])


async def test_responses_stream_delivers_deltas_then_completed(tmp_path, fake_upstream, chaos):
    fake_upstream.reply_text = REPLY
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, sdk_client(stack) as client:
            events = []
            async with await client.responses.create(model=MODEL, input="say hi",
                                                     stream=True) as stream:
                async for event in stream:
                    events.append(event)
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            assert len(deltas) > 1  # streamed in pieces, not buffered into one
            assert "".join(deltas) == REPLY
            assert events[0].type == "response.created"
            assert events[-1].type == "response.completed"
            assert events[-1].response.output_text == REPLY
            assert_turn_used_pooled_account(fake_upstream)


async def test_chat_completion_returns_the_upstream_text(tmp_path, fake_upstream, chaos):
    fake_upstream.reply_text = REPLY
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, sdk_client(stack) as client:
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "say hi"}])
            assert completion.object == "chat.completion"
            assert completion.model == MODEL
            [choice] = completion.choices
            assert choice.message.role == "assistant"
            assert choice.message.content == REPLY
            assert choice.finish_reason == "stop"
            assert completion.usage is not None
            assert completion.usage.completion_tokens > 0
            assert_turn_used_pooled_account(fake_upstream)


async def test_chat_completion_stream_concatenates_to_the_upstream_text(
    tmp_path, fake_upstream, chaos
):
    fake_upstream.reply_text = REPLY

    def stream_chat(base_url: str) -> list[openai.types.chat.ChatCompletionChunk]:
        with openai.OpenAI(base_url=base_url, api_key="sk-client-own", max_retries=0,
                           timeout=SDK_TIMEOUT) as client, \
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "say hi"}], stream=True,
                    stream_options={"include_usage": True}) as stream:
            return list(stream)

    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            chunks = await trio.to_thread.run_sync(stream_chat, f"{stack.url}/v1")
            assert chunks
            assert len({chunk.id for chunk in chunks}) == 1
            assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
            with_choices = [chunk for chunk in chunks if chunk.choices]
            text = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
            assert text == REPLY
            assert len([c for c in with_choices if c.choices[0].delta.content]) > 1
            finish_reasons = [c.choices[0].finish_reason for c in with_choices]
            assert finish_reasons[-1] == "stop"
            assert set(finish_reasons[:-1]) == {None}
            # include_usage: one last chunk with usage and no choices
            assert chunks[-1].choices == []
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens > 0
            assert_turn_used_pooled_account(fake_upstream)


async def test_models_list_matches_the_upstream_catalog(tmp_path, fake_upstream, chaos):
    with trio.fail_after(TEST_DEADLINE):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, sdk_client(stack) as client:
            page = await client.models.list()
            ids = [model.id async for model in page]
            assert ids == [model["slug"] for model in fake_upstream.models]
            assert all(model.object == "model" for model in page.data)
            [catalog_request] = fake_upstream.requests_for("models")
            assert catalog_request.headers["chatgpt-account-id"] == POOLED_ACCOUNT_ID
