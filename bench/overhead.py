"""What the proxy adds to one streaming turn: time to first event and total, through vs. direct.

    .venv/bin/python bench/overhead.py [--requests 200] [--body-kb 40] [--in-process]
                                       [--chaos] [--profile cprofile|pyinstrument]

The fake upstream runs in this process. By default the proxy is a real subprocess
(``python -m service.cli serve --port 0`` with a temp ``CODEX_LB_TRIO_HOME``), as a user runs
it: its CPU work then happens on its own core and not in this process's trio loop.
``--in-process`` runs ``service.server.serve`` in this trio run instead (what tests/stack.py
does). ``--chaos`` puts the chaos TCP proxy (pass mode) between the proxy and the fake.

Direct and proxied requests alternate (ABBA order) on two kept-alive clients, so drift in the
machine's speed hits both paths alike; each reports against the direct path of the same run.
``--profile cprofile`` runs the proxy subprocess under cProfile on its CPU clock and prints
self time by package; ``--profile pyinstrument`` needs pyinstrument importable by the
project's interpreter (e.g. ``pip install --target /tmp/pi pyinstrument`` and
``PYTHONPATH=/tmp/pi``). Profiled runs are several times slower: read their shares, not
their milliseconds. "proxy CPU per proxied request" comes from /proc/<pid>/stat.

The module also holds the machinery bench/concurrency.py shares: the proxy subprocess,
account import, one timed stream, percentiles.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.upstream import FakeAccount, FakeUpstream, open_fake_upstream  # noqa: E402

CODEX_PATH = "/backend-api/codex/responses"
DIRECT_PATH = "/backend-api/codex/responses"  # the fake serves the real upstream's path
PREAMBLE = (b'"type": "response.created"', b'"type": "response.in_progress"')
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


# --- a Codex-like request -------------------------------------------------------------------


def codex_body(size_kb: float, *, cache_key: str = "bench-cache") -> dict[str, Any]:
    """A first-turn body shaped like Codex CLI's: long instructions, tools, a few input items.

    Codex 0.169 sends about 40 KB on a first turn (PROTOCOL.md); ``size_kb`` sets the size
    (the tools and input alone take about 3 KiB, so smaller values give that).
    """
    tools = [
        {"type": "function", "name": name, "description": f"{name} tool. " * 20, "strict": False,
         "parameters": {"type": "object", "properties": {
             "command": {"type": "array", "items": {"type": "string"}},
             "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}},
             "required": ["command"], "additionalProperties": False}}
        for name in ("shell", "apply_patch", "update_plan", "view_image")
    ]
    body: dict[str, Any] = {
        "model": "gpt-5-codex",
        "instructions": "",
        "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context>\n  <cwd>/work</cwd>\n"
                 "  <approval_policy>never</approval_policy>\n</environment_context>"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Summarise the repository layout."}]},
        ],
        "tools": tools, "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False, "stream": True, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": cache_key,
    }
    filler = "You are Codex, a coding agent. Follow the repository's conventions. "
    missing = max(0, int(size_kb * 1024) - len(json.dumps(body)))
    body["instructions"] = (filler * (missing // len(filler) + 1))[:missing]
    return body


def codex_headers(session: str) -> dict[str, str]:
    """What Codex CLI sends to the proxy (its own login is replaced by the pool's)."""
    return {
        "authorization": "Bearer codex-own-login", "chatgpt-account-id": "codex-own",
        "originator": "codex_exec", "version": "0.169.0", "session-id": session,
        "accept": "text/event-stream", "content-type": "application/json",
        "user-agent": "codex_exec/0.169.0 (bench)",
    }


def direct_headers(account: FakeAccount, session: str) -> dict[str, str]:
    """The same request as the proxy would send it upstream, with the account's own token."""
    return {**codex_headers(session), "authorization": f"Bearer {account.access_token}",
            "chatgpt-account-id": account.chatgpt_account_id}


# --- one timed stream -----------------------------------------------------------------------


@dataclass(slots=True)
class StreamTiming:
    """One stream as the client saw it; times in seconds from just before the request."""

    status: int = 0
    first_event: float = math.nan   # first ``data:`` line
    first_content: float = math.nan  # first event past response.created/in_progress
    total: float = math.nan
    events: int = 0
    completed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.completed


async def timed_stream(
    client: httpx.AsyncClient, path: str, *, body: bytes, headers: dict[str, str]
) -> StreamTiming:
    """POST one streaming turn and time it; never raises for a failed stream (see ``error``).

    Reads raw bytes and splits lines itself so that both paths pay the same, small, client cost.
    """
    timing = StreamTiming()
    started = time.perf_counter()
    try:
        async with client.stream("POST", path, content=body, headers=headers) as response:
            timing.status = response.status_code
            pending = b""
            async for chunk in response.aiter_raw():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    now = time.perf_counter() - started
                    timing.events += 1
                    if timing.events == 1:
                        timing.first_event = now
                    if math.isnan(timing.first_content) and not any(p in line for p in PREAMBLE):
                        timing.first_content = now
                    if b'"type": "response.completed"' in line:
                        timing.completed = True
            timing.total = time.perf_counter() - started
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}"
            elif not timing.completed:
                timing.error = "stream ended without response.completed"
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


