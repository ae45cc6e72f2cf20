"""Lease acquire+release round trips per second, against a bare counter loop.

    python bench/lease.py [--seconds 3]

The ratio says what one message round trip to the ClientManager costs relative to
doing nothing but counting; both loops run in the same process and trio run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.client_manager import ClientManager, ClientSettings  # noqa: E402


async def bare_counter(seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            count += 1
            await trio.lowlevel.checkpoint()
    return count / seconds


async def lease_loop(clients, seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            async with clients.lease():
                count += 1
    return count / seconds


async def main(seconds: float) -> None:
    def factory(generation: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200)))

    async with trio.open_nursery() as nursery:
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
        await lease_loop(clients, 0.3)  # warm up
        leases = await lease_loop(clients, seconds)
        counter = await bare_counter(seconds)
        await clients.shutdown()
    print(f"lease acquire+release: {leases:,.0f}/s ({1e6 / leases:.1f} us each)")
    print(f"bare counter (+checkpoint): {counter:,.0f}/s ({1e6 / counter:.2f} us each)")
    print(f"ratio counter/lease: {counter / leases:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    trio.run(main, parser.parse_args().seconds)
