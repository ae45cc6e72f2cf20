"""The SQLite account store: where the standalone program keeps its pooled accounts.

One file, ``<home>/store.db``, shared by the running server and the CLI. The token triple
of every account is encrypted with a Fernet key kept in ``<home>/secret.key`` (mode 0600);
nothing else in the file is secret.

- Every SQLite call runs in a worker thread (``trio.to_thread.run_sync``) on one
  connection; a ``trio.Lock`` inside the store serialises them.
- Writes commit (``synchronous=FULL``) inside that thread call, so a write is durable on
  disk when its method returns; only then is the in-memory cache updated.
- Reads come from the cache. ``reload_if_changed()`` notices, through
  ``PRAGMA data_version``, that another process (the CLI) committed, and reloads;
  ``list_accounts()`` does that at most once a second so CLI changes reach a running server.
- The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS`` run in order at open.

Cancellation: a call cancelled while waiting for the lock did nothing. Once its thread
call has started it runs to the end (worker threads are not abandoned), so a write that
began is committed and reflected in the cache before ``Cancelled`` is delivered.

Errors::

    StoreError        the store cannot be opened or used (one line that says why)
    AccountNotFound   (from actors.accounts) an unknown account id
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio
from cryptography.fernet import Fernet, InvalidToken

from actors.accounts import (
    Account,
    AccountNotFound,
    AccountStatus,
    StoreFailure,
    TokenSet,
    TokenVersionConflict,
    Usage,
)

log = logging.getLogger("codex_lb_trio.store")

STORE_FILENAME = "store.db"
KEY_FILENAME = "secret.key"
BUSY_TIMEOUT_MS = 10_000
# How stale list_accounts() may be about writes made by another process.
RELOAD_INTERVAL = 1.0
# A plaintext the key must decrypt: it catches a replaced key file even before any account
# exists, so new accounts are never written under a key that cannot read the old ones.
_KEY_CHECK_PLAINTEXT = b"codex-lb-trio key check"

_T = TypeVar("_T")


class StoreError(StoreFailure):
    """The account store cannot be opened or used; the message says why in one line."""


# --- schema -----------------------------------------------------------------------------
# MIGRATIONS[i] takes a database at version i to version i + 1. Never edit a released one:
# add a new function at the end.


def _migrate_to_1(db: sqlite3.Connection) -> None:
    """The first layout: identity, plan, status and the sealed tokens."""
    db.execute(
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
        )
        """
    )


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """Rate-limit state survives restarts; the key check detects a replaced key file."""
    db.execute("ALTER TABLE accounts ADD COLUMN cooldown_until REAL")
    db.execute("ALTER TABLE accounts ADD COLUMN usage TEXT NOT NULL DEFAULT '{}'")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")


def _migrate_to_3(db: sqlite3.Connection) -> None:
    """Token writes carry a version, so an older state can never overwrite a newer login."""
    db.execute("ALTER TABLE accounts ADD COLUMN token_version INTEGER NOT NULL DEFAULT 1")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_to_1, _migrate_to_2, _migrate_to_3,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id, email, chatgpt_account_id, chatgpt_user_id, plan, status, status_reason, tokens,"
    " access_expires_at, last_refresh, cooldown_until, usage, created_at, token_version"
)


@contextlib.contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT: takes the write lock up front, so writers never deadlock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # keep the original error, not this one
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection, db_path: Path) -> None:
    with _write_transaction(db):
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{db_path} has schema version {version}, newer than this codex-lb-trio "
                f"understands ({SCHEMA_VERSION}): upgrade codex-lb-trio"
            )
        for migration in MIGRATIONS[version:]:
            migration(db)
        if version != SCHEMA_VERSION:
            # PRAGMA does not take parameters; SCHEMA_VERSION is our own integer.
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# --- the key file and the token cipher --------------------------------------------------