# --- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of the non-NaN values."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    rank = max(1, math.ceil(fraction * len(clean)))
    return clean[rank - 1]


def ms(seconds: float) -> str:
    return "   n/a" if math.isnan(seconds) else f"{seconds * 1000:7.2f}"


# --- the proxy ------------------------------------------------------------------------------


@dataclass
class ProxyProcess:
    """A running ``codex-lb-trio serve`` child process and what it printed."""

    process: trio.Process
    url: str
    home: Path
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time the proxy process has used so far (/proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak resident set) and VmRSS from /proc/<pid>/status, in KiB."""
        found: dict[str, int] = {}
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                found[name] = int(value.split()[0])
        return found


def write_proxy_config(home: Path, fake: FakeUpstream, *, upstream_port: int | None = None,
                       extra: str = "") -> Path:
    """A config.toml pointing the proxy's upstream and auth server at the fake."""
    port = upstream_port if upstream_port is not None else fake.port
    path = home / "config.toml"
    path.write_text(
        "[server]\nlog_level = \"info\"\n\n"
        f"[upstream]\nbase_url = \"{fake.base_url_for(port)}\"\n"
        f"auth_base_url = \"{fake.auth_base_url_for(port)}\"\n" + extra
    )
    return path


# cProfile on the proxy's CPU clock: wall time in a trio loop is mostly waiting (and, with
# two processes on two cores, being preempted inside send()), which says nothing about cost.
CPU_PROFILE = """
import cProfile, sys, time
from service.cli import main
profile = cProfile.Profile(time.thread_time)
try:
    profile.runcall(main, sys.argv[1:])
finally:
    profile.dump_stats({out!r})
"""


def proxy_command(config: Path, profile: str | None, profile_out: Path) -> list[str]:
    serve = ["-m", "service.cli", "--config", str(config), "serve", "--port", "0"]
    if profile == "cprofile":
        code = CPU_PROFILE.format(out=str(profile_out))
        return [sys.executable, "-c", code, *serve[2:]]
    if profile == "pyinstrument":
        return [sys.executable, "-m", "pyinstrument", "--renderer", "text", "--outfile",
                str(profile_out), *serve]
    return [sys.executable, *serve]


