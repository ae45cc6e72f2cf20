"""A fault stays in its request (issue 8, items 1, 5, 6, 9).

Request-level faults are tried over real sockets (the proxy under hypercorn, the fake
upstream behind the chaos proxy); actor-level ones in-process under the autojump clock
(tests/rig.py), where the ProxyHandler runs under its real supervisor.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import httpx
import pytest
import trio

from actors.accounts import Usage, UsageWindow
from actors.errors import ActorUnavailable, ClientError, UnexpectedError
from actors.proxy_handler import ProxyHandler
from actors.upstream import TERMINAL_EVENT_TYPES
from service.store import SQLiteAccountStore, StoreError
from tests.fakes.faults import Fault
from tests.rig import Upstream, events_of, make_account, rig, turn
from tests.stack import CODEX_BODY, open_stack, read_sse

CODEX_HEADERS = {"session-id": "sess-1", "originator": "codex_exec"}


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes httpx would refuse to send, and read the whole answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head + body)
        chunks = []
        with trio.move_on_after(30):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                    break
    return b"".join(chunks)


def post_head(port: int, path: str, body: bytes, extra: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n").encode() + extra + b"\r\n"


async def until(read, done, *, bound: float = 30.0) -> None:
    """Poll ``await read()`` until ``done(value)``, for at most ``bound`` seconds."""
    with trio.fail_after(bound):
        while not done(await read()):
            await trio.sleep(0.02)


# --- 1: a bad header byte is the client's 400; neighbours never notice ----------------------


async def test_bad_header_byte_is_a_400_naming_the_header_and_neighbours_finish(
    tmp_path, fake_upstream, chaos
):
    import json

    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            port = int(stack.url.rsplit(":", 1)[1])
            fake_upstream.event_delay = 0.05  # a neighbour stream that lasts a while
            body = json.dumps(CODEX_BODY).encode()
            neighbour: list[dict] = []

            async def stream_neighbour() -> None:
                async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY,
                                       headers=CODEX_HEADERS) as response:
                    assert response.status_code == 200
                    neighbour.extend(await read_sse(response))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_neighbour)
                await fake_upstream.wait_for_count("responses", 1)
                for _ in range(6):  # more than the supervisor's crash-loop limit
                    raw = await raw_request(port, post_head(
                        port, "/backend-api/codex/responses", body,
                        b"x-codex-turn-metadata: {\"cwd\":\"/home/jos\xe9\"}\r\n"), body)
                    status_line, _, rest = raw.partition(b"\r\n")
                    assert b" 400 " in status_line, raw[:200]
                    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
                    assert error["param"] == "x-codex-turn-metadata"
                    assert "x-codex-turn-metadata" in error["message"]
                    assert error["type"] == "invalid_request_error"
            assert [e["type"] for e in neighbour][-1] == "response.completed"
            assert sum(e["type"] in TERMINAL_EVENT_TYPES for e in neighbour) == 1
            response = await http.post("/backend-api/codex/responses", json=CODEX_BODY,
                                       headers=CODEX_HEADERS)
            assert response.status_code == 200  # still serving
            assert fake_upstream.count("responses") == 2  # the bad ones never went up


async def test_bad_header_byte_on_a_websocket_upgrade_is_refused_with_json(
    tmp_path, fake_upstream, chaos
):
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            port = int(stack.url.rsplit(":", 1)[1])
            head = (f"GET /backend-api/codex/responses HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                    "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n"
                    "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "session-id: caf\xe9\r\n\r\n").encode("latin-1")
            raw = await raw_request(port, head)
            assert b" 400 " in raw.partition(b"\r\n")[0], raw[:200]
            assert b'"param": "session-id"' in raw
            assert fake_upstream.count("ws_connections") == 0


async def test_unsendable_header_inside_the_engine_is_a_400_and_the_actor_lives(autojump_clock):
    async with rig([make_account(1)]) as r:
        for value in ("caf\xe9", "snow \u2603", "line\nbreak"):
            with pytest.raises(ClientError) as info:
                await r.proxy.forward(turn(headers=(("x-note", value),)))
            assert info.value.http_status == 400
            assert info.value.param == "x-note"
        events = await events_of(r.proxy, turn())
        assert events[-1]["type"] == "response.completed"


async def test_a_bug_is_a_500_with_a_request_id_counted_and_the_actor_lives(autojump_clock, caplog):
    async with rig([make_account(1)]) as r:
        r.store.broken["list_accounts"] = RuntimeError("a bug in the balancer's input")
        started = trio.current_time()
        with pytest.raises(UnexpectedError) as info:
            await r.proxy.forward(turn())
        assert trio.current_time() - started < 1.0
        assert info.value.http_status == 500
        assert "request id req_" in info.value.message
        assert "balancer" not in info.value.message  # the text of a bug stays in the log
        request_id = info.value.message.split("request id ")[1].split(";")[0]
        assert sum(request_id in record.getMessage() for record in caplog.records) == 1
        del r.store.broken["list_accounts"]
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        stats = await r.proxy.stats()
        assert stats["request_faults"]["internal"] == 1


async def test_store_errors_fail_over_or_answer_503_and_the_actor_lives(autojump_clock):
    upstream = Upstream()
    async with rig([make_account(1), make_account(2)], upstream=upstream) as r:
        # A rate limit whose cooldown cannot be saved still fails over.
        async def limited(request):
            import httpx

            return httpx.Response(429, json={"error": {"type": "usage_limit_reached",
                                                       "resets_in_seconds": 600}})

        upstream.before["responses"] = [limited]
        r.store.fail["set_cooldown"] = 1
        events = await events_of(r.proxy, turn())
        assert events[-1]["type"] == "response.completed"
        assert len(upstream.responses) == 1  # the limited account answered through the hook
        # A store that cannot list the accounts: this request's 503, nobody else's.
        r.store.fail["list_accounts"] = 1
        with pytest.raises(ActorUnavailable) as info:
            await r.proxy.forward(turn())
        assert info.value.http_status == 503
        assert info.value.code == "store_unavailable"
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert (await r.proxy.stats())["request_faults"]["store"] == 1


async def test_store_errors_over_real_sockets(tmp_path, fake_upstream, chaos, monkeypatch):
    with trio.fail_after(60):
        async with (open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack,
                    stack.http() as http):
            async def broken_cooldown(account_id, until):
                raise StoreError("store.db: disk I/O error")

            monkeypatch.setattr(stack.store, "set_cooldown", broken_cooldown)
            fake_upstream.fault("*", "responses", Fault.rate_limited(resets_at=time.time() + 600))
            response = await http.post("/backend-api/codex/responses", json=CODEX_BODY,
                                       headers=CODEX_HEADERS)
            assert response.status_code == 200  # failed over despite the unsaved cooldown

            async def broken_list():
                raise StoreError("store.db: disk I/O error")

            monkeypatch.setattr(stack.store, "list_accounts", broken_list)
            response = await http.post("/backend-api/codex/responses", json=CODEX_BODY,
                                       headers=CODEX_HEADERS)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "store_unavailable"
            assert "request id req_" in response.json()["error"]["message"]
            monkeypatch.undo()
            response = await http.post("/backend-api/codex/responses", json=CODEX_BODY,
                                       headers=CODEX_HEADERS)
            assert response.status_code == 200
            metrics = (await http.get("/metrics")).text
            assert 'codex_lb_request_faults_total{kind="store"} 1' in metrics
            assert 'codex_lb_request_faults_total{kind="internal"} 0' in metrics


# --- 5: nothing follows a terminal event --------------------------------------------------


async def test_unclean_close_after_completed_adds_no_failed_event(autojump_clock):
    upstream = Upstream(after_terminal="reset")
    async with rig([make_account(1)], upstream=upstream) as r:
        events = await events_of(r.proxy, turn())
        assert events[-1]["type"] == "response.completed"
        assert sum(e["type"] in TERMINAL_EVENT_TYPES for e in events) == 1


async def test_unclean_close_after_completed_over_real_sockets(tmp_path, fake_upstream, chaos):
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            # Every event, response.completed included, then the connection drops mid-body.
            fake_upstream.fault("acct-a", "responses",
                                Fault.stop_midway(after_events=1000, mode="close"))
            async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY,
                                   headers=CODEX_HEADERS) as response:
                assert response.status_code == 200
                events = await read_sse(response)
            assert events[-1]["type"] == "response.completed"
            assert sum(e["type"] in TERMINAL_EVENT_TYPES for e in events) == 1


# --- a client that leaves ends its request ------------------------------------------------


def _silent_after_two_events(closed: list[float]) -> Upstream:
    """An upstream whose stream sends two events and then nothing, ever."""
    upstream = Upstream()

    async def body():
        try:
            yield b'event: response.created\ndata: {"type":"response.created"}\n\n'
            yield (b'event: response.output_text.delta\n'
                   b'data: {"type":"response.output_text.delta","delta":"hi"}\n\n')
            await trio.sleep_forever()
        finally:
            closed.append(trio.current_time())

    async def silent_stream(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    upstream.before["responses"] = [silent_stream]
    return upstream


async def test_a_client_leaving_a_silent_stream_ends_the_request_at_once(autojump_clock):
    # The relay used to notice a departed client only when the next upstream chunk came:
    # under a silent upstream that was the 240 s idle timeout, holding the lease (and the
    # upstream connection) all that time.
    closed: list[float] = []
    async with rig([make_account(1)], upstream=_silent_after_two_events(closed)) as r:
        exchange = await r.proxy.forward(turn())
        assert exchange.events is not None
        with exchange.events:
            async for event in exchange.events:
                if event.event == "response.output_text.delta":
                    break
        left_at = trio.current_time()
        await trio.sleep(1)
        assert closed and closed[0] - left_at < 1  # the upstream response was closed
        assert sum((await r.clients.stats()).leases.values()) == 0
        assert (await r.proxy.stats())["counters"]["client_disconnects"] == 1


# httpx's chain of body iterators is collected unfinished when a stream stops early, though
# the response itself is closed (as in tests/test_simulation.py).
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_a_client_leaving_a_silent_stream_over_real_sockets(tmp_path, fake_upstream, chaos):
    with trio.fail_after(60):  # a hang guard; the idle timeout (240 s) is far beyond it
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            fake_upstream.fault("acct-a", "responses", Fault.stop_midway(after_events=3))
            async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY,
                                   headers=CODEX_HEADERS) as response:
                assert response.status_code == 200
                async with aclosing(response.aiter_lines()) as lines:
                    async for line in lines:
                        if line.startswith("data:"):
                            break  # an event came; the upstream goes silent now
            # The client has hung up; the engine lets the upstream exchange go.
            await until(stack.engine.proxy.stats,
                        lambda s: s["counters"].get("client_disconnects") == 1, bound=30)
            await until(stack.engine.clients.stats, lambda s: not any(s.leases.values()),
                        bound=30)


# --- 6: any ensure_fresh failure fails over ------------------------------------------------


async def test_account_removed_meanwhile_fails_over(autojump_clock):
    upstream = Upstream()
    async with rig([make_account(1), make_account(2)], upstream=upstream) as r:
        r.store.hidden.add("acc_1")  # listed, but gone by the time its tokens are asked for
        for _ in range(4):
            events = await events_of(r.proxy, turn(headers=(("session-id", f"s{_}"),)))
            assert events[-1]["type"] == "response.completed"
        assert set(upstream.responses) == {"acct-2"}


async def test_token_refresher_unavailable_fails_over_then_answers_503(autojump_clock):
    async with rig([make_account(1), make_account(2)]) as r:
        r.refresher.close()  # the refresher is gone for good
        with pytest.raises(ActorUnavailable):
            await r.proxy.forward(turn())
        assert (await r.proxy.stats())["counters"]["failovers"] >= 2


class CountingTokens:
    """A TokenHandle that counts the calls that reach the refresher."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    async def ensure_fresh(self, account_id, **kwargs):
        self.calls.append((account_id, kwargs.get("force", False)))
        return await self.inner.ensure_fresh(account_id, **kwargs)


