"""The request log: a real SQLite file, batched writes, queries, retention, metrics, and
rows written by the real proxy for real requests through the fake upstream."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from actors.errors import ActorUnavailable, UnexpectedError
from actors.request_record import RequestRecord, RequestStats, client_label, usage_tokens
from service.request_log import (
    FILE_NAME,
    QueryError,
    RequestFilter,
    RequestLog,
    open_request_log,
)
from service.status import run_status
from tests.fakes.faults import Fault
from tests.rig import Upstream, events_of, make_account, rig, turn
from tests.stack import CODEX_BODY, open_stack, read_sse

NOW = 1_800_000_000.0  # a fixed wall clock for the unit tests


def rec(i: int = 0, **fields) -> RequestRecord:
    values = dict(started_at=NOW - 60 + i, request_id=f"req_{i}", surface="codex_http",
                  model="gpt-5.1-codex", account_id="acc_a", status=200,
                  terminal="response.completed", attempts=1, generation=1, ttfe_ms=100.0 + i,
                  duration_ms=500.0, input_tokens=10, cached_input_tokens=4, output_tokens=5,
                  reasoning_tokens=2)
    values.update(fields)
    return RequestRecord(**values)


def rows_in(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]


def test_usage_tokens_and_stats_record() -> None:
    usage = {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 100},
             "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12}}
    assert usage_tokens(usage) == {"input_tokens": 120, "cached_input_tokens": 100,
                                   "output_tokens": 30, "reasoning_tokens": 12}
    assert usage_tokens({"input_tokens": "many", "output_tokens": -3, "x": True}) == {
        "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    stats = RequestStats(surface="chat", started_wall=NOW, started=10.0, client=client_label("s1"))
    stats.mark_first_event(10.25)
    stats.mark_first_event(11.0)  # only the first counts
    stats.note_terminal("response.failed", {"response": {"error": {"code": "server_is_overloaded"},
                                                         "usage": usage}})
    record = stats.record(12.0)
    assert record.ttfe_ms == pytest.approx(250.0)
    assert record.duration_ms == pytest.approx(2000.0)
    assert record.error_code == "server_is_overloaded"
    assert record.is_error
    assert record.input_tokens == 120
    assert record.reasoning_tokens == 12
    assert record.client.startswith("s:")
    assert "s1" not in record.client


async def wait_written(log: RequestLog, rows: int) -> None:
    while log.metrics.rows_written < rows:  # noqa: ASYNC110 - a counter the writer bumps
        await trio.sleep(0.01)


async def test_rows_are_written_in_batches_off_the_request_path(tmp_path: Path) -> None:
    # Real time (the writer runs SQLite in a thread, so no autojump clock), short bounds.
    path = tmp_path / FILE_NAME
    log = RequestLog(path, batch_rows=100, flush_interval=0.3, wall_clock=lambda: NOW)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i in range(5):
                log.record(rec(i))
            assert log.pending == 5
            assert rows_in(path) == 0
            await wait_written(log, 5)  # one transaction after the interval
            assert log.pending == 0
            assert rows_in(path) == 5
            assert log.metrics.last_write_lag > 0
            log.flush_interval = 60.0
            await trio.sleep(0.4)  # the writer is now in its 60 s wait
            for i in range(100):  # a full batch wakes the writer long before the interval
                log.record(rec(10 + i))
            with trio.fail_after(30):  # hang guard: the writer's wait is 60 s
                await wait_written(log, 105)
            log.record(rec(999))
            nursery.cancel_scope.cancel()
    assert rows_in(path) == 106  # the last rows are flushed on the way out
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / FILE_NAME, max_pending=3, batch_rows=100)
    for i in range(5):
        log.record(rec(i))
    assert log.pending == 3
    assert log.metrics.rows_dropped == 2
    assert log.metrics.requests["acc_a"] == 5  # the counters still see every request


async def test_query_filters_and_cursor_paging(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_request_log(tmp_path, wall_clock=lambda: NOW) as log:
            for i in range(12):
                log.record(rec(i, account_id="acc_a" if i % 2 else "acc_b",
                               model="m-mini" if i % 3 == 0 else "m-big"))
            log.record(rec(20, status=429, error_code="usage_limit_reached", terminal=""))
            log.record(rec(21, terminal="response.failed", error_code="upstream_error"))
            await log.flush()
            page = await log.query(RequestFilter(limit=5))
            assert [r["request_id"] for r in page["requests"]] == [
                "req_21", "req_20", "req_11", "req_10", "req_9"]
            seen = [r["request_id"] for r in page["requests"]]
            while page["next_cursor"]:
                page = await log.query(RequestFilter(limit=5, before_id=int(page["next_cursor"])))
                seen += [r["request_id"] for r in page["requests"]]
            assert len(seen) == 14
            assert len(set(seen)) == 14
            errors = await log.query(RequestFilter(status="error"))
            assert {r["request_id"] for r in errors["requests"]} == {"req_20", "req_21"}
            limited = await log.query(RequestFilter(status="429"))
            assert [r["error_code"] for r in limited["requests"]] == ["usage_limit_reached"]
            b_mini = await log.query(RequestFilter(account="acc_b", model="m-mini"))
            assert {r["request_id"] for r in b_mini["requests"]} == {"req_0", "req_6"}
            window = await log.query(RequestFilter(since=NOW - 60 + 3, until=NOW - 60 + 5))
            assert {r["request_id"] for r in window["requests"]} == {"req_3", "req_4"}
            with pytest.raises(QueryError):
                await log.query(RequestFilter(status="teapot"))


async def test_history_summary_and_prune(tmp_path: Path) -> None:
    now = {"t": NOW}
    with trio.fail_after(20):
        async with open_request_log(tmp_path, retention_days=30,
                                    wall_clock=lambda: now["t"]) as log:
            hour = 3600
            log.record(rec(0, started_at=NOW - 2 * hour, account_id="acc_a"))
            log.record(rec(1, started_at=NOW - 2 * hour + 5, account_id="acc_b", error_code="x"))
            log.record(rec(2, started_at=NOW - 1, account_id="acc_a", ttfe_ms=900.0))
            log.record(rec(3, started_at=NOW - 3 * 86400, account_id="acc_a"))
            log.record(rec(4, started_at=NOW - 40 * 86400, account_id="acc_a"))  # past retention
            await log.flush()
            history = await log.history()
            hourly, daily = history["hourly"], history["daily"]
            assert len(hourly["buckets"]) == 24
            assert len(daily["buckets"]) == 30
            assert sum(hourly["total"]["requests"]) == 3
            two_hours_ago = hourly["buckets"].index(int((NOW - 2 * hour) // hour) * hour)
            assert hourly["total"]["requests"][two_hours_ago] == 2
            assert hourly["total"]["errors"][two_hours_ago] == 1
            assert hourly["accounts"]["acc_b"]["tokens"][two_hours_ago] == 15
            assert sum(daily["total"]["requests"]) == 4  # the 40-day-old row is outside 30 d
            assert sum(daily["accounts"]["acc_a"]["requests"]) == 3
            summary = await log.summary(since=NOW - 86400)
            assert summary["total"]["requests"] == 3
            assert summary["total"]["errors"] == 1
            assert summary["accounts"]["acc_a"]["cached_input_tokens"] == 8
            assert summary["ttfe_ms"]["p99"] == 900.0
            assert summary["ttfe_ms"]["p50"] == 101.0
            assert summary["error_rate"] == pytest.approx(1 / 3)
            assert (await log.last_errors())["acc_b"]["code"] == "x"
            assert await log.prune() == 1
            assert rows_in(tmp_path / FILE_NAME) == 4
            log.retention_days = 0  # keep forever
            now["t"] = NOW + 400 * 86400
            assert await log.prune() == 0
            assert rows_in(tmp_path / FILE_NAME) == 4


def test_retention_is_a_config_key() -> None:
    from service.config import ConfigError, parse_config

    assert parse_config({}).storage.request_log_days == 30
    assert parse_config({"storage": {"request_log_days": 7}}).storage.request_log_days == 7
    with pytest.raises(ConfigError, match="storage.request_log_days"):
        parse_config({"storage": {"request_log_days": -1}})


async def test_metrics_have_bounded_labels_and_a_histogram() -> None:
    log = RequestLog(Path("/nonexistent/never-opened.db"))
    log.record(rec(0, account_id="acc_a", ttfe_ms=40.0, failovers=1,
                   cooldown_accounts=("acc_b",)))
    log.record(rec(1, account_id="acc_a", ttfe_ms=3000.0, error_code="server_is_overloaded"))
    for i in range(100):
        log.record(rec(2 + i, account_id="acc_b", error_code=f"weird_{i}"))
    text = log.metrics.render(log.pending)
    assert 'codex_lb_requests_total{account="acc_a"} 2' in text
    assert 'codex_lb_request_errors_total{code="server_is_overloaded"} 1' in text
    assert 'codex_lb_request_errors_total{code="other"}' in text  # capped label set
    assert text.count("codex_lb_request_errors_total{") <= 65
    assert 'codex_lb_tokens_total{account="acc_a",kind="cached_input"} 8' in text
    assert 'codex_lb_ttfe_seconds_bucket{le="0.05"} 1' in text
    assert 'codex_lb_ttfe_seconds_bucket{le="2"} 1' in text
    assert 'codex_lb_ttfe_seconds_bucket{le="5"} 102' in text  # 100 rows had 102..201 ms
    assert "codex_lb_failovers_total 1" in text
    assert 'codex_lb_account_cooldowns_total{account="acc_b"} 1' in text
    assert "codex_lb_request_log_pending_rows 102" in text


async def test_a_broken_disk_loses_rows_without_failing(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_request_log(tmp_path) as log:
            log.record(rec(0))
            await log.flush()
            db = log._db
            assert db is not None
            await trio.to_thread.run_sync(lambda: db.execute("DROP TABLE requests"))
            log.record(rec(1))
            assert await log.flush() == 0
            assert log.metrics.write_failures == 1
            assert log.pending == 0


# --- the ProxyHandler's records, in-process (autojump clock) ---------------------------------


async def test_the_handler_records_every_request_however_it_ends(autojump_clock) -> None:
    records: list[RequestRecord] = []
    upstream = Upstream()
    upstream.event_delay = 0.5
    async with rig([make_account(1)], upstream=upstream, on_record=records.append) as r:
        started = trio.current_time()
        events = await events_of(r.proxy, turn())
        finished = trio.current_time()
        assert events[-1]["type"] == "response.completed"
        await trio.sleep(1)  # the task may read the upstream body to its end after the terminal
        (ok,) = records
        assert ok.status == 200
        assert ok.terminal == "response.completed"
        assert ok.account_id == "acc_1"
        assert ok.attempts == 1
        assert ok.generation == 1
        assert ok.model == "gpt-5"
        # The first events are held back until the upstream shows it is answering.
        assert ok.ttfe_ms == pytest.approx(1000.0, abs=1)
        assert ok.duration_ms == pytest.approx((finished - started) * 1000, abs=1)
        assert ok.client == client_label("s1")

        r.store.broken["list_accounts"] = RuntimeError("a bug")
        with pytest.raises(UnexpectedError):
            await r.proxy.forward(turn())
        del r.store.broken["list_accounts"]
        r.store.fail["list_accounts"] = 1
        with pytest.raises(ActorUnavailable):
            await r.proxy.forward(turn())
        await trio.sleep(1)
        bug, store = records[1], records[2]
        assert (bug.status, bug.error_code, bug.attempts) == (500, "internal_error", 0)
        assert (store.status, store.error_code) == (503, "store_unavailable")
        assert len({rec.request_id for rec in records}) == 3


async def test_a_failing_sink_never_fails_a_request(autojump_clock) -> None:
    def broken_sink(record: RequestRecord) -> None:
        raise OSError("disk full")

    async with rig([make_account(1)], on_record=broken_sink) as r:
        for _ in range(2):
            assert (await events_of(r.proxy, turn()))[-1]["type"] == "response.completed"
        assert sum((await r.proxy.stats())["request_faults"].values()) == 0


# --- the real proxy writes the rows -----------------------------------------------------------


async def test_real_requests_leave_rows(tmp_path: Path, fake_upstream, chaos) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack:
            async with stack.http() as client:
                async with client.stream("POST", "/backend-api/codex/responses",
                                         json=CODEX_BODY) as response:
                    events = await read_sse(response)
                assert events[-1]["type"] == "response.completed"
                answer = await client.post("/v1/chat/completions", json={
                    "model": "gpt-5.1-codex", "messages": [{"role": "user", "content": "hi"}]})
                assert answer.status_code == 200
                # Rate-limit whichever account serves next: the request fails over.
                for account in ("acct-a", "acct-b"):
                    fake_upstream.fault(account, "responses",
                                        Fault.rate_limited(resets_at=time.time() + 600), times=1)
                other = {**CODEX_BODY, "prompt_cache_key": "other"}
                async with client.stream("POST", "/backend-api/codex/responses",
                                         json=other) as response:
                    status = response.status_code
                    await response.aread()
                assert status == 429

                rows: list[dict] = []
                with trio.fail_after(30):
                    while len(rows) < 3:
                        await trio.sleep(0.2)
                        page = (await client.get("/api/requests")).json()
                        rows = page["requests"]
                limited, chat, codex = rows[0], rows[1], rows[2]
                assert codex["surface"] == "codex_http"
                assert chat["surface"] == "chat"
                assert codex["terminal"] == "response.completed"
                assert codex["status"] == 200
                assert codex["output_tokens"] > 0
                assert codex["input_tokens"] > 0
                assert codex["ttfe_ms"] is not None
                assert codex["ttfe_ms"] <= codex["duration_ms"]
                assert codex["account_id"] in {a.id for a in stack.accounts.values()}
                assert codex["generation"] >= 1
                assert codex["attempts"] == 1
                assert limited["status"] == 429
                assert limited["failovers"] == 2
                assert limited["error_code"] == "usage_limit_reached"
                assert codex["model"] == CODEX_BODY["model"]

                errors = (await client.get("/api/requests", params={"status": "error"})).json()
                assert [r["request_id"] for r in errors["requests"]] == [limited["request_id"]]
                for params in ({"limit": "many"}, {"cursor": "abc"}, {"status": "teapot"}):
                    refused = await client.get("/api/requests", params=params)
                    assert refused.status_code == 400, params
                    assert refused.json()["error"]["param"] == next(iter(params))
                paged = (await client.get("/api/requests", params={"limit": 2})).json()
                older = (await client.get("/api/requests",
                                          params={"cursor": paged["next_cursor"]})).json()
                assert [r["request_id"] for r in paged["requests"] + older["requests"]] == [
                    r["request_id"] for r in rows]
                bad = await client.get("/api/requests", params={"since": "yesterday"})
                assert bad.status_code == 400
                assert "since" in bad.json()["error"]["message"]

                history = (await client.get("/api/usage/history")).json()
                assert sum(history["hourly"]["total"]["requests"]) == 3
                assert sum(history["hourly"]["total"]["errors"]) == 1
                metrics = (await client.get("/metrics")).text
                assert "codex_lb_requests_total{" in metrics
                assert 'codex_lb_request_errors_total{code="usage_limit_reached"} 1' in metrics
                assert "codex_lb_account_cooldowns_total{" in metrics
                assert "codex_lb_failovers_total 2" in metrics
                assert "@example.com" not in metrics

                # `codex-lb-trio status` shows today's totals per account.
                out, err = io.StringIO(), io.StringIO()
                code = await trio.to_thread.run_sync(
                    lambda: run_status(stack.url, out=out, err=err))
                assert code == 0, err.getvalue()
                today = re.findall(r"today +(\d+) requests?, (\d+) errors?, (\d+) tokens",
                                   out.getvalue())
                assert len(today) == 2, out.getvalue()
                assert sum(int(n) for n, _, _ in today) == 3
                assert sum(int(e) for _, e, _ in today) == 1
                assert sum(int(t) for _, _, t in today) == sum(
                    r["input_tokens"] + r["output_tokens"] for r in rows)
        # The log lives in its own file in the data dir, beside the account store.
        assert rows_in(tmp_path / "home" / FILE_NAME) == 3
        assert json.dumps(rows).count("Bearer") == 0


async def ws_turns(url: str, turns: int) -> None:
    import trio_websocket

    headers = [(b"openai-beta", b"responses_websockets=2026-02-06"), (b"session-id", b"ws-1")]
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        for _ in range(turns):
            await ws.send_message(json.dumps({"type": "response.create", **CODEX_BODY}))
            while json.loads(await ws.get_message())["type"] != "response.completed":
                pass


async def test_websocket_turns_leave_one_row_each(tmp_path: Path, fake_upstream, chaos) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack:
            url = stack.url.replace("http://", "ws://") + "/backend-api/codex/responses"
            await ws_turns(url, 2)  # over an upstream socket
            fake_upstream.websocket_enabled = False
            await ws_turns(url, 1)  # the HTTP fallback
            async with stack.http() as client:
                rows: list[dict] = []
                with trio.fail_after(30):
                    while len(rows) < 3:
                        await trio.sleep(0.2)
                        rows = (await client.get("/api/requests")).json()["requests"]
            assert [r["surface"] for r in rows] == ["codex_ws"] * 3
            assert all(r["terminal"] == "response.completed" for r in rows)
            assert all(r["output_tokens"] > 0 and r["ttfe_ms"] is not None for r in rows)
            assert [r["status"] for r in rows] == [200, 101, 101]
            assert rows[1]["generation"] >= 1
            assert rows[1]["client"] == rows[2]["client"] != ""
            assert fake_upstream.count("ws_turns") == 2


async def test_a_websocket_turn_that_fails_over_says_so(tmp_path: Path, fake_upstream,
                                                        chaos) -> None:
    import trio_websocket

    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack:
            url = stack.url.replace("http://", "ws://") + "/backend-api/codex/responses"
            headers = [(b"openai-beta", b"responses_websockets=2026-02-06")]
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                for turn in range(2):
                    if turn == 1:  # the socket is open: the fault hits this turn
                        fake_upstream.fault("*", "ws", Fault.rate_limited(), times=1)
                    await ws.send_message(json.dumps({"type": "response.create", **CODEX_BODY}))
                    while json.loads(await ws.get_message())["type"] != "response.completed":
                        pass
            async with stack.http() as client:
                rows: list[dict] = []
                with trio.fail_after(30):
                    while len(rows) < 2:
                        await trio.sleep(0.2)
                        rows = (await client.get("/api/requests")).json()["requests"]
            failed_over, first = rows
            assert first["failovers"] == 0
            assert failed_over["failovers"] == 1
            assert failed_over["attempts"] == 2
            assert failed_over["terminal"] == "response.completed"
            assert failed_over["account_id"] != first["account_id"]
            assert failed_over["model"] == CODEX_BODY["model"]
