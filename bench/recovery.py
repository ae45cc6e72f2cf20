"""Time to recover after a network flip, and the worst request latency, through vs. direct.

    .venv/bin/python bench/recovery.py [--turns 8] [--no-netns]

Two flips, each measured through the proxy and on the direct path in the same run:

* **chaos black-hole** (in this process, the chaos TCP proxy's ``blackhole_existing``): the
  pooled keep-alive connection goes dead while the kernel still acknowledges, the way a
  network flip looks to a socket that cannot tell. Then ``--turns`` sequential streamed
  turns. The direct client is a plain httpx client with a 15 s read timeout (the proxy's
  header timeout) that retries a failed turn once, as a careful client would.
* **real route flip** (root and ``ip netns`` only, see tests/test_netns.py): two network
  namespaces, the proxy-side address of path A deleted at t=5 s and the route moved to
  path B, under a conversation of streamed requests every 250 ms plus one long stream and
  one request waiting for headers. The direct path runs the same conversation straight at
  the fake upstream with a 15 s timeout.

"time to recover" is from the flip until the last request that the flip hit (in flight at
the flip or issued within 1 s after it) has ended; "worst" is the slowest request.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.chaos import ChaosProxy  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402
from tests.stack import CODEX_BODY, open_stack  # noqa: E402

HEADER_TIMEOUT = 15.0
PATH = "/backend-api/codex/responses"


async def turn(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[bool, str]:
    try:
        async with http.stream("POST", url, json=CODEX_BODY, headers=headers) as response:
            text = (await response.aread()).decode()
            return response.status_code == 200 and "response.completed" in text, \
                f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        return False, type(exc).__name__


async def chaos_flip(turns: int, *, proxied: bool) -> dict[str, Any]:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        chaos = ChaosProxy(target_port=fake.port)
        await nursery.start(chaos.serve)
        with tempfile.TemporaryDirectory() as tmp:
            if proxied:
                async with open_stack(Path(tmp), fake, chaos,
                                      upstream={"header_timeout": HEADER_TIMEOUT}) as stack:
                    result = await _flip_turns(stack.url, {"session-id": "bench"}, chaos, turns,
                                               retry=False)
                    stats = await stack.engine.clients.stats()
                    result["rotations"] = sum(stats.rotations.values())
                    result["hedges"] = dict(stats.hedges)
            else:
                account = fake.add_account(email="d@example.com", chatgpt_account_id="acct-d")
                headers = {"authorization": f"Bearer {account.access_token}",
                           "chatgpt-account-id": account.chatgpt_account_id, "session-id": "bench"}
                base = f"http://127.0.0.1:{chaos.port}"
                result = await _flip_turns(base, headers, chaos, turns, retry=True)
        nursery.cancel_scope.cancel()
    return result


async def _flip_turns(base: str, headers: dict[str, str], chaos: ChaosProxy, turns: int, *,
                      retry: bool) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=HEADER_TIMEOUT, trust_env=False) as http:
        for _ in range(2):  # pool a keep-alive connection
            ok, why = await turn(http, PATH, headers)
            assert ok, why
        chaos.blackhole_existing()
        flipped = trio.current_time()
        latencies: list[float] = []
        failures = 0
        recovered = math.nan
        for _ in range(turns):
            started = trio.current_time()
            ok, _ = await turn(http, PATH, headers)
            if not ok:
                failures += 1
                if retry:
                    ok, _ = await turn(http, PATH, headers)
            latencies.append(trio.current_time() - started)
            if ok and math.isnan(recovered):
                recovered = trio.current_time() - flipped
    return {"recover_s": recovered, "worst_s": max(latencies), "failures": failures}


def netns_flip(*, proxied: bool) -> dict[str, Any] | str:
    """Run tests/test_netns.py's topology and driver once; a string says why it could not."""
    from tests import test_netns as netns

    reason = netns.netns_unavailable()
    if reason is not None:
        return reason
    topology = netns.Topology()
    children: list[netns.Child] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            topology.build()
            fake = netns.Child(topology.in_upstream(sys.executable, "-m", "tests.test_netns",
                                                    "fake", netns.SERVICE))
            children.append(fake)
            import re

            started = json.loads(fake.expect(re.compile(r"^(\{.*\})$"), "out").group(1))
            port = started["port"]
            fake_url = f"http://{netns.SERVICE}:{port}"
            headers = {}
            if proxied:
                url = _start_netns_proxy(topology, children, tmp, started)
            else:
                url = fake_url
                tokens = started["auth"]["tokens"]
                headers = {"authorization": f"Bearer {tokens['access_token']}",
                           "chatgpt-account-id": tokens["account_id"]}
            driver = subprocess.run(
                topology.in_proxy(sys.executable, "-m", "tests.test_netns", "drive", url, fake_url,
                                  json.dumps(topology.flip_commands()), json.dumps(headers),
                                  str(HEADER_TIMEOUT)),
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )
            if driver.returncode != 0:
                return f"driver failed: {driver.stderr[-500:]}"
            summary: dict[str, Any] = json.loads(driver.stdout.strip().splitlines()[-1])["summary"]
            return summary
        finally:
            for child in children:
                child.stop()
            topology.destroy()