async def test_a_fresh_token_is_reused_without_asking_the_refresher(autojump_clock):
    async with rig([make_account(1)]) as r:
        r.handler._tokens = counting = CountingTokens(r.handler._tokens)
        for index in range(3):
            events = await events_of(r.proxy, turn(headers=(("session-id", f"s{index}"),)))
            assert events[-1]["type"] == "response.completed"
        assert counting.calls == [("acc_1", False)]
        await trio.sleep(61)  # past TOKEN_REUSE: asked again
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert counting.calls == [("acc_1", False)] * 2


async def test_a_token_saved_since_is_sent_not_the_reused_one(autojump_clock):
    async with rig([make_account(1)]) as r:
        r.handler._tokens = counting = CountingTokens(r.handler._tokens)
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        await r.tokens.ensure_fresh("acc_1", force=True)  # rotates: the old access token dies
        served = len(r.upstream.responses)
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert len(r.upstream.responses) == served + 1  # no 401 and retry: the new token went
        assert counting.calls == [("acc_1", False)] * 2


async def test_a_401_on_a_reused_token_refreshes_and_retries(autojump_clock):
    async with rig([make_account(1)]) as r:
        r.handler._tokens = counting = CountingTokens(r.handler._tokens)
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        r.upstream.access.clear()  # the upstream revoked the token; the store does not know
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert counting.calls == [("acc_1", False), ("acc_1", True), ("acc_1", False)]
        assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert len(counting.calls) == 3  # the refreshed token is reused in turn


