"""The accounts CLI and crash safety, with the real program as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from tests.proc import ServerProcess
from tests.stack import CODEX_BODY

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, fake_port: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        "[upstream]\n"
        f'base_url = "http://127.0.0.1:{fake_port}/backend-api"\n'
        f'auth_base_url = "http://127.0.0.1:{fake_port}"\n'
        "[client]\nshutdown_grace = 1.0\n"
    )
    return config


async def cli(home: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli"]
    if config is not None:
        command += ["--config", str(config)]
    env = {**os.environ, "CODEX_LB_TRIO_HOME": str(home)}
    env.pop("CODEX_LB_TRIO_CONFIG", None)
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT))


def table_rows(home: Path) -> int:
    db = home / "store.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from accounts").fetchone()[0]


async def test_accounts_cli_import_list_pause_remove(tmp_path, fake_upstream):
    with trio.fail_after(120):
        home = tmp_path / "home"
        acct = fake_upstream.add_account(email="cli@example.com", chatgpt_account_id="acct-cli", plan="pro")
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps(fake_upstream.auth_json(acct)))

        result = await cli(home, "accounts", "import", str(auth))
        assert result.returncode == 0, result.stderr
        assert "added account acc_" in result.stdout
        assert "refresh token" in result.stderr  # the shared-token warning
        account_id = result.stdout.split()[2]

        again = await cli(home, "accounts", "import", str(auth))
        assert "updated account " + account_id in again.stdout
        assert table_rows(home) == 1

        listing = await cli(home, "accounts", "list")
        assert account_id in listing.stdout and "cli@example.com" in listing.stdout
        assert "pro" in listing.stdout
        for token in (acct.access_token, acct.refresh_token, acct.id_token):
            assert token not in listing.stdout + listing.stderr

        assert (await cli(home, "accounts", "pause", account_id)).returncode == 0
        assert "paused" in (await cli(home, "accounts", "list")).stdout
        assert (await cli(home, "accounts", "resume", account_id)).returncode == 0
        missing = await cli(home, "accounts", "pause", "acc_nope")
        assert missing.returncode == 1
        assert missing.stderr.strip().count("\n") == 0
        assert (await cli(home, "accounts", "remove", account_id)).returncode == 0
        assert table_rows(home) == 0


async def test_bad_auth_files_write_nothing(tmp_path):
    with trio.fail_after(120):
        home = tmp_path / "home"
        cases = {
            "missing.json": None,
            "malformed.json": "{not json",
            "no_refresh.json": json.dumps({"tokens": {"id_token": "a.b.c", "access_token": "x"}}),
        }
        for name, content in cases.items():
            path = tmp_path / name
            if content is not None:
                path.write_text(content)
            result = await cli(home, "accounts", "import", str(path))
            assert result.returncode == 1, (name, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("codex-lb-trio: "), (name, lines)
            assert "Traceback" not in result.stderr
        assert table_rows(home) == 0


async def test_new_refresh_token_survives_kill_9(tmp_path, fake_upstream):
    """Refresh, kill -9 right after the upstream answered, restart: the account still works."""
    with trio.fail_after(180):
        home = tmp_path / "home"
        config = write_config(tmp_path, fake_upstream.port)
        acct = fake_upstream.add_account(email="k@example.com", chatgpt_account_id="acct-k")
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps(fake_upstream.auth_json(acct)))
        imported = await cli(home, "accounts", "import", str(auth), config=config)
        account_id = imported.stdout.split()[2]
        first_refresh_token = acct.refresh_token

        server = ServerProcess(home, config=config)
        try:
            url = await trio.to_thread.run_sync(server.wait_listening)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                response = await http.post(f"/api/accounts/{account_id}/refresh")
                assert response.status_code == 200, response.text
            assert fake_upstream.count("token", "acct-k") == 1
            server.proc.send_signal(signal.SIGKILL)  # no graceful anything
            await trio.to_thread.run_sync(server.wait)
        finally:
            server.kill()
        assert acct.refresh_token != first_refresh_token  # the old one is dead upstream

        server = ServerProcess(home, config=config)
        try:
            url = await trio.to_thread.run_sync(server.wait_listening)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                # only the persisted new refresh token is accepted by the fake
                response = await http.post(f"/api/accounts/{account_id}/refresh")
                assert response.status_code == 200, response.text
                turn = await http.post("/backend-api/codex/responses", json=CODEX_BODY)
                assert turn.status_code == 200
                assert "response.completed" in turn.text
                listed = await http.get("/api/accounts")
                assert listed.json()["accounts"][0]["status"] == "active"
                for token in (acct.access_token, acct.refresh_token, acct.id_token):
                    assert token not in listed.text
            assert fake_upstream.count("token", "acct-k") == 2
        finally:
            server.terminate()
        for token in (acct.access_token, acct.refresh_token, first_refresh_token):
            assert token not in server.log
        # and not on disk in clear text
        for path in home.iterdir():
            if path.is_file():
                data = path.read_bytes()
                assert acct.refresh_token.encode() not in data


async def test_status_against_the_running_server(tmp_path, fake_upstream):
    with trio.fail_after(120):
        home = tmp_path / "home"
        config = write_config(tmp_path, fake_upstream.port)
        acct = fake_upstream.add_account(email="s@example.com", chatgpt_account_id="acct-s", plan="team")
        fake_upstream.set_usage("acct-s", primary_used=42.0, primary_reset_at=time.time() + 3600,
                                secondary_used=10.0, secondary_reset_at=time.time() + 86400)
        with ServerProcess(home, config=config) as server:
            url = await trio.to_thread.run_sync(server.wait_listening)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                imported = await http.post("/api/accounts/import", json=fake_upstream.auth_json(acct))
                assert imported.status_code == 201
                report = (await http.post("/api/refresh")).json()
                assert report["accounts_polled"] == 1
                await http.post("/api/clients/rotate")
            result = await cli(home, "status", "--url", url, config=config)
            assert result.returncode == 0, result.stderr
            assert "s@example.com" in result.stdout and "team" in result.stdout
            assert "[####------]  42%" in result.stdout
            assert "generation 2" in result.stdout
            server.terminate()
        stopped = await cli(home, "status", "--url", url, config=config)
        assert stopped.returncode == 1
        assert stopped.stderr.strip() == f"codex-lb-trio: no server answering at {url} (start it with codex-lb-trio serve)"
