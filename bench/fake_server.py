"""The fake ChatGPT backend (tests/fakes) in a process of its own, for the benches.

    .venv/bin/python bench/fake_server.py

Prints ``fake upstream listening on http://127.0.0.1:<port>`` on stderr and serves until
SIGTERM/SIGINT. Benches drive it through its control API under ``/_fake/`` (accounts,
settings such as ``reply_text`` and ``event_delay``, counters): tests/README.md. In its own
process the upstream's CPU work (building and writing every event) no longer competes with
the bench's client for one trio loop, as the real upstream would not.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.upstream import open_fake_upstream  # noqa: E402


async def main() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_fake_upstream(access_ttl=24 * 3600.0) as fake:
            print(f"fake upstream listening on http://127.0.0.1:{fake.port}", file=sys.stderr,
                  flush=True)
            async for _ in signals:
                break
            await fake.aclose()


if __name__ == "__main__":
    trio.run(main)
