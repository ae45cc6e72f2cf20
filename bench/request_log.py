"""What the request log costs: requests/s through the engine with and without it, same run.

    .venv/bin/python bench/request_log.py [--concurrency 16] [--requests 100] [--blocks 20]
                                          [--accounts 2]

The fake upstream and the engine (``open_actors`` with the SQLite account store) run in this
process; each request is a real ``POST /codex/responses`` stream over loopback, read to its
terminal event. The ProxyHandler's ``on_record`` sink is switched per block between the
request log (``service/request_log.py``: queue in memory, one SQLite transaction per second in
a worker thread) and a no-op; blocks alternate (off, on, off, on, ...) so drift on this shared
machine hits both sides alike. Besides requests/s (wall clock, noisy when other programs share
the cores) it reports this process's CPU time per request (both sides' threads included, so
the writer's SQLite work counts), the median of the on/off ratios of neighbouring blocks, and
times ``record()`` alone and the writer's commit rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.proxy_handler import ProxyRequest  # noqa: E402
from actors.request_record import RequestRecord  # noqa: E402
from actors.supervisor import open_actors  # noqa: E402
from service.config import Config, with_overrides  # noqa: E402
from service.login import import_auth_data  # noqa: E402
from service.request_log import RequestLog, open_request_log  # noqa: E402
from service.store import SQLiteAccountStore  # noqa: E402
from tests.fakes.upstream import open_fake_upstream  # noqa: E402
from tests.stack import CODEX_BODY  # noqa: E402


class Switch:
    """The sink the engine calls; points at the log or at nothing."""

    def __init__(self, log: RequestLog) -> None:
        self.log = log
        self.enabled = False
        self.seen = 0

    def __call__(self, record: RequestRecord) -> None:
        self.seen += 1
        if self.enabled:
            self.log.record(record)


async def one_request(engine, worker: int, index: int) -> bool:
    body = {**CODEX_BODY, "prompt_cache_key": f"bench-{worker}"}
    exchange = await engine.proxy.forward(ProxyRequest(
        path="/codex/responses", headers=(("session-id", f"bench-{worker}"),), body=body,
        sticky_key=f"bench-{worker}"))
    if exchange.events is None:
        return False
    last = ""
    with exchange.events:
        async for event in exchange.events:
            last = event.event
    return last == "response.completed"


async def block(engine, *, concurrency: int, requests: int) -> tuple[float, float, int]:
    """``requests`` streams over ``concurrency`` workers; (seconds, CPU seconds, failures)."""
    remaining = iter(range(requests))
    failures = 0

    async def worker(number: int) -> None:
        nonlocal failures
        for index in remaining:
            if not await one_request(engine, number, index):
                failures += 1

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for number in range(concurrency):
            nursery.start_soon(worker, number)
    return time.perf_counter() - started, time.process_time() - cpu, failures


def micro(log: RequestLog, count: int = 50_000) -> float:
    """Mean cost of record() in microseconds (queue + counters, no I/O)."""
    sample = RequestRecord(started_at=time.time(), request_id="req_x", surface="codex_http",
                           model="gpt-5.1-codex", account_id="acc_x", status=200,
                           terminal="response.completed", attempts=1, generation=1,
                           ttfe_ms=3.0, duration_ms=9.0, input_tokens=100, output_tokens=20)
    log.max_pending = count + 1
    started = time.perf_counter()
    for _ in range(count):
        log.record(sample)
    return (time.perf_counter() - started) / count * 1e6


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="codex-lb-bench-log-") as tmp:
        home = Path(tmp)
        async with open_fake_upstream() as fake:
            fake.event_delay = 0.0
            config = with_overrides(
                Config(), upstream={"base_url": fake.base_url, "auth_base_url": fake.auth_base_url},
                storage={"home": str(home)})
            store = await SQLiteAccountStore.open(home)
            try:
                for index in range(args.accounts):
                    account = fake.add_account(email=f"bench{index}@example.com",
                                               chatgpt_account_id=f"acct-bench-{index}")
                    await import_auth_data(store, fake.auth_json(account))
                async with open_request_log(home) as log:
                    switch = Switch(log)
                    async with open_actors(config, store, watch_network=False,
                                           periodic_refresh=False, on_record=switch) as engine:
                        await block(engine, concurrency=args.concurrency, requests=50)  # warm up
                        rates: dict[bool, list[float]] = {False: [], True: []}
                        cpu_ms: dict[bool, list[float]] = {False: [], True: []}
                        failures = 0
                        for number in range(args.blocks):
                            switch.enabled = number % 2 == 1
                            seconds, cpu, failed = await block(
                                engine, concurrency=args.concurrency, requests=args.requests)
                            # the writer's last batch lands inside the block it belongs to
                            cpu_before = time.process_time()
                            await trio.sleep(1.2)
                            cpu += time.process_time() - cpu_before
                            failures += failed
                            rates[switch.enabled].append(args.requests / seconds)
                            cpu_ms[switch.enabled].append(cpu / args.requests * 1000)
                    written = log.metrics.rows_written
                    lag = log.metrics.max_write_lag
                    record_us = micro(log)
                    started = time.perf_counter()
                    flushed = await log.flush()
                    flush_rate = flushed / (time.perf_counter() - started)
            finally:
                await store.aclose()
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    paired = [b / a for a, b in zip(rates[False], rates[True], strict=False)]
    cpu_off, cpu_on = statistics.median(cpu_ms[False]), statistics.median(cpu_ms[True])
    print(f"request log write cost: {args.blocks} alternating blocks of {args.requests} streams, "
          f"{args.concurrency} concurrent, {args.accounts} accounts, in-process engine")
    print(f"  without the log: {off:7.1f} requests/s median, {cpu_off:.2f} ms CPU per request")
    print(f"  with the log:    {on:7.1f} requests/s median, {cpu_on:.2f} ms CPU per request")
    print(f"  with/without: requests/s {on / off:.3f} (median of neighbouring-block ratios "
          f"{statistics.median(paired):.3f}); CPU per request {cpu_on / cpu_off:.3f} "
          f"({cpu_on - cpu_off:+.3f} ms)")
    print(f"  rows written: {written}; largest write lag {lag * 1000:.0f} ms; failures {failures}")
    print(f"  record() alone: {record_us:.2f} us per row; one batch of {flushed} rows commits at "
          f"{flush_rate:,.0f} rows/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="streams per block")
    parser.add_argument("--blocks", type=int, default=20, help="alternating off/on blocks")
    parser.add_argument("--accounts", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
