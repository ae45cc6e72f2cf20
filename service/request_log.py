"""The request log: one row per request or WebSocket turn, in its own SQLite file.

Why its own file (``requests.db`` in the data dir, WAL): the account store's writes are
few and must be durable at once; the log's writes are many and may lag a second. Two
files never contend for one lock. Rows are never written on the request path:
``record()`` only appends to a bounded in-memory queue, and one writer task commits the
queue in one transaction per second (or as soon as ``batch_rows`` are waiting). Old rows
are pruned in the background after ``retention_days``.

The same ``record()`` keeps in-memory counters for ``/metrics`` (bounded label sets:
account ids and a capped set of error codes, never emails or keys).
"""

from __future__ import annotations

import bisect
import math
import sqlite3
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from actors.request_record import RequestRecord

FILE_NAME = "requests.db"
DEFAULT_RETENTION_DAYS = 30.0
BATCH_ROWS = 500
FLUSH_INTERVAL = 1.0
MAX_PENDING = 50_000  # rows waiting for the writer; beyond this new rows are dropped and counted
PRUNE_INTERVAL = 3600.0
CLOSE_FLUSH_SECONDS = 5.0
MAX_ERROR_CODES = 64  # distinct error-code labels in /metrics; the rest count as "other"
TTFE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
PAGE_DEFAULT, PAGE_MAX = 50, 500
HOUR, DAY = 3600, 86400

COLUMNS = (
    "started_at", "request_id", "surface", "model", "account_id", "client", "status",
    "terminal", "error_code", "attempts", "failovers", "generation", "ttfe_ms", "duration_ms",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL, request_id TEXT NOT NULL, surface TEXT NOT NULL,
    model TEXT NOT NULL, account_id TEXT NOT NULL, client TEXT NOT NULL,
    status INTEGER NOT NULL, terminal TEXT NOT NULL, error_code TEXT NOT NULL,
    attempts INTEGER NOT NULL, failovers INTEGER NOT NULL, generation INTEGER NOT NULL,
    ttfe_ms REAL, duration_ms REAL NOT NULL,
    input_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    is_error INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started_at);
