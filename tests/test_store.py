"""SQLiteAccountStore against real SQLite files in tmp_path."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.fernet import Fernet

from actors.accounts import (
    Account,
    AccountNotFound,
    AccountStatus,
    TokenSet,
    Usage,
    UsageWindow,
)
from service.store import (
    KEY_FILENAME,
    SCHEMA_VERSION,
    STORE_FILENAME,
    SQLiteAccountStore,
    StoreError,
    open_store,
)


def make_jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.c2ln"


def make_tokens(tag: str) -> TokenSet:
    """A token triple whose values are unique, greppable markers."""
    return TokenSet(
        access_token=make_jwt({"exp": 2_000_000_000, "marker": f"ACCESS-{tag}-SECRET"}),
        refresh_token=f"rt_REFRESH-{tag}-SECRET",
        id_token=make_jwt({"email": f"{tag}@example.com", "marker": f"IDTOKEN-{tag}-SECRET"}),
    )


def make_account(tag: str, **changes: Any) -> Account:
    fields: dict[str, Any] = {
        "id": f"acc_{tag}",
        "email": f"{tag}@example.com",
        "chatgpt_account_id": f"chatgpt-{tag}",
        "chatgpt_user_id": f"user-{tag}",
        "plan": "plus",
        "tokens": make_tokens(tag),
        "access_expires_at": 1_900_000_000.0,
        "last_refresh": 1_800_000_000.0,
        "created_at": 1_700_000_000.0,
    }
    fields.update(changes)
    return Account(**fields)


def read_db_row(home: Path, account_id: str) -> tuple[Any, ...] | None:
    """Read a row through a connection of its own, as another process would."""
    db = sqlite3.connect(home / STORE_FILENAME)
    try:
        row: tuple[Any, ...] | None = db.execute(
            "SELECT email, tokens, last_refresh FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return row
    finally:
        db.close()


def store_bytes(home: Path) -> bytes:
    """Everything SQLite has on disk for the store: the db file, its WAL and shm."""
    chunks = []
    for name in (STORE_FILENAME, STORE_FILENAME + "-wal", STORE_FILENAME + "-shm"):
        path = home / name
        if path.exists():
            chunks.append(path.read_bytes())
    return b"".join(chunks)


def token_markers(tokens: TokenSet) -> list[bytes]:
    return [
        tokens.access_token.encode(),
        tokens.refresh_token.encode(),
        tokens.id_token.encode(),
        b"SECRET",
    ]


async def test_round_trip_of_every_field_survives_reopen(tmp_path: Path) -> None:
    home = tmp_path / "home"
    usage = Usage(
        primary=UsageWindow(used_percent=12.5, reset_at=1_800_003_600.0, window_seconds=18000),
        secondary=UsageWindow(used_percent=40.0, reset_at=1_800_600_000.0, window_seconds=604800),
        updated_at=1_800_000_100.0,
    )
    async with open_store(home) as store:
        stored, created = await store.upsert(make_account("a"))
        assert created
        assert stored == make_account("a")
        await store.set_usage("acc_a", usage)
        await store.set_cooldown("acc_a", 1_800_000_500.0)
        await store.set_status("acc_a", AccountStatus.PAUSED, "paused by admin")
        new_tokens = make_tokens("a2")
        final = await store.save_tokens(
            "acc_a",
            new_tokens,
            access_expires_at=1_900_000_999.0,
            last_refresh=1_800_000_200.0,
            plan="pro",
        )
        expected = make_account(
            "a",
            tokens=new_tokens,
            access_expires_at=1_900_000_999.0,
            last_refresh=1_800_000_200.0,
            plan="pro",
            status=AccountStatus.PAUSED,
            status_reason="paused by admin",
            cooldown_until=1_800_000_500.0,
            usage=usage,
            token_version=2,  # the saved triple is the account's second
        )
        assert final == expected
        assert await store.get("acc_a") == expected

    async with open_store(home) as reopened:
        assert await reopened.list_accounts() == [expected]
        assert (await reopened.get("acc_a")).tokens.refresh_token == new_tokens.refresh_token


async def test_save_tokens_without_plan_keeps_plan_and_none_clears_cooldown(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path) as store:
        await store.upsert(make_account("a", cooldown_until=5.0))
        account = await store.save_tokens(
            "acc_a", make_tokens("b"), access_expires_at=None, last_refresh=7.0
        )
        assert account.plan == "plus"
        assert account.access_expires_at is None
        assert (await store.set_cooldown("acc_a", None)).cooldown_until is None


async def test_tokens_are_never_on_disk_in_plaintext(tmp_path: Path) -> None:
    account = make_account("plain")
    async with open_store(tmp_path) as store:
        await store.upsert(account)
        newer = make_tokens("plain2")
        await store.save_tokens("acc_plain", newer, access_expires_at=None, last_refresh=1.0)
        # While open, the latest writes sit in the WAL.
        assert (tmp_path / (STORE_FILENAME + "-wal")).exists()
        on_disk = store_bytes(tmp_path)
        assert b"plain@example.com" in on_disk  # the grep works: identity is stored as is
        for marker in token_markers(account.tokens) + token_markers(newer):
            assert marker not in on_disk
    on_disk = store_bytes(tmp_path)
    assert b"plain@example.com" in on_disk
    for marker in token_markers(account.tokens) + token_markers(newer):
        assert marker not in on_disk


async def test_files_are_private(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    async with open_store(home):
        pass
    assert stat.S_IMODE((home / KEY_FILENAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((home / STORE_FILENAME).stat().st_mode) & 0o077 == 0
    Fernet((home / KEY_FILENAME).read_bytes().strip())  # a valid key


async def test_a_key_file_with_wide_permissions_is_tightened(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        await store.upsert(make_account("a"))
    os.chmod(tmp_path / KEY_FILENAME, 0o644)
    async with open_store(tmp_path) as store:
        assert [a.id for a in await store.list_accounts()] == ["acc_a"]
    assert stat.S_IMODE((tmp_path / KEY_FILENAME).stat().st_mode) == 0o600


async def test_a_replaced_key_file_is_a_clear_store_error(tmp_path: Path) -> None:
    account = make_account("a")
    async with open_store(tmp_path) as store:
        await store.upsert(account)
    key_path = tmp_path / KEY_FILENAME
    key_path.unlink()
    key_path.write_bytes(Fernet.generate_key())
    os.chmod(key_path, 0o600)

    with pytest.raises(StoreError) as info:
        await SQLiteAccountStore.open(tmp_path)
    message = str(info.value)
    assert message.startswith("cannot decrypt tokens in store.db: the key file ")
    assert str(key_path) in message
    assert "does not match" in message
    assert "\n" not in message
    assert info.value.__suppress_context__  # no chained InvalidToken traceback
    for marker in token_markers(account.tokens):
        assert marker.decode() not in message


async def test_a_replaced_key_file_is_detected_even_without_accounts(tmp_path: Path) -> None:
    async with open_store(tmp_path):
        pass
    (tmp_path / KEY_FILENAME).unlink()
    with pytest.raises(StoreError, match="does not match"):
        await SQLiteAccountStore.open(tmp_path)


async def test_a_garbled_key_file_is_refused(tmp_path: Path) -> None:
    key_path = tmp_path / KEY_FILENAME
    key_path.write_bytes(b"not a key")
    os.chmod(key_path, 0o600)
    with pytest.raises(StoreError, match="does not hold a valid key"):
        await SQLiteAccountStore.open(tmp_path)


def build_version_1_db(home: Path, key: bytes, account: Account) -> None:
    """A store.db as the first schema wrote it, with one account."""
    home.mkdir(parents=True, exist_ok=True)
    key_path = home / KEY_FILENAME
    key_path.write_bytes(key)
    os.chmod(key_path, 0o600)
    sealed = Fernet(key).encrypt(
        json.dumps(
            {
                "access_token": account.tokens.access_token,
                "refresh_token": account.tokens.refresh_token,
                "id_token": account.tokens.id_token,
            }
        ).encode()
    )
    db = sqlite3.connect(home / STORE_FILENAME)
    try:
        db.executescript(
            """
            CREATE TABLE accounts (
                id TEXT PRIMARY KEY,
                email TEXT NOT NULL,
                chatgpt_account_id TEXT NOT NULL,
                chatgpt_user_id TEXT NOT NULL DEFAULT '',
                plan TEXT NOT NULL DEFAULT 'unknown',
                status TEXT NOT NULL DEFAULT 'active',
                status_reason TEXT NOT NULL DEFAULT '',
                tokens BLOB NOT NULL,
                access_expires_at REAL,
                last_refresh REAL,
                created_at REAL NOT NULL,
                UNIQUE (chatgpt_account_id, email)
            );
            PRAGMA user_version = 1;
            """
        )
        db.execute(
            "INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                account.id,
                account.email,
                account.chatgpt_account_id,
                account.chatgpt_user_id,
                account.plan,
                "reauth_required",
                "refresh_token_reused",
                sealed,
                account.access_expires_at,
                account.last_refresh,
                account.created_at,
            ),
        )
        db.commit()
    finally:
        db.close()


def user_version(home: Path) -> int:
    db = sqlite3.connect(home / STORE_FILENAME)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def test_a_version_1_store_is_migrated_and_keeps_its_accounts(tmp_path: Path) -> None:
    account = make_account("old")
    build_version_1_db(tmp_path, Fernet.generate_key(), account)
    assert user_version(tmp_path) == 1

    async with open_store(tmp_path) as store:
        migrated = await store.get("acc_old")
        assert migrated.tokens == account.tokens
        assert migrated.token_version == 1  # version 3 numbers the triples from 1
        assert migrated.status is AccountStatus.REAUTH_REQUIRED
        assert migrated.status_reason == "refresh_token_reused"
        assert migrated.usage == Usage()
        assert migrated.cooldown_until is None
        # The columns version 2 added work.
        await store.set_cooldown("acc_old", 123.0)
        await store.set_usage("acc_old", Usage(primary=UsageWindow(used_percent=3.0)))
    assert user_version(tmp_path) == SCHEMA_VERSION == 3

    async with open_store(tmp_path) as store:
        again = await store.get("acc_old")
        assert again.cooldown_until == 123.0
        assert again.usage.primary == UsageWindow(used_percent=3.0)


async def test_a_version_0_file_gets_the_whole_schema(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / STORE_FILENAME).close()  # an empty database, user_version 0
    assert user_version(tmp_path) == 0
    async with open_store(tmp_path) as store:
        assert await store.list_accounts() == []
        await store.upsert(make_account("a"))
    assert user_version(tmp_path) == SCHEMA_VERSION


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path):
        pass
    db = sqlite3.connect(tmp_path / STORE_FILENAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this codex-lb-trio understands"):
        await SQLiteAccountStore.open(tmp_path)


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / STORE_FILENAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="store.db"):
        await SQLiteAccountStore.open(tmp_path)


async def test_concurrent_writes_from_many_tasks_all_land(tmp_path: Path) -> None:
    count = 40
    async with open_store(tmp_path) as store:

        async def worker(n: int) -> None:
            tag = f"w{n}"
            await store.upsert(make_account(tag, created_at=float(n)))
            await store.save_tokens(
                f"acc_{tag}", make_tokens(f"{tag}-new"), access_expires_at=None, last_refresh=n
            )
            await store.set_usage(f"acc_{tag}", Usage(primary=UsageWindow(used_percent=n)))
            await store.set_status(f"acc_{tag}", AccountStatus.PAUSED, f"reason {n}")

        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(worker, n)
        in_memory = await store.list_accounts()

    async with open_store(tmp_path) as reopened:
        on_disk = await reopened.list_accounts()
    assert on_disk == in_memory
    assert [a.id for a in on_disk] == [f"acc_w{n}" for n in range(count)]
    for n, account in enumerate(on_disk):
        assert account.tokens == make_tokens(f"w{n}-new")
        assert account.last_refresh == n
        assert account.usage.primary == UsageWindow(used_percent=n)
        assert account.status_reason == f"reason {n}"


async def test_concurrent_upserts_of_one_identity_make_one_account(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        results: list[bool] = []

        async def importer(n: int) -> None:
            _, created = await store.upsert(make_account("same", id=f"acc_try{n}"))
            results.append(created)

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(importer, n)
        assert sorted(results) == [False] * 9 + [True]
        assert len(await store.list_accounts()) == 1


async def test_a_second_instance_writes_are_seen_after_reload(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_store(tmp_path) as server, open_store(tmp_path) as cli:
        await server.upsert(make_account("a"))
        assert not await server.reload_if_changed()  # its own writes are no change

        await cli.reload_if_changed()
        await cli.upsert(make_account("b"))
        await cli.set_status("acc_a", AccountStatus.PAUSED, "paused from the CLI")

        # Within a second of the last look, list_accounts serves the cache as is.
        assert [a.id for a in await server.list_accounts()] == ["acc_a"]
        mock_clock.jump(1.5)
        accounts = await server.list_accounts()
        assert [a.id for a in accounts] == ["acc_a", "acc_b"]
        assert accounts[0].status is AccountStatus.PAUSED
        assert not await server.reload_if_changed()

        # A removal by the CLI reaches the server too.
        await cli.remove("acc_b")
        assert await server.reload_if_changed()
        assert [a.id for a in await server.list_accounts()] == ["acc_a"]


async def test_get_of_an_account_just_added_elsewhere_finds_it(tmp_path: Path) -> None:
    async with open_store(tmp_path) as server, open_store(tmp_path) as cli:
        await cli.upsert(make_account("new"))
        assert (await server.get("acc_new")).email == "new@example.com"


async def test_writes_to_different_concerns_from_two_processes_both_stay(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path) as server, open_store(tmp_path) as cli:
        await server.upsert(make_account("a"))
        await cli.reload_if_changed()
        await cli.set_status("acc_a", AccountStatus.PAUSED, "admin")
        # The server has not reloaded; its write must not bring back the old status.
        after = await server.set_usage("acc_a", Usage(primary=UsageWindow(used_percent=50.0)))
        assert after.status is AccountStatus.PAUSED
        assert after.usage.primary == UsageWindow(used_percent=50.0)


async def test_a_write_to_an_account_removed_elsewhere_is_not_found(tmp_path: Path) -> None:
    async with open_store(tmp_path) as server, open_store(tmp_path) as cli:
        await server.upsert(make_account("a"))
        await cli.reload_if_changed()
        await cli.remove("acc_a")
        with pytest.raises(AccountNotFound):
            await server.save_tokens(
                "acc_a", make_tokens("late"), access_expires_at=None, last_refresh=1.0
            )
        with pytest.raises(AccountNotFound):
            await server.get("acc_a")


async def test_upsert_of_the_same_identity_updates_and_keeps_the_id(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        first, created = await store.upsert(make_account("a"))
        assert created
        await store.set_status("acc_a", AccountStatus.REAUTH_REQUIRED, "refresh_token_reused")
        await store.set_cooldown("acc_a", 99.0)

        again = make_account(
            "a",
            id="acc_other",
            tokens=make_tokens("relogin"),
            plan="pro",
            chatgpt_user_id="user-new",
            access_expires_at=1_950_000_000.0,
            last_refresh=1_850_000_000.0,
            created_at=1_750_000_000.0,
        )
        updated, created = await store.upsert(again)
        assert not created
        assert updated.id == "acc_a"
        assert updated.created_at == first.created_at
        assert updated.tokens == make_tokens("relogin")
        assert updated.plan == "pro"
        assert updated.chatgpt_user_id == "user-new"
        assert updated.access_expires_at == 1_950_000_000.0
        assert updated.last_refresh == 1_850_000_000.0
        assert updated.status is AccountStatus.ACTIVE
        assert updated.status_reason == ""
        assert await store.list_accounts() == [updated]

        # Same ChatGPT account, another user (a team seat): a second account.
        teammate, created = await store.upsert(
            make_account("a", id="acc_mate", email="mate@example.com")
        )
        assert created
        assert teammate.id == "acc_mate"
        assert len(await store.list_accounts()) == 2

    async with open_store(tmp_path) as reopened:
        assert [a.id for a in await reopened.list_accounts()] == ["acc_a", "acc_mate"]


async def test_remove_and_unknown_ids(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        await store.upsert(make_account("a"))
        await store.upsert(make_account("b", created_at=1_700_000_001.0))
        await store.remove("acc_a")
        assert [a.id for a in await store.list_accounts()] == ["acc_b"]
        with pytest.raises(AccountNotFound):
            await store.remove("acc_a")
        with pytest.raises(AccountNotFound):
            await store.get("acc_a")
        with pytest.raises(AccountNotFound):
            await store.set_status("acc_nope", AccountStatus.PAUSED)
        with pytest.raises(AccountNotFound):
            await store.set_cooldown("acc_nope", 1.0)
        with pytest.raises(AccountNotFound):
            await store.set_usage("acc_nope", Usage())
    assert read_db_row(tmp_path, "acc_a") is None
    assert read_db_row(tmp_path, "acc_b") is not None


async def test_save_tokens_is_durable_when_it_returns(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        await store.upsert(make_account("a"))
        newer = make_tokens("durable")
        await store.save_tokens("acc_a", newer, access_expires_at=None, last_refresh=42.0)
        # Another connection, while the store is still open, sees the committed row.
        row = read_db_row(tmp_path, "acc_a")
        assert row is not None
        email, sealed, last_refresh = row
        assert email == "a@example.com"
        assert last_refresh == 42.0
        key = (tmp_path / KEY_FILENAME).read_bytes().strip()
        triple = json.loads(Fernet(key).decrypt(sealed))
        assert triple["refresh_token"] == newer.refresh_token


async def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = await SQLiteAccountStore.open(tmp_path)
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.upsert(make_account("a"))
    with pytest.raises(StoreError, match="closed"):
        await store.reload_if_changed()


async def test_the_store_is_its_own_context_manager(tmp_path: Path) -> None:
    async with await SQLiteAccountStore.open(tmp_path) as store:
        await store.upsert(make_account("a"))
    with pytest.raises(StoreError, match="closed"):
        await store.remove("acc_a")