# --- 9: usage off the hot path ------------------------------------------------------------


async def test_usage_readings_coalesce_into_one_write_per_interval(autojump_clock):
    async with rig([make_account(1)]) as r:
        for index in range(10):
            events = await events_of(r.proxy, turn(headers=(("session-id", f"s{index}"),)))
            assert events[-1]["type"] == "response.completed"
        await trio.sleep(1.5)
        usage_writes = [w for w in r.store.writes if w[0] in ("set_usage", "merge_usages")]
        assert 1 <= len(usage_writes) <= 2  # 20 readings (headers + events)
        stored = (await r.store.get("acc_1")).usage
        assert stored.primary == UsageWindow(used_percent=12.0, window_seconds=18000)
        assert stored.secondary is not None
        assert stored.secondary.used_percent == 33.0


async def test_usage_of_a_finished_stream_is_flushed_when_the_handler_stops(autojump_clock):
    async with rig([make_account(1)]) as r:
        r.store.write_delay = 0.05  # a disk
        await events_of(r.proxy, turn())
        r.nursery.cancel_scope.cancel()  # the engine stops before the next batch
    stored = (await r.store.get("acc_1")).usage
    assert stored.primary is not None
    assert stored.secondary is not None


async def test_partial_readings_of_one_account_both_reach_the_store(tmp_path):
    # Two readings with different windows, noted back to back: neither overwrites the other.
    with trio.fail_after(30):
        async with await SQLiteAccountStore.open(tmp_path) as store:
            await store.upsert(make_account(1))
            handler = ProxyHandler(store=store, clients=None, tokens=None)  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                await nursery.start(handler.run)
                handler._note_usage("acc_1", Usage(primary=UsageWindow(used_percent=10.0)))
                await trio.lowlevel.checkpoint()
                handler._note_usage("acc_1", Usage(secondary=UsageWindow(used_percent=20.0)))
                await until(lambda: store.get("acc_1"), lambda a: a.usage.secondary is not None)
                nursery.cancel_scope.cancel()
            usage = (await store.get("acc_1")).usage
            assert usage.primary == UsageWindow(used_percent=10.0)
            assert usage.secondary == UsageWindow(used_percent=20.0)


