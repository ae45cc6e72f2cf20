"""Many streams at once over a pool of accounts: throughput, latency and memory, through vs. direct.

    .venv/bin/python bench/concurrency.py [--concurrency 32] [--accounts 4] [--event-delay 0.01]
                                          [--words 120] [--streams-per-worker 2] [--blocks 2]

The fake upstream runs in this process and paces its events (``event_delay`` between events,
one ``output_text.delta`` per word of the reply). The proxy runs as a real subprocess
(``python -m service.cli serve --port 0``, temp ``CODEX_LB_TRIO_HOME``, accounts imported
through ``POST /api/accounts/import``), so its peak RSS (VmHWM) and CPU are its own.

``concurrency`` workers each run ``streams-per-worker`` streams back to back; a block is one
such wave per path, and blocks alternate direct, proxy, direct, proxy... Direct workers spread
over the accounts round robin; proxied workers each carry their own session, so the balancer
spreads them. Time to first event is the first ``data:`` line; "first content" is the first
event past ``response.created``/``response.in_progress`` (the proxy holds those back until the
upstream shows it is really answering, so through the proxy the two coincide by design).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import (  # noqa: E402
    CODEX_PATH,
    DIRECT_PATH,
    ProxyProcess,
    StreamTiming,
    client,
    codex_body,
    codex_headers,
    direct_headers,
    import_accounts,
    ms,
    percentile,
    run_proxy_process,
    timed_stream,
)
from tests.fakes.upstream import FakeAccount, FakeUpstream, open_fake_upstream  # noqa: E402

BODY_KB = 8.0  # a follow-up turn, not a first one: this bench is about the streams


class PathResult:
    """Everything measured for one path over all its blocks."""

    def __init__(self) -> None:
        self.timings: list[StreamTiming] = []
        self.wall = 0.0

    @property
    def ok(self) -> list[StreamTiming]:
        return [t for t in self.timings if t.ok]

    def errors(self) -> Counter[str]:
        return Counter((t.error or "?").split(":")[0] for t in self.timings if not t.ok)


async def run_block(
    concurrency: int, streams_per_worker: int, one_stream, result: PathResult
) -> None:
    """``concurrency`` workers, each running ``streams_per_worker`` streams back to back."""

    async def worker(index: int) -> None:
        for turn in range(streams_per_worker):
            result.timings.append(await one_stream(index, turn))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
    result.wall += time.perf_counter() - started


def print_table(args: argparse.Namespace, results: dict[str, PathResult]) -> None:
    print(f"  {'path':8}{'streams':>8}{'errors':>7}{'streams/s':>10}{'events/s':>10}"
          f"{'ttfe p50':>9}{'ttfe p99':>9}{'1st content p50':>16}"
          f"{'total p50':>10}{'total p99':>10}")
    for name, result in results.items():
        ok = result.ok
        events = sum(t.events for t in ok)
        first = [t.first_event for t in ok]
        content = [t.first_content for t in ok]
        total = [t.total for t in ok]
        print(f"  {name:8}{len(result.timings):>8}{len(result.timings) - len(ok):>7}"
              f"{len(ok) / result.wall:>10.1f}{events / result.wall:>10.0f}"
              f"{ms(percentile(first, 0.5)):>9}{ms(percentile(first, 0.99)):>9}"
              f"{ms(percentile(content, 0.5)):>16}"
              f"{ms(percentile(total, 0.5)):>10}{ms(percentile(total, 0.99)):>10}")
    direct, proxy = results["direct"], results["proxy"]
    ratio = (len(proxy.ok) / proxy.wall) / (len(direct.ok) / direct.wall)

    def added(attr: str, fraction: float) -> float:
        return (percentile([getattr(t, attr) for t in proxy.ok], fraction)
                - percentile([getattr(t, attr) for t in direct.ok], fraction))

    print(f"  proxy/direct throughput: {ratio:.3f}x; added ms: ttfe p50 "
          f"{ms(added('first_event', .5))}, p99 {ms(added('first_event', .99))}; first content p50 "
          f"{ms(added('first_content', .5))}; total p50 {ms(added('total', .5))}")
    for name, result in results.items():
        errors = result.errors()
        if errors:
            print(f"  {name} errors: " + ", ".join(f"{k} x{n}" for k, n in errors.items()))


async def main(args: argparse.Namespace) -> None:
    async with open_fake_upstream() as fake:
        fake.event_delay = args.event_delay
        fake.reply_text = " ".join(f"word{n}" for n in range(args.words))
        async with run_proxy_process(fake) as proxy:
            accounts = await import_accounts(proxy.url, fake, args.accounts)
            await _measure(args, fake, proxy, accounts)


async def _measure(args: argparse.Namespace, fake: FakeUpstream, proxy: ProxyProcess,
                   accounts: list[FakeAccount]) -> None:
    limits = httpx.Limits(max_connections=args.concurrency * 2,
                          max_keepalive_connections=args.concurrency * 2)
    bodies = [json.dumps(codex_body(BODY_KB, cache_key=f"bench-cache-{i}")).encode()
              for i in range(args.concurrency)]
    memory_idle = proxy.memory_kib()
    async with client(fake.base_url.removesuffix("/backend-api"), limits=limits) as direct_http, \
            client(proxy.url, limits=limits) as proxy_http:

        async def direct(index: int, turn: int) -> StreamTiming:
            account = accounts[(index + turn) % len(accounts)]
            return await timed_stream(direct_http, DIRECT_PATH, body=bodies[index],
                                      headers=direct_headers(account, f"bench-{index}"))

        async def proxied(index: int, turn: int) -> StreamTiming:
            return await timed_stream(proxy_http, CODEX_PATH, body=bodies[index],
                                      headers=codex_headers(f"bench-{index}"))

        # Warm both paths (connections, the proxy's first token checks) outside the figures.
        await run_block(args.concurrency, 1, direct, PathResult())
        await run_block(args.concurrency, 1, proxied, PathResult())
        fake.reset()
        results = {"direct": PathResult(), "proxy": PathResult()}
        proxy_cpu = 0.0
        spread: Counter[str] = Counter()  # upstream requests per account from proxied blocks
        for _ in range(args.blocks):
            await run_block(args.concurrency, args.streams_per_worker, direct, results["direct"])
            user, system = proxy.cpu_seconds()
            before = Counter(fake.counters.get("responses", {}))
            await run_block(args.concurrency, args.streams_per_worker, proxied, results["proxy"])
            spread += Counter(fake.counters.get("responses", {})) - before
            user_after, system_after = proxy.cpu_seconds()
            proxy_cpu += (user_after - user) + (system_after - system)
        memory_after = proxy.memory_kib()

    timings = results["proxy"].ok
    events = timings[0].events if timings else 0
    print(f"concurrency: {args.concurrency} concurrent streams over {args.accounts} accounts, "
          f"{events} events per stream, {args.event_delay * 1000:g} ms between events, "
          f"{args.blocks} block(s) x {args.streams_per_worker} stream(s) per worker per path\n"
          f"  proxy: subprocess (python -m service.cli serve), upstream: fake directly; "
          "times in ms")
    print_table(args, results)
    print("  proxied streams per account (upstream requests): "
          + ", ".join(f"{k.removeprefix('acct-bench-')}: {v}" for k, v in sorted(spread.items())))
    busy = proxy_cpu / results["proxy"].wall if results["proxy"].wall else math.nan
    print(f"  proxy CPU during its blocks: {busy * 100:.0f}% of one core; "
          f"{proxy_cpu / max(1, len(results['proxy'].timings)) * 1000:.1f} ms per stream")
    print(f"  proxy memory: VmHWM {memory_after['VmHWM'] / 1024:.1f} MiB peak "
          f"(idle before any stream {memory_idle['VmHWM'] / 1024:.1f} MiB), "
          f"VmRSS now {memory_after['VmRSS'] / 1024:.1f} MiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight per path")
    parser.add_argument("--accounts", type=int, default=4, help="accounts in the pool")
    parser.add_argument("--event-delay", type=float, default=0.01,
                        help="seconds the fake waits between events")
    parser.add_argument("--words", type=int, default=120,
                        help="words in the reply (one delta event each)")
    parser.add_argument("--streams-per-worker", type=int, default=2,
                        help="streams each worker runs back to back in a block")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks per path")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
