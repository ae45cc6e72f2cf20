"""The floor of this stack: a bare quart-trio + hypercorn + httpx relay, no actors, no checks.

    .venv/bin/python bench/bare_relay.py --upstream http://127.0.0.1:PORT/backend-api

Serves ``POST /backend-api/codex/responses`` by streaming the client's request to the upstream
and its answer back, chunk by chunk, with the client's own headers (so the client brings a
valid token). ``bench/overhead.py --target bare`` runs it in place of the proxy: what the
proxy costs above this line is ours; what this costs is the stack's (see bench/README.md).
It prints ``listening on <url>`` like ``serve``, and answers ``GET /health``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

DROP = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive"})


def build_app(upstream: str) -> QuartTrio:
    app = QuartTrio(__name__)
    http = httpx.AsyncClient(base_url=upstream, timeout=60, trust_env=False)

    @app.get("/health")
    async def health() -> Response:
        return Response('{"status":"ok"}', content_type="application/json")

    @app.post("/backend-api/codex/responses")
    async def responses() -> Response:
        body = await request.get_data(cache=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        upstream_request = http.build_request("POST", "/codex/responses", content=body,
                                              headers=headers)
        response = await http.send(upstream_request, stream=True)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        relayed = Response(chunks(), status=response.status_code,
                           content_type=response.headers.get("content-type"))
        relayed.timeout = None
        return relayed

    return app


async def main(args: argparse.Namespace) -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, build_app(args.upstream), config)
        print(f"bare relay listening on {urls[0]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the upstream base URL")
    trio.run(main, parser.parse_args())
