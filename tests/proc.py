"""Run `codex-lb-trio serve` as a real subprocess and find the port it bound."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """A `codex-lb-trio serve` child; its stderr is collected in ``self.log``."""

    def __init__(self, home: Path, *args: str, config: Path | None = None, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env["CODEX_LB_TRIO_HOME"] = str(home)
        full_env.pop("CODEX_LB_TRIO_CONFIG", None)
        full_env.update(env or {})
        command = [sys.executable, "-m", "service.cli"]
        if config is not None:
            command += ["--config", str(config)]
        command += ["serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command,
            env=full_env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._found = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._found.set()
        self._found.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_listening(self, timeout: float = 30.0) -> str:
        if not self._found.wait(timeout) or self.url is None:
            self.kill()
            raise AssertionError(f"server did not start:\n{self.log}")
        return self.url

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        self.kill()  # closes the pipe
        return code

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