def _open_private(path: Path, flags: int, what: str) -> int:
    """Open ``path`` without following a symlink and make it 0600 (through the fd, not the name).

    A symlinked key or store is refused: chmod-ing through it would change its target (run as
    root, any file on the system).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise StoreError(
                f"{what} {path} is a symbolic link; refusing to use it: replace it with the "
                "file itself"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError:
                raise StoreError(
                    f"{what} {path} is accessible by other users (mode {mode:o}) and "
                    f"cannot be tightened: run `chmod 600 {path}`"
                ) from None
            log.warning("%s %s was readable by other users (mode %o); now 0600", what, path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_key(key_path: Path) -> bytes:
    """Read the key, tightening its mode to 0600 if it is wider."""
    fd = _open_private(key_path, os.O_RDONLY, "key file")
    with os.fdopen(fd, "rb") as key_file:
        return key_file.read().strip()


def _load_or_create_key(key_path: Path) -> bytes:
    """The Fernet key of this data dir, created (mode 0600) on first use."""
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        key = _read_key(key_path)
        # Another process may have created the file a moment ago and not written it yet.
        deadline = time.monotonic() + 2.0
        while not key and time.monotonic() < deadline:
            time.sleep(0.05)
            key = _read_key(key_path)
    else:
        key = Fernet.generate_key()
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(key + b"\n")
            key_file.flush()
            os.fsync(key_file.fileno())
        _fsync_dir(key_path.parent)
    try:
        Fernet(key)
    except ValueError:
        raise StoreError(
            f"key file {key_path} does not hold a valid key (expected 44 url-safe base64 "
            "characters); restore the original key file"
        ) from None
    return key


def _check_data_dir(home: Path, *, created: bool) -> None:
    """Tighten a data dir we just made; warn (once per open) about one others can read."""
    mode = stat.S_IMODE(os.stat(home).st_mode)
    if not mode & 0o077:
        return
    if created:
        os.chmod(home, 0o700)
        return
    log.warning(
        "data dir %s is accessible by other users (mode %o): the store and its key are 0600, "
        "but run `chmod 700 %s` to keep others from seeing even their names", home, mode, home
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _TokenCipher:
    """Seals and opens the token triple; the only code that sees tokens in plaintext."""

    def __init__(self, key: bytes, *, key_path: Path, db_path: Path) -> None:
        self._fernet = Fernet(key)
        self._key_path = key_path
        self._db_path = db_path

    def mismatch(self) -> StoreError:
        return StoreError(
            f"cannot decrypt tokens in store.db: the key file {self._key_path} does not match "
            f"{self._db_path} (was it replaced or regenerated?); restore the original key file, "
            "or move store.db aside and add the accounts again"
        )

    def seal(self, tokens: TokenSet) -> bytes:
        triple = {
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "id_token": tokens.id_token,
        }
        return self._fernet.encrypt(json.dumps(triple).encode())

    def open(self, sealed: bytes, account_id: str) -> TokenSet:
        try:
            triple = json.loads(self._fernet.decrypt(sealed))
            return TokenSet(
                access_token=str(triple["access_token"]),
                refresh_token=str(triple["refresh_token"]),
                id_token=str(triple["id_token"]),
            )
        except InvalidToken:
            raise self.mismatch() from None
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                f"the stored tokens of account {account_id} in {self._db_path} are corrupt"
            ) from None

    def check(self, db: sqlite3.Connection) -> None:
        """Verify the key against the stored key check, writing one if there is none."""
        row = db.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        if row is None:
            with _write_transaction(db):
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('key_check', ?)",
                    (self._fernet.encrypt(_KEY_CHECK_PLAINTEXT),),
                )
            row = db.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        try:
            plaintext = self._fernet.decrypt(row[0])
        except InvalidToken:
            raise self.mismatch() from None
        if plaintext != _KEY_CHECK_PLAINTEXT:
            raise self.mismatch()


# --- rows ---------------------------------------------------------------------------------


def _row_to_account(row: tuple[Any, ...], cipher: _TokenCipher) -> Account:
    (
        account_id,
        email,
        chatgpt_account_id,
        chatgpt_user_id,
        plan,
        status,
        status_reason,
        sealed,
        access_expires_at,
        last_refresh,
        cooldown_until,
        usage,
        created_at,
        token_version,
    ) = row
    try:
        parsed_status = AccountStatus(status)
        parsed_usage = Usage.from_json(json.loads(usage or "{}"))
    except (ValueError, TypeError, AttributeError):
        raise StoreError(
            f"account {account_id} in store.db has a corrupt status or usage"
        ) from None
    return Account(
        id=account_id,
        email=email,
        chatgpt_account_id=chatgpt_account_id,
        chatgpt_user_id=chatgpt_user_id,
        plan=plan,
        status=parsed_status,
        status_reason=status_reason,
        tokens=cipher.open(sealed, account_id),
        access_expires_at=access_expires_at,
        last_refresh=last_refresh,
        cooldown_until=cooldown_until,
        usage=parsed_usage,
        created_at=created_at,
        token_version=token_version,
    )


def _load_all(db: sqlite3.Connection, cipher: _TokenCipher) -> dict[str, Account]:
    """Every readable account; a row that cannot be read is reported and skipped, not fatal."""
    rows = db.execute(f"SELECT {_COLUMNS} FROM accounts").fetchall()
    accounts: dict[str, Account] = {}
    for row in rows:
        try:
            accounts[row[0]] = _row_to_account(row, cipher)
        except StoreError as exc:
            shown = repr(row[0])[:80]
            log.warning("skipping account %s in store.db: %s; remove it with "
                        "`codex-lb-trio accounts remove ID` and add it again", shown, exc)
    return accounts


def _select(db: sqlite3.Connection, cipher: _TokenCipher, account_id: str) -> Account:
    row = db.execute(f"SELECT {_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone()
    if row is None:
        raise AccountNotFound(account_id)
    return _row_to_account(row, cipher)


def _data_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA data_version").fetchone()[0])


# --- the store ---------------------------------------------------------------------------


class SQLiteAccountStore:
    """An AccountStore in ``<home>/store.db``. Create it with ``await SQLiteAccountStore.open``.

    Reads are served from memory; every write is committed durably before it returns.
    Safe to share between many trio tasks of one trio run.
    """

    def __init__(
        self,
        *,
        db: sqlite3.Connection,
        cipher: _TokenCipher,
        db_path: Path,
        key_path: Path,
        accounts: dict[str, Account],
        data_version: int,
    ) -> None:
        self._db: sqlite3.Connection | None = db
        self._cipher = cipher
        self._accounts = accounts
        self._data_version = data_version
        self._lock = trio.Lock()
        self._last_check = trio.current_time()
        self.db_path = db_path
        self.key_path = key_path

    # -- lifecycle --

    @classmethod
    async def open(cls, home: str | os.PathLike[str]) -> SQLiteAccountStore:
        """Open (creating if needed) the store in ``home``, migrating an older schema.

        Raises StoreError if the directory, the key file or the database is unusable.
        """
        home_path = Path(await trio.Path(home).expanduser())
        db, cipher, accounts, version = await trio.to_thread.run_sync(cls._open_sync, home_path)
        return cls(
            db=db,
            cipher=cipher,
            db_path=home_path / STORE_FILENAME,
            key_path=home_path / KEY_FILENAME,
            accounts=accounts,
            data_version=version,
        )

    @staticmethod
    def _open_sync(
        home: Path,
    ) -> tuple[sqlite3.Connection, _TokenCipher, dict[str, Account], int]:
        db_path = home / STORE_FILENAME
        key_path = home / KEY_FILENAME
        try:
            created = not home.exists()
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_data_dir(home, created=created)
            os.close(_open_private(db_path, os.O_RDWR | os.O_CREAT, "store"))
            key = _load_or_create_key(key_path)
        except OSError as exc:
            raise StoreError(f"cannot use the data dir {home}: {exc.strerror}") from None
        cipher = _TokenCipher(key, key_path=key_path, db_path=db_path)
        try:
            db = sqlite3.connect(
                db_path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit: transactions are explicit
                check_same_thread=False,  # one connection, used from worker threads in turn
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {db_path}: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            _migrate(db, db_path)
            cipher.check(db)
            version = _data_version(db)
            accounts = _load_all(db, cipher)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot use {db_path}: {exc}") from None
        except BaseException:
            db.close()
            raise
        return db, cipher, accounts, version

    async def aclose(self) -> None:
        """Close the database. Idempotent; later calls on the store raise StoreError."""
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                await trio.to_thread.run_sync(db.close)

    async def __aenter__(self) -> SQLiteAccountStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.move_on_after(10, shield=True):
            await self.aclose()

    # -- the thread hop --

    async def _call(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(db)`` in a worker thread, one call at a time. Holds the lock."""
        db = self._db
        if db is None:
            raise StoreError("the account store is closed")
        return await trio.to_thread.run_sync(self._guarded, work, db)

    @staticmethod
    def _guarded(work: Callable[[sqlite3.Connection], _T], db: sqlite3.Connection) -> _T:
        try:
            return work(db)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(
                    f"store.db stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s"
                ) from None
            raise StoreError(f"store.db: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"store.db: {exc}") from None

    async def _write(
        self, account_id: str, work: Callable[[sqlite3.Connection], Account]
    ) -> Account:
        """Commit a change to one account, then put the committed row in the cache."""
        async with self._lock:
            try:
                account = await self._call(work)
            except AccountNotFound:
                self._accounts.pop(account_id, None)  # removed by another process
                raise
            except TokenVersionConflict as conflict:
                if conflict.current is not None:  # another process saved newer tokens
                    self._accounts[account_id] = conflict.current
                raise
            self._accounts[account.id] = account
            return account

    # -- reads --

    async def reload_if_changed(self) -> bool:
        """Reload the cache if another process committed to store.db since the last look.

        Returns whether it reloaded. Cancel-safe: the cache is replaced whole or not at all.
        """
        self._last_check = trio.current_time()
        cipher = self._cipher

        def reload(db: sqlite3.Connection, seen: int) -> tuple[int, dict[str, Account]] | None:
            version = _data_version(db)
            if version == seen:
                return None
            return version, _load_all(db, cipher)

        async with self._lock:
            seen = self._data_version
            result = await self._call(lambda db: reload(db, seen))
            if result is None:
                return False
            self._data_version, self._accounts = result
            return True

    async def _maybe_reload(self) -> None:
        if trio.current_time() - self._last_check >= RELOAD_INTERVAL:
            await self.reload_if_changed()

    async def list_accounts(self) -> list[Account]:
        """All accounts, oldest first. Sees another process's writes within about a second."""
        await self._maybe_reload()
        return sorted(self._accounts.values(), key=lambda a: (a.created_at, a.id))

    async def get(self, account_id: str) -> Account:
        """The account, or AccountNotFound (after checking store.db for others' writes)."""
        await self._maybe_reload()
        account = self._accounts.get(account_id)
        if account is None and await self.reload_if_changed():
            account = self._accounts.get(account_id)
        if account is None:
            raise AccountNotFound(account_id)
        return account

    # -- writes --

    async def upsert(self, account: Account) -> tuple[Account, bool]:
        """Add an account, or update the one with the same (chatgpt_account_id, email).

        An update keeps the existing id and created_at, replaces tokens, plan, user id,
        expiry and last refresh, and sets the status back to ACTIVE.
        """
        cipher = self._cipher
        sealed = cipher.seal(account.tokens)
        created = False

        def write(db: sqlite3.Connection) -> Account:
            nonlocal created
            with _write_transaction(db):
                row = db.execute(
                    "SELECT id FROM accounts WHERE chatgpt_account_id = ? AND email = ?",
                    (account.chatgpt_account_id, account.email),
                ).fetchone()
                if row is not None:
                    db.execute(
                        "UPDATE accounts SET chatgpt_user_id = ?, plan = ?, tokens = ?,"
                        " access_expires_at = ?, last_refresh = ?, status = ?,"
                        " status_reason = '', token_version = token_version + 1 WHERE id = ?",
                        (
                            account.chatgpt_user_id,
                            account.plan,
                            sealed,
                            account.access_expires_at,
                            account.last_refresh,
                            AccountStatus.ACTIVE.value,
                            row[0],
                        ),
                    )
                    return _select(db, cipher, row[0])
                if db.execute("SELECT 1 FROM accounts WHERE id = ?", (account.id,)).fetchone():
                    raise StoreError(f"account id {account.id} is already used by another account")
                db.execute(
                    f"INSERT INTO accounts ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                    (
                        account.id,
                        account.email,
                        account.chatgpt_account_id,
                        account.chatgpt_user_id,
                        account.plan,
                        account.status.value,
                        account.status_reason,
                        sealed,
                        account.access_expires_at,
                        account.last_refresh,
                        account.cooldown_until,
                        json.dumps(account.usage.to_json()),
                        account.created_at,
                        1,
                    ),
                )
                created = True
                return _select(db, cipher, account.id)

        stored = await self._write(account.id, write)
        return stored, created

    async def _update(
        self, account_id: str, assignments: str, values: tuple[Any, ...],
        *, expected_version: int | None = None,
    ) -> Account:
        cipher = self._cipher

        def write(db: sqlite3.Connection) -> Account:
            with _write_transaction(db):
                if expected_version is not None:
                    row = db.execute(
                        "SELECT token_version FROM accounts WHERE id = ?", (account_id,)
                    ).fetchone()
                    if row is None:
                        raise AccountNotFound(account_id)
                    if row[0] > expected_version:
                        conflict = TokenVersionConflict(
                            account_id, stored=row[0], expected=expected_version)
                        conflict.current = _select(db, cipher, account_id)
                        raise conflict
                cursor = db.execute(
                    f"UPDATE accounts SET {assignments} WHERE id = ?", (*values, account_id)
                )
                if cursor.rowcount == 0:
                    raise AccountNotFound(account_id)
                return _select(db, cipher, account_id)

        return await self._write(account_id, write)

    async def save_tokens(
        self,
        account_id: str,
        tokens: TokenSet,
        *,
        access_expires_at: float | None,
        last_refresh: float,
        plan: str | None = None,
        expected_version: int | None = None,
    ) -> Account:
        """Persist a new token triple; it is on disk (fsync'd) when this returns.

        With ``expected_version``: refused (TokenVersionConflict) if a newer triple is stored.
        """
        return await self._update(
            account_id,
            "tokens = ?, access_expires_at = ?, last_refresh = ?, plan = COALESCE(?, plan),"
            " token_version = token_version + 1",
            (self._cipher.seal(tokens), access_expires_at, last_refresh, plan or None),
            expected_version=expected_version,
        )

    async def set_status(
        self, account_id: str, status: AccountStatus, reason: str = "",
        *, expected_version: int | None = None,
    ) -> Account:
        """With ``expected_version``: refused (TokenVersionConflict) if a newer triple is stored."""
        return await self._update(
            account_id, "status = ?, status_reason = ?", (AccountStatus(status).value, reason),
            expected_version=expected_version,
        )

    async def set_cooldown(self, account_id: str, until: float | None) -> Account:
        return await self._update(account_id, "cooldown_until = ?", (until,))

    async def set_usage(self, account_id: str, usage: Usage) -> Account:
        return await self._update(account_id, "usage = ?", (json.dumps(usage.to_json()),))

    async def merge_usages(
        self, readings: Mapping[str, Usage], merge: Callable[[Usage, Usage], Usage]
    ) -> None:
        """Merge live usage readings into many accounts in one short transaction (one fsync).

        The merge runs inside the transaction on the stored value, so a reading written
        meanwhile by another writer is never lost to a stale read. Usage is advisory: the
        batch commits with ``synchronous = NORMAL`` so it does not hold the lock for an
        fsync that a cooldown write behind it would have to wait out.
        """
        cipher = self._cipher
        batch = dict(readings)

        def write(db: sqlite3.Connection) -> dict[str, Account]:
            db.execute("PRAGMA synchronous = NORMAL")
            try:
                with _write_transaction(db):
                    for account_id, reading in batch.items():
                        row = db.execute(
                            "SELECT usage FROM accounts WHERE id = ?", (account_id,)
                        ).fetchone()
                        if row is None:
                            continue
                        try:
                            stored = Usage.from_json(json.loads(row[0] or "{}"))
                        except (ValueError, TypeError, AttributeError):
                            stored = Usage()
                        db.execute(
                            "UPDATE accounts SET usage = ? WHERE id = ?",
                            (json.dumps(merge(stored, reading).to_json()), account_id),
                        )
            finally:
                db.execute("PRAGMA synchronous = FULL")
            refreshed: dict[str, Account] = {}
            for account_id in batch:  # the committed rows, for the cache
                try:
                    refreshed[account_id] = _select(db, cipher, account_id)
                except (AccountNotFound, StoreError):
                    pass  # removed meanwhile, or a row _load_all skips too
            return refreshed

        async with self._lock:
            updated = await self._call(write)
            self._accounts.update(updated)

    async def remove(self, account_id: str) -> None:
        def delete(db: sqlite3.Connection) -> int:
            with _write_transaction(db):
                return db.execute("DELETE FROM accounts WHERE id = ?", (account_id,)).rowcount

        async with self._lock:
            deleted = await self._call(delete)
            self._accounts.pop(account_id, None)
        if not deleted:
            raise AccountNotFound(account_id)


@contextlib.asynccontextmanager
async def open_store(home: str | os.PathLike[str]) -> AsyncIterator[SQLiteAccountStore]:
    """``async with open_store(home) as store:`` — opens the store and closes it on exit."""
    store = await SQLiteAccountStore.open(home)
    try:
        yield store
    finally:
        with trio.move_on_after(10, shield=True):
            await store.aclose()


__all__ = [
    "KEY_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STORE_FILENAME",
    "SQLiteAccountStore",
    "StoreError",
    "open_store",
]