@asynccontextmanager
async def run_proxy_process(
    fake: FakeUpstream, *, upstream_port: int | None = None, profile: str | None = None,
    profile_out: Path | None = None,
) -> AsyncIterator[ProxyProcess]:
    """Start the proxy as a subprocess on port 0; SIGTERM it (then wait) on the way out."""
    with tempfile.TemporaryDirectory(prefix="codex-lb-bench-") as tmp:
        home = Path(tmp)
        config = write_proxy_config(home, fake, upstream_port=upstream_port)
        env = {**os.environ, "CODEX_LB_TRIO_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("CODEX_LB_TRIO_CONFIG", None)
        command = proxy_command(config, profile, profile_out or home / "profile.out")
        process = await trio.lowlevel.open_process(
            command, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        listening: trio.MemorySendChannel[str]
        listening, listening_recv = trio.open_memory_channel[str](1)
        log: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_stderr, process, log, listening)
                try:
                    with trio.fail_after(START_TIMEOUT):
                        url = await listening_recv.receive()
                except (trio.TooSlowError, trio.EndOfChannel):
                    raise RuntimeError("the proxy did not start:\n" + "".join(log)) from None
                proxy = ProxyProcess(process=process, url=url, home=home, log=log)
                try:
                    yield proxy
                finally:
                    await _stop(process)
        finally:
            await _stop(process)


async def _read_stderr(process: trio.Process, log: list[str],
                       listening: trio.MemorySendChannel[str]) -> None:
    # Keep draining the pipe for the child's whole life, or its logging would block.
    assert process.stderr is not None
    with listening:
        pending = b""
        async for chunk in process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                log.append(line + "\n")
                marker = "listening on "
                if marker in line:
                    listening.send_nowait(line.split(marker, 1)[1].split()[0])


async def _stop(process: trio.Process) -> None:
    """SIGTERM (the proxy drains and exits), then SIGKILL if it has not gone within the grace."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT, shield=True):
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


@asynccontextmanager
async def run_proxy_in_process(
    fake: FakeUpstream, *, upstream_port: int | None = None
) -> AsyncIterator[str]:
    """``service.server.serve`` in this trio run, with a tmp SQLite store; yields its URL."""
    from service.config import Config, with_overrides
    from service.server import serve
    from service.store import SQLiteAccountStore

    port = upstream_port if upstream_port is not None else fake.port
    config = with_overrides(
        Config(), server={"port": 0},
        upstream={"base_url": fake.base_url_for(port),
                  "auth_base_url": fake.auth_base_url_for(port)},
    )
    with tempfile.TemporaryDirectory(prefix="codex-lb-bench-") as tmp:
        store = await SQLiteAccountStore.open(Path(tmp))
        shutdown = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(partial(
                    serve, config, shutdown=shutdown, handle_signals=False, store=store))
                try:
                    yield urls[0]
                finally:
                    shutdown.set()
        finally:
            await store.aclose()


async def import_accounts(proxy_url: str, fake: FakeUpstream, count: int) -> list[FakeAccount]:
    """Create ``count`` fake accounts and import each through ``POST /api/accounts/import``."""
    accounts = []
    async with httpx.AsyncClient(base_url=proxy_url, timeout=30, trust_env=False) as admin:
        for index in range(count):
            account = fake.add_account(email=f"bench{index}@example.com",
                                       chatgpt_account_id=f"acct-bench-{index}", plan="pro")
            response = await admin.post("/api/accounts/import", json=fake.auth_json(account))
            if response.status_code not in (200, 201):
                raise RuntimeError(f"account import failed: {response.status_code} {response.text}")
            accounts.append(account)
    return accounts


@asynccontextmanager
async def open_chaos(fake: FakeUpstream) -> AsyncIterator[int]:
    """A pass-mode chaos proxy in front of the fake; yields its port."""
    from tests.fakes.chaos import ChaosProxy

    chaos = ChaosProxy(target_host="127.0.0.1", target_port=fake.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(chaos.serve)
        try:
            yield chaos.port
        finally:
            nursery.cancel_scope.cancel()


def client(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False, **kwargs)


# --- the overhead benchmark ------------------------------------------------------------------


@dataclass
class Samples:
    direct: list[StreamTiming] = field(default_factory=list)
    proxy: list[StreamTiming] = field(default_factory=list)


async def alternate(
    count: int, direct_call: Callable[[], Any], proxy_call: Callable[[], Any], samples: Samples
) -> None:
    """``count`` pairs in ABBA order: direct-proxy, proxy-direct, ..."""
    for index in range(count):
        order = ("direct", "proxy") if index % 2 == 0 else ("proxy", "direct")
        for which in order:
            call = direct_call if which == "direct" else proxy_call
            getattr(samples, which).append(await call())


def report(samples: Samples, *, title: str) -> None:
    rows = []
    for label, attr in (("time to first event", "first_event"), ("total", "total")):
        for path in ("direct", "proxy"):
            values = [getattr(t, attr) for t in getattr(samples, path) if t.ok]
            rows.append((label, path, values))
    print(title)
    print(f"  {'':22}{'path':8}{'median ms':>11}{'p95 ms':>9}{'min ms':>9}{'mean ms':>9}")
    for label, path, values in rows:
        mean = statistics.fmean(values) if values else math.nan
        print(f"  {label:22}{path:8}{ms(percentile(values, 0.5)):>11}"
              f"{ms(percentile(values, 0.95)):>9}{ms(min(values, default=math.nan)):>9}"
              f"{ms(mean):>9}")
    print(f"  {'added by the proxy':22}{'':8}{'median ms':>11}{'p95 ms':>9}{'ratio':>9}")
    for label, attr in (("time to first event", "first_event"), ("total", "total")):
        direct = [getattr(t, attr) for t in samples.direct if t.ok]
        proxied = [getattr(t, attr) for t in samples.proxy if t.ok]
        d50, p50 = percentile(direct, 0.5), percentile(proxied, 0.5)
        d95, p95 = percentile(direct, 0.95), percentile(proxied, 0.95)
        print(f"  {label:22}{'':8}{ms(p50 - d50):>11}{ms(p95 - d95):>9}{p50 / d50:>8.2f}x")
    errors = [t.error for t in samples.direct + samples.proxy if not t.ok]
    print(f"  errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    added = (percentile([t.first_event for t in samples.proxy if t.ok], 0.5)
             - percentile([t.first_event for t in samples.direct if t.ok], 0.5))
    verdict = "met" if added <= 0.002 else "NOT met"
    print(f"  target: added median time to first event <= 2 ms: {verdict} ({added * 1000:.2f} ms)")


async def main(args: argparse.Namespace) -> None:
    profile_out: Path | None = args.profile_out if args.profile else None
    async with open_fake_upstream() as fake:
        fake.event_delay = 0.0
        async with _upstream_port(fake, args.chaos) as upstream_port:
            if args.in_process:
                async with run_proxy_in_process(fake, upstream_port=upstream_port) as url:
                    await _measure(args, fake, url, "in-process (service.server.serve)")
            else:
                async with run_proxy_process(fake, upstream_port=upstream_port,
                                             profile=args.profile,
                                             profile_out=profile_out) as proxy:
                    kind = "subprocess (python -m service.cli serve)"
                    if args.profile:
                        kind += f" under {args.profile}"
                    await _measure(args, fake, proxy.url, kind, proxy=proxy)
                    rss = proxy.memory_kib()
                    print(f"  proxy memory: VmHWM {rss['VmHWM'] / 1024:.1f} MiB, "
                          f"VmRSS {rss['VmRSS'] / 1024:.1f} MiB")
    if profile_out is not None:
        _print_profile(args.profile, profile_out)


@asynccontextmanager
async def _upstream_port(fake: FakeUpstream, chaos: bool) -> AsyncIterator[int]:
    if not chaos:
        yield fake.port
        return
    async with open_chaos(fake) as port:
        yield port


async def _measure(args: argparse.Namespace, fake: FakeUpstream, proxy_url: str, kind: str,
                   *, proxy: ProxyProcess | None = None) -> None:
    (account,) = await import_accounts(proxy_url, fake, 1)
    body = json.dumps(codex_body(args.body_kb)).encode()
    session = "bench-overhead"
    async with client(fake.base_url.removesuffix("/backend-api")) as direct_http, \
            client(proxy_url) as proxy_http:

        async def direct() -> StreamTiming:
            return await timed_stream(direct_http, DIRECT_PATH, body=body,
                                      headers=direct_headers(account, session))

        async def proxied() -> StreamTiming:
            return await timed_stream(proxy_http, CODEX_PATH, body=body,
                                      headers=codex_headers(session))

        await alternate(args.warmup, direct, proxied, Samples())
        samples = Samples()
        cpu_before = proxy.cpu_seconds() if proxy is not None else None
        started = time.perf_counter()
        await alternate(args.requests, direct, proxied, samples)
        elapsed = time.perf_counter() - started
        cpu_after = proxy.cpu_seconds() if proxy is not None else None
    events = samples.proxy[0].events if samples.proxy else 0
    upstream = "chaos proxy -> fake" if args.chaos else "fake directly"
    report(samples, title=(
        f"overhead: {args.requests} sequential streams per path (ABBA), {events} events each, "
        f"body {len(body) / 1024:.1f} KiB, {elapsed:.1f} s\n"
        f"  proxy: {kind}; upstream: {upstream}"))
    if cpu_before is not None and cpu_after is not None:
        user, system = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
        print(f"  proxy CPU per proxied request: {user / args.requests * 1000:.2f} ms user + "
              f"{system / args.requests * 1000:.2f} ms system")


def _print_profile(kind: str, path: Path) -> None:
    if not path.exists():
        print(f"no profile written at {path}")
        return
    if kind == "pyinstrument":
        print(path.read_text()[:12000])
        return
    import pstats

    stats = pstats.Stats(str(path))
    print(f"\nproxy CPU profile ({path}): self time by package")
    for share, calls, name in _self_time_by_package(stats)[:15]:
        print(f"  {share * 100:5.1f}%  {calls:>10,} calls  {name}")
    print("top 20 functions by self time:")
    stats.sort_stats("tottime").print_stats(20)


def _self_time_by_package(stats: Any) -> list[tuple[float, int, str]]:
    """Self (not cumulative) time per package: coroutine cumulative times mislead in a loop."""
    import re

    self_time: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for (filename, _line, function), (_cc, count, tottime, _ct, _callers) in stats.stats.items():
        site = re.search(r"site-packages/([^/.]+)", filename)
        ours = re.search(r"/(actors|service)/(\w+)\.py$", filename)
        stdlib = re.search(r"python3\.\d+/(\w+)", filename)
        if site:
            name = site.group(1)
        elif ours:
            name = f"{ours.group(1)}/{ours.group(2)}"
        elif filename == "~":
            name = f"builtin {function.strip('<>')[:40]}"
        elif stdlib:
            name = f"stdlib {stdlib.group(1)}"
        else:
            name = filename
        self_time[name] += tottime
        calls[name] += count
    total = sum(self_time.values()) or 1.0
    return [(t / total, calls[n], n) for n, t in self_time.most_common()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests per path")
    parser.add_argument("--body-kb", type=float, default=40.0,
                        help="request body size in KiB (Codex sends ~40 on a first turn)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the proxy in this trio run instead of a subprocess")
    parser.add_argument("--chaos", action="store_true",
                        help="put the chaos TCP proxy (pass mode) in front of the fake")
    parser.add_argument("--profile", choices=("cprofile", "pyinstrument"),
                        help="profile the proxy subprocess and print the result")
    parser.add_argument("--profile-out", default="/tmp/codex-lb-overhead.prof",
                        help="where the profile is written")
    args = parser.parse_args(argv)
    args.profile_out = Path(args.profile_out).resolve()
    if args.profile and args.in_process:
        parser.error("--profile profiles the proxy subprocess; drop --in-process")
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
