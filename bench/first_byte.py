"""Where the time before the first byte goes: a per-stage timeline inside the proxy.

    .venv/bin/python bench/first_byte.py [--turns 80] [--deltas 10] [--body-kb 30]

Runs the proxy subprocess under a wrapper (this file, ``--serve``) that stamps, for each
``POST /backend-api/codex/responses``, the moments after hypercorn saw its first bytes: the
route reading the body, ``ProxyHandle.forward``, the balancer's pick, the token check, the
upstream request (``Lease.send``: sent to headers back), the commit (held preamble released),
the response headers write and the first body write. Turns run one at a time (the timeline is
per process, not per request), and the median of each stamp is printed. Stamps are wrappers
around internal names: a name that no longer exists is skipped, not an error.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARK = "FIRST-BYTE "


def serve_with_stamps(argv: list[str]) -> None:
    """The proxy, with stamps written to stderr (one line per request)."""
    import h11
    from hypercorn.events import RawData
    from hypercorn.protocol import h11 as hypercorn_h11

    import actors.client_manager as client_manager
    import actors.proxy_handler as proxy_handler
    import actors.token_refresher as token_refresher
    import service.surfaces as surfaces
    from service.cli import main

    state: dict[str, Any] = {"t0": 0.0, "marks": []}

    def mark(name: str) -> None:
        state["marks"].append((name, (time.perf_counter() - state["t0"]) * 1000))

    def stamp_async(owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        @functools.wraps(original)
        async def stamped(*args: Any, **kwargs: Any) -> Any:
            mark(name + "<")
            try:
                return await original(*args, **kwargs)
            finally:
                mark(name + ">")

        setattr(owner, attr, stamped)

    handle = hypercorn_h11.H11Protocol.handle

    async def handle_stamped(self: Any, event: Any) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"POST /backend-api/codex/"):
            if state["marks"]:
                sys.stderr.write(MARK + json.dumps(state["marks"]) + "\n")
            state["t0"], state["marks"] = time.perf_counter(), []
        await handle(self, event)

    hypercorn_h11.H11Protocol.handle = handle_stamped
    send_event = hypercorn_h11.H11Protocol._send_h11_event

    async def send_event_stamped(self: Any, event: Any) -> None:
        if isinstance(event, h11.Response):
            mark("response headers")
        elif isinstance(event, h11.Data) and all(n != "first data" for n, _ in state["marks"]):
            mark("first data")
        await send_event(self, event)

    hypercorn_h11.H11Protocol._send_h11_event = send_event_stamped
    stamp_async(surfaces, "json_body_and_text", "body")
    stamp_async(proxy_handler.ProxyHandle, "forward", "forward")
    stamp_async(proxy_handler.ProxyHandler, "_pick", "pick")
    stamp_async(proxy_handler.ProxyHandler, "_fresh_tokens", "tokens")  # reused or asked
    stamp_async(token_refresher.TokenHandle, "ensure_fresh", "refresher")  # asked
    stamp_async(client_manager.ClientHandle, "acquire", "lease")
    stamp_async(client_manager.Lease, "send", "upstream")
    commit = proxy_handler.ProxyHandler._commit

    def commit_stamped(self: Any, *args: Any) -> None:
        mark("commit")
        commit(self, *args)

    proxy_handler.ProxyHandler._commit = commit_stamped
    main(argv)


async def run(args: argparse.Namespace) -> None:
    import bench.overhead as overhead

    def command(config: Path, profile: str | None, profile_out: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve", "--config",
                str(config), "serve", "--port", "0"]

    overhead.proxy_command = command
    async with overhead.run_fake_process() as fake, \
            overhead.run_proxy_process(fake) as proxy:
        await overhead.import_accounts(proxy.url, fake, 1)
        await fake.configure(reply_text=overhead.reply_text(args.deltas), event_delay=0.0)
        raw = json.dumps(overhead.codex_body(args.body_kb)).encode()
        timings = []
        async with overhead.client(proxy.url) as http:
            for _ in range(args.turns + 1):  # the last one only flushes the previous stamps
                timings.append(await overhead.timed_stream(
                    http, overhead.CODEX_PATH, body=raw, headers=overhead.codex_headers("fb")))
    columns: dict[str, list[float]] = {}
    stamped = [line for line in proxy.log if line.startswith(MARK)]
    for line in stamped[args.warmup:]:
        for name, at in json.loads(line[len(MARK):]):
            columns.setdefault(name, []).append(at)
    ttfe = [t.first_event * 1000 for t in timings[args.warmup:-1] if t.ok]
    print(f"first byte: {len(ttfe)} turns one at a time, {args.deltas} deltas, "
          f"body {len(raw) / 1024:.0f} KiB; ms after hypercorn saw the request's first bytes")
    order = sorted(columns, key=lambda n: statistics.median(columns[n]))
    for name in order:
        print(f"  {name:18} p50 {statistics.median(columns[name]):7.2f}")
    print(f"  client's time to first event p50 {statistics.median(ttfe):.2f} ms")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_with_stamps(sys.argv[2:])
        return
    import trio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10, help="first turns left out")
    parser.add_argument("--deltas", type=int, default=10)
    parser.add_argument("--body-kb", type=float, default=30.0)
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