CREATE INDEX IF NOT EXISTS requests_account ON requests (account_id, started_at);
"""
INSERT = (f"INSERT INTO requests ({', '.join(COLUMNS)}, is_error) "
          f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})")


class QueryError(ValueError):
    """A filter the log cannot apply, explained in one line (the API answers 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestFilter:
    since: float | None = None
    until: float | None = None
    account: str | None = None
    model: str | None = None
    status: str | None = None  # "ok", "error", or an HTTP status like "429"
    before_id: int | None = None  # cursor: rows older than this id
    limit: int = PAGE_DEFAULT


class LogMetrics:
    """Counters for /metrics, updated synchronously as records arrive."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by account
        self.errors: Counter[str] = Counter()  # by error code
        self.tokens: Counter[tuple[str, str]] = Counter()  # (account, kind)
        self.cooldowns: Counter[str] = Counter()  # by account
        self.failovers = 0
        self.ttfe_counts = [0] * (len(TTFE_BUCKETS) + 1)
        self.ttfe_sum = 0.0
        self.rows_written = 0
        self.rows_dropped = 0
        self.write_failures = 0
        self.last_write_lag = 0.0  # seconds from record() to its commit, last batch's oldest row
        self.max_write_lag = 0.0

    def add(self, record: RequestRecord) -> None:
        account = record.account_id or "none"
        self.requests[account] += 1
        if record.is_error:
            code = record.error_code or (f"http_{record.status}" if record.status >= 400
                                         else record.terminal or "error")
            if code not in self.errors and len(self.errors) >= MAX_ERROR_CODES:
                code = "other"
            self.errors[code] += 1
        for kind in ("input", "cached_input", "output", "reasoning"):
            count = getattr(record, f"{kind}_tokens")
            if count:
                self.tokens[(account, kind)] += count
        for cooled in record.cooldown_accounts:
            self.cooldowns[cooled] += 1
        self.failovers += record.failovers
        if record.ttfe_ms is not None:
            seconds = record.ttfe_ms / 1000
            self.ttfe_counts[bisect.bisect_left(TTFE_BUCKETS, seconds)] += 1
            self.ttfe_sum += seconds

    def render(self, pending: int) -> str:
        """Prometheus text for the request counters and the log writer."""
        lines = ["# HELP codex_lb_requests_total Requests and WebSocket turns by account.",
                 "# TYPE codex_lb_requests_total counter"]
        lines += [f'codex_lb_requests_total{{account="{_label(a)}"}} {n}'
                  for a, n in sorted(self.requests.items())]
        lines += ["# HELP codex_lb_request_errors_total Failed requests by error code.",
                  "# TYPE codex_lb_request_errors_total counter"]
        lines += [f'codex_lb_request_errors_total{{code="{_label(c)}"}} {n}'
                  for c, n in sorted(self.errors.items())]
        lines += ["# HELP codex_lb_tokens_total Tokens by account and kind (cached input is part "
                  "of input, reasoning part of output).", "# TYPE codex_lb_tokens_total counter"]
        lines += [f'codex_lb_tokens_total{{account="{_label(a)}",kind="{k}"}} {n}'
                  for (a, k), n in sorted(self.tokens.items())]
        lines += ["# HELP codex_lb_failovers_total Attempts that failed over before the first "
                  "byte.", "# TYPE codex_lb_failovers_total counter",
                  f"codex_lb_failovers_total {self.failovers}",
                  "# HELP codex_lb_account_cooldowns_total Cooldowns started by requests that "
                  "hit a usage limit, by account.",
                  "# TYPE codex_lb_account_cooldowns_total counter"]
        lines += [f'codex_lb_account_cooldowns_total{{account="{_label(a)}"}} {n}'
                  for a, n in sorted(self.cooldowns.items())]
        lines += ["# HELP codex_lb_ttfe_seconds Time from the request to its first event.",
                  "# TYPE codex_lb_ttfe_seconds histogram"]
        running = 0
        for bound, count in zip((*TTFE_BUCKETS, math.inf), self.ttfe_counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else f"{bound:g}"
            lines.append(f'codex_lb_ttfe_seconds_bucket{{le="{le}"}} {running}')
        lines += [f"codex_lb_ttfe_seconds_sum {self.ttfe_sum:.6f}",
                  f"codex_lb_ttfe_seconds_count {running}",
                  "# HELP codex_lb_request_log_write_lag_seconds Age of the oldest row of the "
                  "last committed batch when it was committed.",
                  "# TYPE codex_lb_request_log_write_lag_seconds gauge",
                  f"codex_lb_request_log_write_lag_seconds {self.last_write_lag:.6f}",
                  "# HELP codex_lb_request_log_write_lag_max_seconds Largest write lag seen.",
                  "# TYPE codex_lb_request_log_write_lag_max_seconds gauge",
                  f"codex_lb_request_log_write_lag_max_seconds {self.max_write_lag:.6f}",
                  "# HELP codex_lb_request_log_pending_rows Rows waiting for the log writer.",
                  "# TYPE codex_lb_request_log_pending_rows gauge",
                  f"codex_lb_request_log_pending_rows {pending}",
                  "# HELP codex_lb_request_log_rows_total Rows committed, dropped (queue full) "
                  "or lost to a failed write.",
                  "# TYPE codex_lb_request_log_rows_total counter",
                  f'codex_lb_request_log_rows_total{{outcome="written"}} {self.rows_written}',
                  f'codex_lb_request_log_rows_total{{outcome="dropped"}} {self.rows_dropped}',
                  f'codex_lb_request_log_rows_total{{outcome="failed"}} {self.write_failures}']
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _row(record: RequestRecord) -> tuple[Any, ...]:
    return (*(getattr(record, c) for c in COLUMNS), int(record.is_error))


class RequestLog:
    """The log's writer and reader. ``record`` is sync and never waits; ``run`` writes."""

    def __init__(
        self, path: Path, *, retention_days: float = DEFAULT_RETENTION_DAYS,
        batch_rows: int = BATCH_ROWS, flush_interval: float = FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING, wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.metrics = LogMetrics()
        self._wall_clock = wall_clock
        # (trio time when recorded, record); bounded by max_pending.
        self._pending: deque[tuple[float, RequestRecord]] = deque()
        self._wake = trio.Event()
        self._db_limiter = trio.CapacityLimiter(1)  # one connection, one thread at a time
        self._db: sqlite3.Connection | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def _open_db(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost last second of log is acceptable
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            return db

        try:
            self._db = await trio.to_thread.run_sync(connect, limiter=self._db_limiter)
        except (sqlite3.Error, OSError) as exc:
            from service.store import StoreError

            reason = getattr(exc, "strerror", None) or str(exc)
            raise StoreError(f"the request log {self.path} cannot be opened ({reason}); "
                             "check the data directory (storage.home)") from None

    async def run(
        self, *, task_status: trio.TaskStatus[RequestLog] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write batches until cancelled, then flush what is left (bounded) and close.

        Cancel-safe: rows recorded before the cancel are committed within
        CLOSE_FLUSH_SECONDS, or counted as failed.
        """
        if self._db is None:
            await self._open_db()
        task_status.started(self)
        next_prune = trio.current_time()
        try:
            while True:
                if trio.current_time() >= next_prune:
                    await self.prune()
                    next_prune = trio.current_time() + PRUNE_INTERVAL
                with trio.move_on_after(self.flush_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.move_on_after(CLOSE_FLUSH_SECONDS, shield=True):
                await self.flush()
                await self._close_db()

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await trio.to_thread.run_sync(db.close, limiter=self._db_limiter)

    # --- writing ---------------------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        """Queue one row and count it; never blocks, never raises (the request is done)."""
        self.metrics.add(record)
        if len(self._pending) >= self.max_pending:
            self.metrics.rows_dropped += 1
            return
        self._pending.append((trio.current_time(), record))
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Commit every queued row in one transaction; the number written."""
        if not self._pending or self._db is None:
            return 0
        batch = list(self._pending)
        self._pending.clear()
        rows = [_row(record) for _, record in batch]
        db = self._db

        def write() -> None:
            with db:  # one transaction for the batch
                db.execute("BEGIN")
                db.executemany(INSERT, rows)

        try:
            await trio.to_thread.run_sync(write, limiter=self._db_limiter)
        except sqlite3.Error:
            # A disk error must not crash the server: the rows are lost and counted.
            self.metrics.write_failures += len(rows)
            return 0
        lag = trio.current_time() - batch[0][0]
        self.metrics.last_write_lag = lag
        self.metrics.max_write_lag = max(self.metrics.max_write_lag, lag)
        self.metrics.rows_written += len(rows)
        return len(rows)

    async def prune(self) -> int:
        """Delete rows older than the retention; the number deleted."""
        if self._db is None or self.retention_days <= 0:
            return 0
        cutoff = self._wall_clock() - self.retention_days * DAY
        db = self._db

        def delete() -> int:
            with db:
                db.execute("BEGIN")
                return db.execute("DELETE FROM requests WHERE started_at < ?", (cutoff,)).rowcount

        try:
            return int(await trio.to_thread.run_sync(delete, limiter=self._db_limiter))
        except sqlite3.Error:
            return 0

    # --- reading ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = self._db
        if db is None:
            return []
        return await trio.to_thread.run_sync(
            lambda: db.execute(sql, params).fetchall(), limiter=self._db_limiter)

    async def query(self, filters: RequestFilter) -> dict[str, Any]:
        """Newest first; ``next_cursor`` pages to older rows (None on the last page)."""
        where, params = _where(filters)
        if filters.before_id is not None:
            where.append("id < ?")
            params.append(filters.before_id)
        limit = max(1, min(filters.limit, PAGE_MAX))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT id, {', '.join(COLUMNS)} FROM requests {clause} ORDER BY id DESC LIMIT ?",
            (*params, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        items = [{"id": row[0], **dict(zip(COLUMNS, row[1:], strict=True))} for row in rows]
        return {"requests": items, "next_cursor": str(rows[-1][0]) if more and rows else None}

    async def history(self, *, now: float | None = None) -> dict[str, Any]:
        """Requests, errors and tokens per hour for 24 h and per day (UTC) for 30 d."""
        now = self._wall_clock() if now is None else now
        return {
            "hourly": await self._series(step=HOUR, count=24, now=now),
            "daily": await self._series(step=DAY, count=30, now=now),
        }

    async def _series(self, *, step: int, count: int, now: float) -> dict[str, Any]:
        last = int(now // step) * step
        first = last - (count - 1) * step
        rows = await self._read(
            "SELECT CAST(started_at / ? AS INTEGER) * ? AS bucket, account_id, COUNT(*), "
            "SUM(is_error), SUM(input_tokens + output_tokens) FROM requests "
            "WHERE started_at >= ? GROUP BY bucket, account_id", (step, step, first))
        buckets = [first + i * step for i in range(count)]
        index = {b: i for i, b in enumerate(buckets)}

        def empty() -> dict[str, list[int]]:
            return {"requests": [0] * count, "errors": [0] * count, "tokens": [0] * count}

        total = empty()
        accounts: dict[str, dict[str, list[int]]] = {}
        for bucket, account, requests, errors, tokens in rows:
            i = index.get(int(bucket))
            if i is None:
                continue
            series = accounts.setdefault(account or "none", empty())
            for target in (series, total):
                target["requests"][i] += requests
                target["errors"][i] += errors or 0
                target["tokens"][i] += tokens or 0
        return {"step": step, "buckets": buckets, "total": total, "accounts": accounts}

    async def last_errors(self) -> dict[str, dict[str, Any]]:
        """Each account's most recent failed request: its code and time."""
        rows = await self._read(
            "SELECT account_id, error_code, status, terminal, MAX(started_at) FROM requests "
            "WHERE is_error = 1 AND started_at >= ? GROUP BY account_id",
            (self._wall_clock() - self.retention_days * DAY if self.retention_days else 0,))
        return {account: {"code": code or (f"http_{status}" if status >= 400 else terminal),
                          "at": at}
                for account, code, status, terminal, at in rows if account}

    async def summary(self, *, since: float, until: float | None = None) -> dict[str, Any]:
        """Totals per account since a time, plus TTFE percentiles (for status and the page)."""
        until = self._wall_clock() if until is None else until
        rows = await self._read(
            "SELECT account_id, COUNT(*), SUM(is_error), SUM(input_tokens), "
            "SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(failovers) "
            "FROM requests WHERE started_at >= ? AND started_at < ? GROUP BY account_id",
            (since, until))
        accounts = {
            account or "none": {
                "requests": n, "errors": e or 0, "input_tokens": i or 0,
                "cached_input_tokens": c or 0, "output_tokens": o or 0, "reasoning_tokens": r or 0,
                "failovers": f or 0,
            }
            for account, n, e, i, c, o, r, f in rows
        }
        ttfe = [row[0] for row in await self._read(
            "SELECT ttfe_ms FROM requests WHERE started_at >= ? AND started_at < ? "
            "AND ttfe_ms IS NOT NULL ORDER BY ttfe_ms", (since, until))]
        total = {key: sum(a[key] for a in accounts.values())
                 for key in ("requests", "errors", "input_tokens", "cached_input_tokens",
                             "output_tokens", "reasoning_tokens", "failovers")}
        return {
            "since": since, "until": until, "accounts": accounts, "total": total,
            "error_rate": total["errors"] / total["requests"] if total["requests"] else 0.0,
            "ttfe_ms": {f"p{p}": _percentile(ttfe, p) for p in (50, 90, 99)},
        }


def _percentile(sorted_values: list[float], p: int) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return round(sorted_values[rank], 1)


def _where(filters: RequestFilter) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if filters.since is not None:
        where.append("started_at >= ?")
        params.append(filters.since)
    if filters.until is not None:
        where.append("started_at < ?")
        params.append(filters.until)
    if filters.account:
        where.append("account_id = ?")
        params.append(filters.account)
    if filters.model:
        where.append("model = ?")
        params.append(filters.model)
    status = (filters.status or "").strip().lower()
    if status == "error":
        where.append("is_error = 1")
    elif status == "ok":
        where.append("is_error = 0")
    elif status:
        if not status.isdigit():
            raise QueryError("status must be ok, error or an HTTP status like 429")
        where.append("status = ?")
        params.append(int(status))
    return where, params


def record_json(record: RequestRecord) -> dict[str, Any]:
    return asdict(record)


@asynccontextmanager
async def open_request_log(
    home: Path, *, retention_days: float = DEFAULT_RETENTION_DAYS, **options: Any,
) -> AsyncIterator[RequestLog]:
    """Open ``<home>/requests.db`` and run its writer until the block ends (then flush)."""
    log = RequestLog(home / FILE_NAME, retention_days=retention_days, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        try:
            yield log
        finally:
            nursery.cancel_scope.cancel()
