"""The real Codex CLI as a test client: install it, give it a private home, run ``codex exec``.

Codex must only ever talk to loopback here. What it would reach on its own, observed on
0.169.0 with strace (DNS queries) and a loopback recorder:

- ``chatgpt.com/backend-api/ps/mcp`` (the built-in ``codex_apps`` MCP server, feature ``apps``);
- ``chatgpt.com/backend-api/wham/accounts/check`` and ``/wham/settings/user`` (workspace
  routing, with Codex's own login), which follow ``chatgpt_base_url``;
- ``ab.chatgpt.com`` (the default Statsig metrics exporter, ``otel.metrics_exporter``);
- ``auth.openai.com/oauth/token`` if it decided to refresh its own login.

``codex_config_toml`` turns the features off and points ``chatgpt_base_url`` and the token URLs
at a ``LoopbackSink``, which answers 404 and records what arrived. With that config strace
shows no DNS query at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

CODEX_PACKAGE = "@openai/codex"
CODEX_VERSION = "0.169.0"  # the one version these tests (and PROTOCOL.md) are written against

REPO_ROOT = Path(__file__).resolve().parents[2]
CODEX_CACHE_DIR = REPO_ROOT / ".cache" / f"codex-{CODEX_VERSION}"
NPM_INSTALL_TIMEOUT = 300.0
VERSION_CHECK_TIMEOUT = 30.0

# Text in Codex's stderr that means it tried to reach a host other than loopback: request
# errors name their URL, and with no DNS (CI) every foreign request fails and logs one.
FOREIGN_HOST_MARKERS = ("error sending request", "chatgpt.com", "auth.openai.com", "api.openai.com")


# --- installing -------------------------------------------------------------------------


def installed_codex_version(binary: Path) -> str | None:
    """The version ``binary --version`` prints (``codex-cli 0.169.0``), or None if it cannot run."""
    if not binary.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="codex-version-") as home:
        try:
            result = subprocess.run(
                [str(binary), "--version"],
                capture_output=True, text=True, timeout=VERSION_CHECK_TIMEOUT, check=False,
                env=_isolated_env(home=Path(home), codex_home=Path(home)),
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    words = result.stdout.split()
    return words[-1] if result.returncode == 0 and words else None


def ensure_codex_installed(prefix: Path = CODEX_CACHE_DIR) -> Path:
    """A ``codex`` binary of CODEX_VERSION, installed with npm into ``prefix`` if need be.

    Fails the calling test (never skips it) when npm is missing or the install does not
    produce the pinned version: CI must prove the real client works.
    """
    binary = prefix / "node_modules" / ".bin" / "codex"
    if installed_codex_version(binary) == CODEX_VERSION:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(
            f"npm is not on PATH: the e2e tests install {CODEX_PACKAGE}@{CODEX_VERSION} with it. "
            "Install Node.js with npm (Debian: apt-get install nodejs npm).",
            pytrace=False,
        )
    prefix.mkdir(parents=True, exist_ok=True)
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
               f"{CODEX_PACKAGE}@{CODEX_VERSION}"]
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=NPM_INSTALL_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` did not finish within {NPM_INSTALL_TIMEOUT:.0f} s",
                    pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` failed with exit code {result.returncode} after "
            f"{time.monotonic() - started:.1f} s:\n{_tail(result.stderr or result.stdout)}",
            pytrace=False,
        )
    version = installed_codex_version(binary)
    if version != CODEX_VERSION:
        pytest.fail(
            f"npm installed {CODEX_PACKAGE} into {prefix}, but {binary} reports version "
            f"{version!r}, not {CODEX_VERSION!r}",
            pytrace=False,
        )
    return binary


# --- a loopback stand-in for every host Codex must not reach -------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(slots=True, kw_only=True)
class LoopbackSink:
    """An HTTP listener on 127.0.0.1 that answers every request 404 and records its head.

    Codex's ``chatgpt_base_url`` and token URLs point here, so whatever Codex would have sent
    to ChatGPT's web API or the auth server stays on this machine and can be inspected.
    """

    head_limit: int = 64 * 1024
    read_timeout: float = 5.0
    requests: list[SinkRequest] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 port 0 until cancelled; reports the port. Cancel-safe."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)  # closes the listeners when cancelled

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(self.read_timeout):
                while b"\r\n\r\n" not in head and len(head) < self.head_limit:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    head += chunk
            if not head:
                return  # a connection that never said anything is not a request
            request_line, *header_lines = (
                head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n"))
            method, _, target = request_line.partition(" ")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append(SinkRequest(method=method, path=target.rsplit(" ", 1)[0],
                                             headers=headers))
            body = b'{"error":{"message":"loopback sink: this host is out of bounds in tests"}}'
            try:
                await stream.send_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n"
                    b"connection: close\r\n\r\n" + body
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client gave up first; what it sent is recorded already


# --- a private Codex home and one run -------------------------------------------------------


def codex_config_toml(*, proxy_url: str, websockets: bool, sink_url: str) -> str:
    """PROTOCOL.md's proxy config, plus the keys that keep Codex off every other host."""

    def quoted(text: str) -> str:
        return json.dumps(text)  # a JSON string of plain text is a valid TOML basic string

    return f"""\
# Keep Codex on loopback: no update check; ChatGPT web API calls go to the sink.
check_for_update_on_startup = false
chatgpt_base_url = {quoted(sink_url + "/backend-api/")}
model_provider = "lb"

[model_providers.lb]
name = "openai"
base_url = {quoted(proxy_url + "/backend-api/codex")}
wire_api = "responses"
supports_websockets = {"true" if websockets else "false"}
requires_openai_auth = true

# The ChatGPT apps MCP server and remote plugins would reach chatgpt.com.
[features]
apps = false
plugins = false
remote_plugin = false

[analytics]
enabled = false

# Metrics default to a Statsig exporter on ab.chatgpt.com.
[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class CodexDirs:
    home: Path
    codex_home: Path
    cwd: Path


def prepare_codex_dirs(
    root: Path, *, proxy_url: str, websockets: bool, auth: dict[str, Any], sink_url: str
) -> CodexDirs:
    """A HOME, a CODEX_HOME (config.toml, auth.json) and an empty working directory under root."""
    dirs = CodexDirs(home=root / "home", codex_home=root / "codex-home", cwd=root / "workdir")
    for directory in (dirs.home, dirs.codex_home, dirs.cwd):
        directory.mkdir(parents=True, exist_ok=True)
    (dirs.codex_home / "config.toml").write_text(
        codex_config_toml(proxy_url=proxy_url, websockets=websockets, sink_url=sink_url))
    auth_file = dirs.codex_home / "auth.json"
    auth_file.write_text(json.dumps(auth))
    auth_file.chmod(0o600)
    return dirs


def _isolated_env(*, home: Path, codex_home: Path, sink_url: str | None = None) -> dict[str, str]:
    # Built from nothing rather than copied, so no HTTP(S)_PROXY, OPENAI_API_KEY, CODEX_* or
    # RUST_LOG from the developer's shell can steer Codex elsewhere.
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "NO_COLOR": "1",
        "LANG": "C.UTF-8",
    }
    if sink_url is not None:
        env["CODEX_REFRESH_TOKEN_URL_OVERRIDE"] = sink_url + "/oauth/token"
        env["CODEX_REVOKE_TOKEN_URL_OVERRIDE"] = sink_url + "/oauth/revoke"
    return env


@dataclass(frozen=True, slots=True, kw_only=True)
class CodexRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        """Everything worth reading when an assertion about this run fails."""
        return (f"codex exec exited {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout ---\n{_tail(self.stdout)}\n--- stderr ---\n{_tail(self.stderr)}")

    def foreign_host_lines(self) -> list[str]:
        """Lines of stderr that show Codex trying to reach something other than loopback."""
        return [line for line in self.stderr.splitlines()
                if any(marker in line for marker in FOREIGN_HOST_MARKERS)]


async def run_codex_exec(
    binary: Path, dirs: CodexDirs, prompt: str, *, sink_url: str, exit_within: float = 90.0
) -> CodexRun:
    """Run ``codex exec --skip-git-repo-check PROMPT`` to the end and capture its output.

    Fails the test if Codex has not exited within ``exit_within`` seconds; cancelling kills it.
    """
    command = [str(binary), "exec", "--skip-git-repo-check", prompt]
    started = trio.current_time()
    try:
        with trio.fail_after(exit_within):
            result = await trio.run_process(
                command,
                stdin=b"",  # codex exec reads extra input from a non-tty stdin: give it EOF
                capture_stdout=True, capture_stderr=True, check=False,
                env=_isolated_env(home=dirs.home, codex_home=dirs.codex_home, sink_url=sink_url),
                cwd=dirs.cwd,
            )
    except trio.TooSlowError:
        pytest.fail(f"codex exec did not finish within {exit_within:.0f} s", pytrace=False)
    return CodexRun(
        returncode=result.returncode,
        stdout=result.stdout.decode(errors="replace"),
        stderr=result.stderr.decode(errors="replace"),
        seconds=trio.current_time() - started,
    )


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
