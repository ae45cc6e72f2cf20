"""Config values, files and terminal output: what the program refuses, fixes and escapes.

The CLI runs for real (``service.cli.main`` in-process for config errors, which stop before
anything starts; a subprocess where a store or a server is involved).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.fernet import Fernet

from actors.accounts import Account, TokenSet
from service.cli import main
from service.config import Config, ConfigError, parse_config
from service.login import import_auth_data
from service.store import SQLiteAccountStore
from tests.fakes.upstream import FakeUpstream
from tests.proc import ServerProcess
from tests.test_cli_and_crash import cli, write_config

BAD_CONFIGS = [
    ("upstream.header_timeout", "[upstream]\nheader_timeout = nan\n"),
    ("upstream.header_timeout", "[upstream]\nheader_timeout = 0\n"),
    ("upstream.header_timeout", "[upstream]\nheader_timeout = inf\n"),
    ("upstream.connect_timeout", "[upstream]\nconnect_timeout = -1\n"),
    ("upstream.stream_idle_timeout", "[upstream]\nstream_idle_timeout = -inf\n"),
    ("upstream.base_url", '[upstream]\nbase_url = "ftp://example.com"\n'),
    ("client.max_connections", "[client]\nmax_connections = 0\n"),
    ("client.keepalive_count", "[client]\nkeepalive_count = 1000\n"),
    ("client.drain_timeout", "[client]\ndrain_timeout = nan\n"),
    ("server.port", "[server]\nport = 70000\n"),
    ("server.max_body_bytes", "[server]\nmax_body_bytes = 0\n"),
    ("server.log_level", '[server]\nlog_level = "loud"\n'),
    ("server.allowed_hosts", '[server]\nallowed_hosts = ["http://proxy.lan/"]\n'),
    ("server.allowed_origins", '[server]\nallowed_origins = ["proxy.lan"]\n'),
    ("server.trust_any_host", "[server]\ntrust_any_host = true\n"),
    ("server.large_body_slots", "[server]\nlarge_body_slots = 0\n"),
    ("refresh.usage_interval", "[refresh]\nusage_interval = 0\n"),
    ("refresh.token_margin", "[refresh]\ntoken_margin = -5\n"),
    ("routing.max_attempts", "[routing]\nmax_attempts = 0\n"),
    ("routing.default_cooldown", "[routing]\ndefault_cooldown = nan\n"),
    ("auth.api_keys", '[auth]\napi_keys = [""]\n'),
    ("auth.api_keys", '[auth]\napi_keys = ["short-Key-7"]\n'),
    ("auth.api_keys", '[auth]\napi_keys = ["sha256:not-a-digest"]\n'),
    ("auth.api_keys", '[auth]\napi_keys = ["a long enough key\\nwith a line break"]\n'),
    ("server.", '[server]\n"\\u001b[2Jx" = 1\n'),
]


@pytest.mark.parametrize(("key", "text"), BAD_CONFIGS,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_CONFIGS)])
def test_each_bad_config_value_is_one_line_naming_the_key(tmp_path, capsys, key, text):
    config = tmp_path / "config.toml"
    config.write_text(text)
    assert main(["--config", str(config), "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"config key {key}" in err, err
    assert "Traceback" not in err
    assert "\x1b" not in err
    for secret in ("short-Key-7", "not-a-digest", "with a line break"):
        assert secret not in err  # a bad key is never echoed


@pytest.mark.parametrize("content", [b"\x00\xff\xfe\x01binary\x80", b"\xef\xbb\xbf\x00[server]",
                                     b"[server]\nport = \x1b[2J\n"])
def test_binary_config_file_is_one_line(tmp_path, capsys, content):
    config = tmp_path / "config.toml"
    config.write_bytes(content)
    assert main(["--config", str(config), "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"config file {config}" in err
    assert "Traceback" not in err
    assert "\x1b" not in err


def _numeric_keys() -> list[tuple[str, str, type]]:
    keys = []
    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            value = getattr(section.default_factory(), item.name)  # type: ignore[misc]
            if isinstance(value, int | float) and not isinstance(value, bool):
                keys.append((section.name, item.name, type(value)))
    return keys


@pytest.mark.parametrize(("section", "key", "kind"), _numeric_keys())
def test_every_numeric_key_refuses_non_finite_and_negative_values(section, key, kind):
    # Keys added later get the default rule (finite, not negative) until they get their own.
    bad = [-1] if kind is int else [math.nan, math.inf, -math.inf, -1.0]
    for value in bad:
        with pytest.raises(ConfigError, match=rf"config key {section}\.{key}: expected"):
            parse_config({section: {key: value}})
    assert parse_config({}) == Config()  # the defaults pass their own rules


# --- store errors from `serve` -------------------------------------------------------------------


async def _prepared_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    async with await SQLiteAccountStore.open(home):
        pass
    return home


async def _serve_once(tmp_path: Path, home: Path) -> tuple[int, str]:
    config = tmp_path / "config.toml"
    config.write_text("[client]\nshutdown_grace = 1.0\n")
    result = await cli(home, "serve", "--port", "0", config=config)
    return result.returncode, result.stderr


async def test_serve_reports_a_replaced_key_in_one_line(tmp_path):
    with trio.fail_after(60):
        home = await _prepared_home(tmp_path)
        (home / "secret.key").write_bytes(Fernet.generate_key() + b"\n")
        code, err = await _serve_once(tmp_path, home)
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert "does not match" in err
        assert "Traceback" not in err


async def test_serve_reports_a_corrupt_store_in_one_line(tmp_path):
    with trio.fail_after(60):
        home = await _prepared_home(tmp_path)
        for leftover in home.glob("store.db-*"):
            leftover.unlink()
        (home / "store.db").write_bytes(b"this is not a database" * 100)
        code, err = await _serve_once(tmp_path, home)
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert "store.db" in err
        assert "Traceback" not in err


async def test_serve_reports_a_read_only_store_in_one_line(tmp_path):
    with trio.fail_after(60):
        home = await _prepared_home(tmp_path)
        if os.geteuid() != 0:
            (home / "store.db").chmod(0o400)
            code, err = await _serve_once(tmp_path, home)
        else:
            # Root writes through file modes: make the data dir a read-only mount instead, in
            # a mount namespace of the child's own.
            script = (f"mount --bind {home} {home} && mount -o remount,ro,bind {home} && "
                      f"exec {sys.executable} -m service.cli serve --port 0")
            env = {**os.environ, "CODEX_LB_TRIO_HOME": str(home)}
            env.pop("CODEX_LB_TRIO_CONFIG", None)
            result = await trio.to_thread.run_sync(lambda: subprocess.run(
                ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                timeout=60, env=env, cwd=Path(__file__).resolve().parent.parent))
            if "Read-only" not in result.stderr and "codex-lb-trio:" not in result.stderr:
                pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()[:200]}")
            code, err = result.returncode, result.stderr
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


# --- files: symlinks and modes ------------------------------------------------------------


@pytest.mark.parametrize("name", ["secret.key", "store.db"])
async def test_symlinked_key_or_store_is_refused_and_its_target_untouched(tmp_path, name):
    with trio.fail_after(60):
        home = tmp_path / "home"
        home.mkdir(mode=0o700)
        target = tmp_path / "system-file"
        target.write_bytes(b"precious\n")
        target.chmod(0o644)
        (home / name).symlink_to(target)
        for args in (("accounts", "list"), ("serve", "--port", "0")):
            result = await cli(home, *args)
            assert result.returncode == 1, result
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert "symbolic link" in lines[0], result.stderr
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert target.read_bytes() == b"precious\n"


async def test_open_modes_are_warned_about_and_our_files_tightened(tmp_path):
    with trio.fail_after(60):
        home = await _prepared_home(tmp_path)
        home.chmod(0o755)
        (home / "store.db").chmod(0o644)
        (home / "secret.key").chmod(0o640)
        result = await cli(home, "accounts", "list")
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
        assert len(warnings) == 3, result.stderr  # data dir, store, key: once each
        assert any("chmod 700" in line for line in warnings)
        assert stat.S_IMODE((home / "store.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "secret.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o755  # the user's choice: warned, not changed
        again = await cli(home, "accounts", "list")
        warned_again = [line for line in again.stderr.splitlines() if "WARNING" in line]
        assert len(warned_again) == 1, again.stderr
        assert "data dir" in warned_again[0], again.stderr


async def test_a_new_data_dir_is_private(tmp_path):
    with trio.fail_after(60):
        home = tmp_path / "fresh"
        old = os.umask(0o022)
        try:
            result = await cli(home, "accounts", "list")
        finally:
            os.umask(old)
        assert result.returncode == 0, result.stderr
        assert "WARNING" not in result.stderr
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "store.db").stat().st_mode) == 0o600


# --- the store: one bad row ---------------------------------------------------------------


async def test_one_bad_row_is_skipped_not_fatal(tmp_path, caplog):
    fake = FakeUpstream()
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with await SQLiteAccountStore.open(home) as store:
            good = await import_auth_data(store, fake.auth_json(fake.add_account(
                email="good@example.com", chatgpt_account_id="acct-good")))
            bad = await import_auth_data(store, fake.auth_json(fake.add_account(
                email="bad@example.com", chatgpt_account_id="acct-bad")))
        with sqlite3.connect(home / "store.db") as db:
            db.execute("UPDATE accounts SET status = 'bogus' WHERE id = ?", (bad.account.id,))
        with caplog.at_level(logging.WARNING, logger="codex_lb_trio.store"):
            async with await SQLiteAccountStore.open(home) as store:
                listed = await store.list_accounts()
                assert [a.id for a in listed] == [good.account.id]
                await store.remove(bad.account.id)  # the way out the warning names
        assert any(bad.account.id in r.getMessage() and "remove" in r.getMessage()
                   for r in caplog.records), caplog.text
        result = await cli(home, "accounts", "list")
        assert result.returncode == 0, result.stderr
        assert "good@example.com" in result.stdout


# --- terminal output -----------------------------------------------------------------------

FORGED_EMAIL = "\x1b[2J\x1b[Hok@example.com\r\nfake line\u202e"


async def _store_with_forged_email(home: Path, fake: FakeUpstream) -> None:
    """An account stored before the door checks existed (written past them, on purpose)."""
    acct = fake.add_account(email="x@example.com", chatgpt_account_id="acct-x")
    async with await SQLiteAccountStore.open(home) as store:
        await store.upsert(Account(
            id="acc_forged", email=FORGED_EMAIL, chatgpt_account_id="acct-x", plan="plus\x07",
            tokens=TokenSet(access_token=acct.access_token, refresh_token=acct.refresh_token,
                            id_token=acct.id_token),
            created_at=1_800_000_000.0,
        ))


def _assert_escaped(text: str) -> None:
    for raw in ("\x1b", "\r", "\x07", "\u202e", "\nfake line"):
        assert raw not in text, repr(text)
    assert "\\x1b[2J" in text


async def test_accounts_list_and_status_escape_control_characters(tmp_path, fake_upstream):
    home = tmp_path / "home"
    with trio.fail_after(120):
        await _store_with_forged_email(home, fake_upstream)
        listed = await cli(home, "accounts", "list")
        assert listed.returncode == 0, listed.stderr
        _assert_escaped(listed.stdout)
        config = write_config(tmp_path, fake_upstream.port)
        with ServerProcess(home, config=config) as server:
            url = await trio.to_thread.run_sync(server.wait_listening)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                assert (await http.get("/api/accounts")).status_code == 200
            status = await cli(home, "status", "--url", url, config=config)
            assert status.returncode == 0, status.stderr
            _assert_escaped(status.stdout)
            server.terminate()


async def test_an_infinite_time_stored_by_an_older_version_reads_as_unknown(tmp_path):
    fake = FakeUpstream()
    home = tmp_path / "home"
    with trio.fail_after(60):
        async with await SQLiteAccountStore.open(home) as store:
            added = await import_auth_data(store, fake.auth_json(fake.add_account(
                email="inf@example.com", chatgpt_account_id="acct-inf")))
        with sqlite3.connect(home / "store.db") as db:
            db.execute("UPDATE accounts SET access_expires_at = ?, cooldown_until = ? WHERE id = ?",
                       (math.inf, math.nan, added.account.id))
        async with await SQLiteAccountStore.open(home) as store:
            (account,) = await store.list_accounts()
            assert account.access_expires_at is None
            assert account.cooldown_until is None
        result = await cli(home, "accounts", "list")
        assert result.returncode == 0, result.stderr
        assert "inf@example.com" in result.stdout
        assert "unknown" in result.stdout