def _start_netns_proxy(topology: Any, children: list[Any], tmp: Path, started: dict[str, Any]) -> str:
    from tests import test_netns as netns

    port = started["port"]
    auth_file = tmp / "auth.json"
    auth_file.write_text(json.dumps(started["auth"]))
    config = tmp / "config.toml"
    config.write_text(
        f'[upstream]\nbase_url = "http://{netns.SERVICE}:{port}/backend-api"\n'
        f'auth_base_url = "http://{netns.SERVICE}:{port}"\n'
        "[refresh]\nmodels_interval = 3600.0\nusage_interval = 3600.0\n"
    )
    env = {"CODEX_LB_TRIO_HOME": str(tmp / "home")}
    import os

    subprocess.run(topology.in_proxy(sys.executable, "-m", "service.cli", "--config", str(config),
                                     "accounts", "import", str(auth_file)),
                   cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, timeout=60)
    proxy = netns.Child(topology.in_proxy(sys.executable, "-m", "service.cli", "--config",
                                          str(config), "serve", "--port", "0"), env=env)
    children.append(proxy)
    return proxy.expect(netns.LISTENING, "err").group(1)


def show(title: str, proxy: dict[str, Any] | str, direct: dict[str, Any] | str) -> None:
    print(f"\n{title}")
    if isinstance(proxy, str) or isinstance(direct, str):
        print(f"  skipped: {proxy if isinstance(proxy, str) else direct}")
        return
    for key in ("recover_s", "worst_s", "worst_latency_s", "failures", "failed", "rotations",
                "hedges", "waiting_ok", "stream_ended_after_flip_s"):
        if key in proxy or key in direct:
            ratio = ""
            p, d = proxy.get(key), direct.get(key)
            if isinstance(p, float) and isinstance(d, float) and p > 0:
                ratio = f"   direct/proxy {d / p:.1f}x"
            print(f"  {key:28} proxy {_fmt(p):>12}   direct {_fmt(d):>12}{ratio}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--no-netns", action="store_true", help="skip the real route flip")
    args = parser.parse_args()
    proxy = trio.run(lambda: chaos_flip(args.turns, proxied=True))
    direct = trio.run(lambda: chaos_flip(args.turns, proxied=False))
    show("chaos black-hole flip (pooled connection dead, kernel still acknowledging)", proxy, direct)
    if not args.no_netns:
        show("real route flip in network namespaces (address deleted, route via path B)",
             netns_flip(proxied=True), netns_flip(proxied=False))


if __name__ == "__main__":
    main()
