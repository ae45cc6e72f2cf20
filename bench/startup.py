"""Start-up and idle memory: ``serve`` and the bare relay, started in turns, side by side.

    .venv/bin/python bench/startup.py [--runs 5]

Each run execs the program (``python -m service.cli serve`` with a store in a fresh home, or
``bench/bare_relay.py``), waits for its ``listening on`` line, polls ``GET /health`` until it
answers 200 (the time from exec to that answer is "ready"), waits a second and reads its
VmRSS. The two programs alternate (ABBA), so the machine's load hits both alike. With
``--imports`` it also prints the slowest imports of ``service.server`` (``-X importtime``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import run_fake, run_proxy_process  # noqa: E402


async def one(fake, *, bare: bool) -> tuple[float, float]:
    async with run_proxy_process(fake, bare=bare) as proxy:
        ready = proxy.ready_seconds
        await trio.sleep(1.0)
        return ready, proxy.memory_kib()["VmRSS"] / 1024


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[float, float]]] = {"serve": [], "bare": []}
    async with run_fake("process") as fake:
        for run in range(args.runs):
            order = ("serve", "bare") if run % 2 == 0 else ("bare", "serve")
            for name in order:
                results[name].append(await one(fake, bare=name == "bare"))
    print(f"start-up: exec to GET /health 200, then VmRSS 1 s later; {args.runs} runs each, ABBA")
    for name, rows in results.items():
        ready = [r for r, _ in rows]
        rss = [m for _, m in rows]
        label = "serve (service.cli)" if name == "serve" else "bare relay"
        print(f"  {label:20} ready median {statistics.median(ready) * 1000:5.0f} ms "
              f"(min {min(ready) * 1000:.0f}, max {max(ready) * 1000:.0f}); "
              f"idle RSS median {statistics.median(rss):.1f} MiB "
              f"(min {min(rss):.1f}, max {max(rss):.1f})")
    if args.imports:
        print_imports()


def print_imports(top: int = 15) -> None:
    """The slowest imports of service.server, cumulative, from ``-X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import service.server"],
        cwd=str(Path(__file__).resolve().parent.parent), capture_output=True, text=True,
        check=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, own, cumulative, name = (part.strip() for part in line.split("|", 1)[0].split(":", 1)
                                    + line.split("|")[1:])
        if cumulative.isdigit():
            rows.append((int(cumulative), int(own), name))
    rows.sort(reverse=True)
    print(f"\nimport service.server, slowest cumulative (us; -X importtime inflates them):")
    for cumulative, own, name in rows[:top]:
        print(f"  {cumulative:9,} cumulative {own:8,} own  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--imports", action="store_true", help="print the slowest imports too")
    trio.run(main, parser.parse_args())
