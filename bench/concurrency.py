"""Many conversations at once over a pool of accounts, HTTP SSE and WebSocket, through vs. direct.

    .venv/bin/python bench/concurrency.py [--concurrency 32] [--accounts 4] [--deltas 50]
                                          [--event-delay 0.01] [--turns 3] [--blocks 2]
                                          [--transports http,ws]

The fake upstream runs in its own process (bench/fake_server.py) and paces its events
(``event_delay`` between events, ``deltas`` small ``response.output_text.delta`` events per
turn, usage headers and a ``codex.rate_limits`` event on every turn). The proxy is a real
subprocess (``python -m service.cli serve --port 0``, temp ``CODEX_LB_TRIO_HOME``, accounts
imported through ``POST /api/accounts/import``), so its CPU and RSS are its own.

``concurrency`` conversations (each its own ``session-id`` and ``prompt_cache_key``, ~30 KiB
Codex-shaped bodies) each run ``turns`` turns back to back: over HTTP one streamed POST per
turn on a shared kept-alive client, over WebSocket one socket per conversation. A block is
one such wave; blocks run in ABBA order (direct, proxy, proxy, direct, ...). Direct
conversations spread over the accounts round robin; proxied ones are spread by the balancer.

Reported per transport: streams/s and events/s and their ratio to direct, time to first event
p50/p95, errors, the proxy's CPU per relayed event over its blocks, and its RSS idle (before
any stream) and at peak while the 32 conversations stream (sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import (  # noqa: E402
    CODEX_PATH,
    DIRECT_PATH,
    BenchAccount,
    ProxyProcess,
    RemoteFake,
    StreamTiming,
    client,
    codex_body,
    codex_headers,
    direct_headers,
    import_accounts,
    ms,
    percentile,
    reply_text,
    run_fake_process,
    run_proxy_process,
    timed_stream,
    timed_ws_turn,
    ws_frame,
    ws_headers,
    ws_url,
)

Turn = Callable[[int, int], Awaitable[StreamTiming]]


class PathResult:
    """Everything measured for one path of one transport over all its blocks."""

    def __init__(self) -> None:
        self.timings: list[StreamTiming] = []
        self.wall = 0.0

    @property
    def ok(self) -> list[StreamTiming]:
        return [t for t in self.timings if t.ok]

    def rate(self) -> float:
        return len(self.ok) / self.wall if self.wall else math.nan

    def event_rate(self) -> float:
        return sum(t.events for t in self.ok) / self.wall if self.wall else math.nan


async def run_block(concurrency: int, turns: int, one_turn: Turn, result: PathResult) -> None:
    """``concurrency`` conversations, each running ``turns`` turns back to back."""

    async def conversation(index: int) -> None:
        for turn in range(turns):
            result.timings.append(await one_turn(index, turn))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(conversation, index)
    result.wall += time.perf_counter() - started


async def sample_rss(proxy: ProxyProcess, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], proxy.memory_kib()["VmRSS"])
        await trio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    async with run_fake_process() as fake, run_proxy_process(fake) as proxy:
        idle_kib = proxy.memory_kib()["VmRSS"]
        accounts = await import_accounts(proxy.url, fake, args.accounts)
        await fake.configure(reply_text=reply_text(args.deltas), event_delay=args.event_delay)
        print(f"concurrency: {args.concurrency} conversations over {args.accounts} accounts, "
              f"{args.deltas} deltas per turn {args.event_delay * 1000:g} ms apart, "
              f"{args.turns} turns per conversation per block, {args.blocks} blocks per path "
              "(ABBA)\n  proxy: subprocess (python -m service.cli serve); upstream: fake in its "
              f"own process; proxy ready in {proxy.ready_seconds * 1000:.0f} ms; times in ms")
        print(f"  {'':5}{'path':7}{'streams':>8}{'errors':>7}{'streams/s':>10}{'events/s':>10}"
              f"{'ttfe p50':>9}{'p95':>8}{'total p50':>10}")
        for transport in args.transports:
            await measure(args, transport, fake, proxy, accounts, idle_kib)


async def measure(args: argparse.Namespace, transport: str, fake: RemoteFake,
                  proxy: ProxyProcess, accounts: list[BenchAccount], idle_kib: int) -> None:
    bodies = [codex_body(args.body_kb, cache_key=f"bench-conv-{i}")
              for i in range(args.concurrency)]
    raws = [json.dumps(body).encode() for body in bodies]
    limits = httpx.Limits(max_connections=args.concurrency * 2,
                          max_keepalive_connections=args.concurrency * 2)

    def direct_account(index: int) -> BenchAccount:
        return accounts[index % len(accounts)]

    async with AsyncExitStack() as stack:
        if transport == "http":
            direct_http = await stack.enter_async_context(
                client(fake.base_url.removesuffix("/backend-api"), limits=limits))
            proxy_http = await stack.enter_async_context(client(proxy.url, limits=limits))

            async def direct(index: int, turn: int) -> StreamTiming:
                return await timed_stream(
                    direct_http, DIRECT_PATH, body=raws[index],
                    headers=direct_headers(direct_account(index), f"bench-conv-{index}"))

            async def proxied(index: int, turn: int) -> StreamTiming:
                return await timed_stream(proxy_http, CODEX_PATH, body=raws[index],
                                          headers=codex_headers(f"bench-conv-{index}"))
        else:
            direct_sockets = [await stack.enter_async_context(trio_websocket.open_websocket_url(
                ws_url(fake.base_url.removesuffix("/backend-api")), max_message_size=1 << 26,
                extra_headers=ws_headers(direct_headers(direct_account(i), f"bench-conv-{i}"))))
                for i in range(args.concurrency)]
            proxy_sockets = [await stack.enter_async_context(trio_websocket.open_websocket_url(
                ws_url(proxy.url), max_message_size=1 << 26,
                extra_headers=ws_headers(codex_headers(f"bench-conv-{i}"))))
                for i in range(args.concurrency)]
            frames = [ws_frame(body) for body in bodies]

            async def direct(index: int, turn: int) -> StreamTiming:
                return await timed_ws_turn(direct_sockets[index], frames[index])

            async def proxied(index: int, turn: int) -> StreamTiming:
                return await timed_ws_turn(proxy_sockets[index], frames[index])

        # Warm both paths (connections, token checks) outside the figures.
        await run_block(args.concurrency, 1, direct, PathResult())
        await run_block(args.concurrency, 1, proxied, PathResult())
        results = {"direct": PathResult(), "proxy": PathResult()}
        proxy_cpu = proxy_waited = 0.0
        peak = [0]
        before = (await fake.counters()).get("responses", {})
        for block in range(args.blocks * 2):
            which = ("direct", "proxy", "proxy", "direct")[block % 4]
            if which == "direct":
                await run_block(args.concurrency, args.turns, direct, results["direct"])
                continue
            cpu, waited = sum(proxy.cpu_seconds()), proxy.run_queue_seconds()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_rss, proxy, peak)
                await run_block(args.concurrency, args.turns, proxied, results["proxy"])
                nursery.cancel_scope.cancel()
            proxy_cpu += sum(proxy.cpu_seconds()) - cpu
            proxy_waited += proxy.run_queue_seconds() - waited
        after = (await fake.counters()).get("responses", {})
    report(args, transport, results, proxy_cpu, idle_kib, peak[0], before, after)
    print(f"  {transport}: the proxy's main thread waited for a CPU (runnable, not running) "
          f"{proxy_waited / results['proxy'].wall * 100:.0f}% of its blocks' wall time "
          "(/proc/<pid>/schedstat: both cores busy with other work)")


def report(args: argparse.Namespace, transport: str, results: dict[str, PathResult],
           proxy_cpu: float, idle_kib: int, peak_kib: int, before: dict[str, int],
           after: dict[str, int]) -> None:
    for name, result in results.items():
        ok = result.ok
        first = [t.first_event for t in ok]
        print(f"  {transport:5}{name:7}{len(result.timings):>8}{len(result.timings) - len(ok):>7}"
              f"{result.rate():>10.1f}{result.event_rate():>10,.0f}"
              f"{ms(percentile(first, 0.5)):>9}{ms(percentile(first, 0.95)):>8}"
              f"{ms(percentile([t.total for t in ok], 0.5)):>10}")
    direct, proxy = results["direct"], results["proxy"]
    ratio = proxy.event_rate() / direct.event_rate()
    ttfe_d = percentile([t.first_event for t in direct.ok], 0.5)
    ttfe_p = percentile([t.first_event for t in proxy.ok], 0.5)
    relayed = sum(t.events for t in proxy.timings)
    errors = [t.error for t in direct.timings + proxy.timings if not t.ok]
    print(f"  {transport}: proxy/direct throughput {ratio:.3f}x (target >= 0.95: "
          f"{'met' if ratio >= 0.95 else 'NOT met'}); ttfe p50 +{(ttfe_p - ttfe_d) * 1000:.1f} ms "
          f"(target <= +5 ms: {'met' if ttfe_p - ttfe_d <= 0.005 else 'NOT met'}); "
          f"errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"  {transport}: proxy CPU {proxy_cpu / relayed * 1e6:.1f} us per relayed event, "
          f"{proxy_cpu / proxy.wall * 100:.0f}% of one core while streaming; RSS idle "
          f"{idle_kib / 1024:.1f} MiB, peak at {args.concurrency} streams "
          f"{peak_kib / 1024:.1f} MiB")
    spread = {k.removeprefix("acct-bench-"): after.get(k, 0) - before.get(k, 0) for k in after}
    if transport == "http":
        print("  http: upstream requests per account over the run (both paths): "
              + ", ".join(f"{k}: {v}" for k, v in sorted(spread.items())))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="conversations per path")
    parser.add_argument("--accounts", type=int, default=4, help="accounts in the pool")
    parser.add_argument("--deltas", type=int, default=50, help="delta events per turn")
    parser.add_argument("--event-delay", type=float, default=0.01,
                        help="seconds the fake waits between events")
    parser.add_argument("--turns", type=int, default=3,
                        help="turns each conversation runs back to back in a block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per path (ABBA order)")
    parser.add_argument("--body-kb", type=float, default=30.0, help="request body size in KiB")
    parser.add_argument("--transports", default="http,ws", help="http, ws or both")
    args = parser.parse_args(argv)
    args.transports = [t.strip() for t in args.transports.split(",")]
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
