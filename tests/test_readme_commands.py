"""Every ``codex-lb-trio …`` command README.md shows runs, verbatim, against a temporary home.

So README and CLI cannot drift. Commands are collected from ``sh``/``bash``/``console``/``shell``
code blocks (each ``&&`` segment that starts with ``codex-lb-trio`` or a path ending in it) and
from inline code spans that start with ``codex-lb-trio``. Each runs through ``bash -c`` (so
``~`` expands), with:

- ``HOME`` a temporary directory holding ``.codex/auth.json`` (a fake account's Codex login)
  and ``.codex-lb-trio/config.toml`` (the data dir, ``CODEX_LB_TRIO_HOME``), whose config points
  the upstream and auth server at the fake upstream and the server at a free port;
- a working directory whose ``.venv`` is the running interpreter's environment, so the
  install line's ``.venv/bin/codex-lb-trio serve`` runs as written (the ``python3 -m venv`` and
  ``pip install`` segments before it are not run: the test runs inside that install).

How each kind is treated:

- ``serve``: started, must report ``listening on`` within 30 s; every ``status`` command runs
  against it; then SIGTERM, and it must exit 0.
- ``status``: only while a ``serve`` command runs (above); must print the server's accounts.
- ``accounts login`` (browser): ``BROWSER=true`` so nothing opens; the test follows the
  printed URL on the fake auth server and delivers the callback to the CLI's listener, as a
  browser would. If port 1455 (fixed by the OAuth client) is taken by something else on this
  machine the CLI says so; that command is then reported, not failed.
- ``accounts login --device``: the fake approves the code after one poll.
- anything else: runs to completion.

Every command must exit 0 without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from tests.fakes.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_LANGS = {"sh", "bash", "console", "shell"}
PROGRAM = re.compile(r"^(?:\S*/)?codex-lb-trio(?:\s|$)")
LISTENING = re.compile(r"listening on (http://\S+)")
URL_LINE = re.compile(r"^\s+(http://\S+/oauth/authorize\S+)\s*$", re.M)
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ReadmeCommand:
    text: str  # exactly as README shows it

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)[1:]

    @property
    def kind(self) -> str:
        words = [w for w in self.words if not w.startswith("--config") and not w.startswith("~")]
        if "serve" in words:
            return "serve"
        if "status" in words:
            return "status"
        if words[:2] == ["accounts", "login"]:
            return "login-device" if "--device" in words else "login-browser"
        return "plain"


def readme_commands(text: str) -> list[ReadmeCommand]:
    """The commands README shows, in order, without repeats."""
    found: list[str] = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in SHELL_LANGS:
            continue
        for line in block.splitlines():
            for segment in line.split("&&"):
                if PROGRAM.match(segment.strip()):
                    found.append(segment.strip())
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if PROGRAM.match(span)]
    return [ReadmeCommand(text) for text in dict.fromkeys(found)]


def test_readme_shows_the_commands_a_user_needs():
    commands = readme_commands(README.read_text())
    texts = [c.text for c in commands]
    assert "codex-lb-trio serve --config ~/.codex-lb-trio/config.toml" in texts
    assert "codex-lb-trio accounts list --config ~/.codex-lb-trio/config.toml" in texts
    assert "codex-lb-trio status --config ~/.codex-lb-trio/config.toml" in texts
    assert {c.kind for c in commands} >= {"serve", "status", "login-browser", "login-device",
                                          "plain"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(slots=True)
class Sandbox:
    home: Path
    cwd: Path
    env: dict[str, str]

    async def run(self, command: ReadmeCommand,
                  *, stdin: bytes = b"") -> subprocess.CompletedProcess:
        with trio.fail_after(COMMAND_TIMEOUT):
            return await trio.run_process(["bash", "-c", command.text], env=self.env, cwd=self.cwd,
                                          stdin=stdin, capture_stdout=True, capture_stderr=True,
                                          check=False)


def make_sandbox(tmp_path: Path, fake: FakeUpstream) -> Sandbox:
    home = tmp_path / "home"
    data = home / ".codex-lb-trio"
    data.mkdir(parents=True)
    (home / ".codex").mkdir()
    cli_login = fake.add_account(email="readme@example.com", chatgpt_account_id="acct-readme")
    (home / ".codex" / "auth.json").write_text(json.dumps(fake.auth_json(cli_login)))
    (data / "config.toml").write_text(
        f"[server]\nport = {_free_port()}\n"
        f'[upstream]\nbase_url = "{fake.base_url}"\nauth_base_url = "{fake.auth_base_url}"\n'
        "[client]\nshutdown_grace = 1.0\n"
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_LB_TRIO")}
    env.update({
        "HOME": str(home), "CODEX_LB_TRIO_HOME": str(data),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}",
        "PYTHONUNBUFFERED": "1", "BROWSER": "true",
    })
    return Sandbox(home=home, cwd=cwd, env=env)


def _ok(command: ReadmeCommand, result: subprocess.CompletedProcess) -> None:
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"`{command.text}` exited {result.returncode}:\n{out}\n{err}"
    assert "Traceback" not in out + err, f"`{command.text}`:\n{out}\n{err}"


async def _browser_login(sandbox: Sandbox, command: ReadmeCommand, fake: FakeUpstream) -> str:
    """Run the browser login, acting as the browser. Returns a note if the port was taken."""
    fake.next_login = fake.add_account(email="browser@example.com",
                                       chatgpt_account_id="acct-browser")
    process = await trio.lowlevel.open_process(
        ["bash", "-c", command.text], env=sandbox.env, cwd=sandbox.cwd,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            assert process.stdout is not None
            assert process.stderr is not None
            while (match := URL_LINE.search(out.decode(errors="replace"))) is None:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    break
                out += chunk
            if match is None:
                err = (await process.stderr.receive_some(65536)).decode(errors="replace")
                await process.wait()
                if "port 1455 is in use" in err:
                    return f"`{command.text}`: port 1455 is taken on this machine; not run"
                raise AssertionError(f"`{command.text}` printed no login URL:\n{out!r}\n{err}")
            async with httpx.AsyncClient(trust_env=False) as http:
                authorized = await http.get(match.group(1))
                assert authorized.status_code == 302, authorized.text
                callback = authorized.headers["location"].replace("//localhost:", "//127.0.0.1:")
                assert (await http.get(callback)).status_code == 200
            rest = b""
            while chunk := await process.stdout.receive_some(65536):
                rest += chunk
            err = b""
            while chunk := await process.stderr.receive_some(65536):
                err += chunk
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
    _ok(command, subprocess.CompletedProcess(command.text, code, out + rest, err))
    assert b"account" in rest
    return ""


async def _serve_and_ask(sandbox: Sandbox, serve: ReadmeCommand,
                         statuses: list[ReadmeCommand]) -> None:
    process = await trio.lowlevel.open_process(
        ["bash", "-c", serve.text], env=sandbox.env, cwd=sandbox.cwd, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = b""
    try:
        assert process.stderr is not None
        with trio.fail_after(30):
            while (match := LISTENING.search(log.decode(errors="replace"))) is None:
                chunk = await process.stderr.receive_some(65536)
                assert chunk, f"`{serve.text}` ended before listening:\n{log.decode()}"
                log += chunk
        async with trio.open_nursery() as nursery:
            async def drain() -> None:
                nonlocal log
                while chunk := await process.stderr.receive_some(65536):
                    log += chunk

            nursery.start_soon(drain)
            for status in statuses:
                result = await sandbox.run(status)
                _ok(status, result)
                assert f"codex-lb-trio at {match.group(1)}" in result.stdout.decode()
                assert "readme@example.com" in result.stdout.decode()
            os.killpg(process.pid, signal.SIGTERM)
            with trio.fail_after(30):
                code = await process.wait()
        assert code == 0, f"`{serve.text}` exited {code} after SIGTERM:\n{log.decode()}"
        assert b"Traceback" not in log, log.decode()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(5, shield=True):
                await process.wait()


async def test_every_readme_command_runs_verbatim(tmp_path, fake_upstream):
    commands = readme_commands(README.read_text())
    sandbox = make_sandbox(tmp_path, fake_upstream)
    fake_upstream.device_auto_approve_after = 1
    notes: list[str] = []
    with trio.fail_after(240):
        for command in commands:
            if command.kind == "plain":
                _ok(command, await sandbox.run(command))
            elif command.kind == "login-device":
                fake_upstream.next_login = fake_upstream.add_account(
                    email="device@example.com", chatgpt_account_id="acct-device")
                result = await sandbox.run(command)
                _ok(command, result)
                assert b"device@example.com" in result.stdout
            elif command.kind == "login-browser":
                if note := await _browser_login(sandbox, command, fake_upstream):
                    notes.append(note)
        statuses = [c for c in commands if c.kind == "status"]
        for serve in (c for c in commands if c.kind == "serve"):
            await _serve_and_ask(sandbox, serve, statuses)
    ran = {c.text for c in commands}
    assert "codex-lb-trio accounts import" in ran  # the import came first: status saw its account
    for note in notes:
        print(note)
