"""The SSE relay's sink (_StreamRelay): bytes pass unchanged, chunk by chunk, with its guarantees.

Unit tests drive the sink as ``Lease.pump`` does (``await sink.send(chunk)``) and read what
the client would get from its channel; one integration test checks the request body
reaches the upstream as the bytes the client sent.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from actors.accounts import Usage
from actors.proxy_handler import EventStream, _StreamRelay
from tests.stack import CODEX_BODY, open_stack


def sse(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


CREATED = sse("response.created", response={"id": "r1"})
IN_PROGRESS = sse("response.in_progress", response={"id": "r1"})
ADDED = sse("response.output_item.added", item={"type": "message"})
DELTAS = b"".join(sse("response.output_text.delta", delta=f"w{n} ") for n in range(5))
LIMITS = sse("codex.rate_limits", rate_limits={"primary": {"used_percent": 12.5,
                                                           "window_minutes": 300}})
COMPLETED = sse("response.completed", response={"id": "r1", "usage": {"total_tokens": 7}})


class FakeHandler:
    """What the sink needs of its ProxyHandler."""

    def __init__(self) -> None:
        self.usages: list[tuple[str, Usage]] = []

    def _wall_clock(self) -> float:
        return 1_700_000_000.0

    def _note_usage(self, account_id: str, usage: Usage) -> None:
        self.usages.append((account_id, usage))


def make_sink() -> tuple[_StreamRelay, FakeHandler, trio.MemoryReceiveChannel[bytes], list[int]]:
    send, recv = trio.open_memory_channel[bytes](64)
    handler = FakeHandler()
    commits: list[int] = []
    sink = _StreamRelay(handler, "acct-1", send,  # type: ignore[arg-type]
                        commit=lambda: commits.append(1))
    return sink, handler, recv, commits


def drain(recv: trio.MemoryReceiveChannel[bytes]) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_preamble_is_held_then_sent_with_the_first_real_event_in_one_write() -> None:
    sink, _, recv, commits = make_sink()
    await sink.send(CREATED)
    await sink.send(IN_PROGRESS)
    assert drain(recv) == []
    assert commits == []
    await sink.send(ADDED + DELTAS[:10])  # a real event, and the start of the next one
    assert commits == [1]
    assert drain(recv) == [CREATED + IN_PROGRESS + ADDED]  # never half an event
    await sink.send(DELTAS[10:])
    assert drain(recv) == [DELTAS]  # one upstream read, one write, however many events


async def test_bytes_after_the_terminal_event_never_reach_the_client() -> None:
    sink, _, recv, _ = make_sink()
    await sink.send(CREATED + ADDED + DELTAS + COMPLETED + DELTAS)
    await sink.send(sse("response.failed", response={"error": {"code": "late"}}))
    chunks = []
    async for chunk in recv:  # the channel is closed after the terminal event
        chunks.append(chunk)
    assert b"".join(chunks) == CREATED + ADDED + DELTAS + COMPLETED
    assert sink.outcome.terminal == "response.completed"
    assert sink.outcome.usage == {"total_tokens": 7}
    assert sink.outcome.events == 8
    assert not sink.stop.cancel_called  # the rest of the body is drained, within a bound
    assert sink.stop.deadline < float("inf")


async def test_rate_limit_failure_before_the_commit_fails_over_and_sends_nothing() -> None:
    sink, _, recv, commits = make_sink()
    failed = sse("response.failed", response={
        "error": {"code": "rate_limit_exceeded", "message": "slow down"}})
    await sink.send(CREATED + failed)
    assert sink.early_failure is not None
    assert sink.early_failure.kind == "rate_limited"
    assert sink.stop.cancel_called
    assert commits == []
    assert drain(recv) == []


async def test_other_failures_are_the_clients_to_see() -> None:
    sink, _, recv, commits = make_sink()
    failed = sse("response.failed", response={"error": {"code": "context_length_exceeded"}})
    await sink.send(CREATED + failed)
    assert sink.early_failure is None
    assert commits == [1]
    assert b"".join(drain(recv)) == CREATED + failed
    assert sink.outcome.terminal == "response.failed"


async def test_rate_limits_event_is_read_for_live_usage() -> None:
    sink, handler, recv, _ = make_sink()
    await sink.send(CREATED + ADDED + LIMITS)
    (account_id, usage), = handler.usages
    assert account_id == "acct-1"
    assert usage.primary is not None
    assert usage.primary.used_percent == 12.5
    assert b"".join(drain(recv)) == CREATED + ADDED + LIMITS  # passed on unchanged


async def test_the_client_leaving_stops_the_relay() -> None:
    sink, _, recv, _ = make_sink()
    recv.close()
    await sink.send(CREATED + ADDED)
    assert sink.client_gone
    assert sink.stop.cancel_called


async def test_event_stream_parses_for_routes_that_translate() -> None:
    send, recv = trio.open_memory_channel[bytes](8)
    async with send:
        await send.send(CREATED + ADDED[:7])
        await send.send(ADDED[7:] + COMPLETED)
    with EventStream(recv) as stream:
        kinds = [event.event async for event in stream]
    assert kinds == ["response.created", "response.output_item.added", "response.completed"]


async def test_request_body_goes_upstream_as_the_bytes_the_client_sent(
        tmp_path, fake_upstream, chaos):
    # Compact separators: re-encoding with json.dumps would change the length.
    raw = json.dumps(CODEX_BODY, separators=(",", ":")).encode()
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            async with http.stream("POST", "/backend-api/codex/responses", content=raw,
                                   headers={"content-type": "application/json",
                                            "session-id": "s-raw"}) as response:
                body = await response.aread()
            assert response.status_code == 200
            assert body.endswith(b"\n\n")
            assert b"response.completed" in body
            seen = fake_upstream.requests_for("responses")[-1]
            assert seen.headers["content-length"] == str(len(raw))
            assert seen.body == CODEX_BODY
