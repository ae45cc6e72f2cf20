"""The proxy's own CPU per relayed event, with no sockets: ``Lease.pump`` → ``_StreamRelay`` →
the chunk channel → the route's loop, against a bare loop that hands the same chunks on.

    .venv/bin/python bench/relay_cpu.py [--events 20000] [--rounds 5]

One upstream chunk per event (as the upstream writes them at model pace), each after a trio
checkpoint (where a socket read would wait). What the socket-level benches add on top of this
is the stack's (httpx/h11 reading, quart/hypercorn/h11 writing, the two send/recv calls); what
this shows above the bare loop is the relay's own bookkeeping: the silence deadline, the
scan, the held preamble and commit, the channel hop between the request's task and the route's.
Thread CPU time (``time.thread_time``), the best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.client_manager import ClientSettings, Lease  # noqa: E402
from actors.messages import LeaseGrant  # noqa: E402
from actors.proxy_handler import CHUNK_BUFFER, ProxyHandler, _StreamRelay  # noqa: E402


def sse(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


def chunks(events: int) -> list[bytes]:
    out = [sse("response.created", {"response": {"id": "resp_1"}}),
           sse("response.in_progress", {"response": {"id": "resp_1"}}),
           sse("codex.rate_limits", {"rate_limits": {"primary": {"used_percent": 1.0,
                                                                  "window_minutes": 300}}})]
    out += [sse("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                               "content_index": 0, "delta": f"word{i} "})
            for i in range(events)]
    out.append(sse("response.completed", {"response": {"id": "resp_1", "usage": {}}}))
    return out


class FakeResponse:
    def __init__(self, data: list[bytes]) -> None:
        self._data = data

    async def aiter_bytes(self) -> Any:
        for chunk in self._data:
            await trio.lowlevel.checkpoint()  # where a socket read would wait
            yield chunk


async def drain(chunks_recv: trio.MemoryReceiveChannel[bytes]) -> int:
    """The route's side (service/surfaces.py sse_response): take what is queued, write once."""
    written = 0
    async with chunks_recv:
        async for chunk in chunks_recv:
            more = []
            while True:
                try:
                    more.append(chunks_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            written += len(b"".join((chunk, *more)) if more else chunk)
    return written


async def through_relay(data: list[bytes]) -> float:
    handler = ProxyHandler(store=None, clients=None, tokens=None)  # type: ignore[arg-type]
    handler._note_usage = lambda account_id, usage: None  # type: ignore[method-assign]
    lease = Lease(LeaseGrant(generation=1, client=httpx.AsyncClient(), path_dead=trio.Event()),
                  ClientSettings(), trio.open_memory_channel[Any](100)[0])
    out_send, out_recv = trio.open_memory_channel[bytes](CHUNK_BUFFER)
    started = time.thread_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, out_recv)
        with out_send:
            sink = _StreamRelay(handler, "acc_1", out_send, commit=lambda: None)
            await lease.pump(FakeResponse(data), sink)  # type: ignore[arg-type]
    return time.thread_time() - started


async def bare(data: list[bytes]) -> float:
    """The floor: the chunks handed from the reading loop to the writing loop in one task."""
    started = time.thread_time()
    written = 0
    async for chunk in FakeResponse(data).aiter_bytes():
        written += len(chunk)
    return time.thread_time() - started


async def main(args: argparse.Namespace) -> None:
    data = chunks(args.events)
    relay, floor = [], []
    for _ in range(args.rounds):
        relay.append(await through_relay(data))
        floor.append(await bare(data))
    per = len(data)
    print(f"relay CPU, no sockets: {per:,} chunks of one event each, best of {args.rounds}")
    print(f"  Lease.pump + _StreamRelay + channel + route loop: {min(relay) / per * 1e6:6.2f} us "
          "per event")
    print(f"  bare loop (read, hand on; one task):              {min(floor) / per * 1e6:6.2f} us "
          "per event")
    print(f"  the relay's own bookkeeping:                      "
          f"{(min(relay) - min(floor)) / per * 1e6:6.2f} us per event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args())