async def test_a_cooldown_never_queues_behind_usage_writes(tmp_path):
    order: list[str] = []
    with trio.fail_after(60):
        async with await SQLiteAccountStore.open(tmp_path) as store:
            for n in range(1, 6):
                await store.upsert(make_account(n))
            for name in ("set_usage", "merge_usages", "set_cooldown"):
                method = getattr(store, name)

                async def recorded(*args, _method=method, _name=name, **kwargs):
                    result = await _method(*args, **kwargs)
                    order.append(_name)
                    return result

                setattr(store, name, recorded)
            handler = ProxyHandler(store=store, clients=None, tokens=None)  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                await nursery.start(handler.run)
                for index in range(200):  # a burst of streams reporting usage
                    handler._note_usage(f"acc_{index % 5 + 1}",
                                        Usage(primary=UsageWindow(used_percent=float(index))))
                await trio.lowlevel.checkpoint()
                await store.set_cooldown("acc_1", time.time() + 60)  # the failover path
                assert order.index("set_cooldown") <= 1  # at most one usage batch before it
                await until(trio.lowlevel.checkpoint, lambda _: "merge_usages" in order)
                nursery.cancel_scope.cancel()
            assert order.count("set_usage") == 0
            assert order.count("merge_usages") == 1  # 200 readings, one transaction
            assert (await store.get("acc_5")).usage.primary == UsageWindow(used_percent=199.0)


def test_fault_kinds_render_on_metrics():
    from service.app import render_request_faults

    text = render_request_faults({"bad_input": 2, "internal": 0})
    assert "# TYPE codex_lb_request_faults_total counter" in text
    assert 'codex_lb_request_faults_total{kind="bad_input"} 2' in text



@pytest.mark.parametrize(("exc", "status", "kind"), [
    (UnicodeEncodeError("ascii", "caf\xe9", 3, 4, "ordinal not in range"), 400, "bad_input"),
    (ClientError("bad", param="x"), 400, "bad_input"),
    (OSError(104, "Connection reset by peer"), 502, "upstream"),
    (StoreError("store.db: disk I/O error"), 503, "store"),
    (ActorUnavailable("the token refresher is shut down"), 503, "unavailable"),
    (ValueError("a bug"), 500, "internal"),
    (ExceptionGroup("one", [StoreError("store.db: locked")]), 503, "store"),
    (ExceptionGroup("two", [ValueError("a"), KeyError("b")]), 500, "internal"),
])
def test_fault_answers_by_kind(exc, status, kind):
    from actors.errors import openai_error_body
    from actors.proxy_handler import fault_answer

    err, fault = fault_answer(exc, "req_0123")
    assert (err.http_status, fault) == (status, kind)
    body = openai_error_body(err)["error"]
    assert "req_0123" in body["message"]
    if kind == "internal":
        assert "bug" not in body["message"]
