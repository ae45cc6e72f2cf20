"""Live usage readings, coalesced per account and written off the request path.

Every streamed response carries usage (``x-codex-*`` headers, ``codex.rate_limits``
events); writing each reading as its own durable transaction would put one fsync per
response in front of the writes that matter (a cooldown during failover). The
ProxyHandler owns one ``UsageWriter``: ``note()`` is synchronous and never waits, the
latest reading per account wins (merged window by window), and ``run()`` writes whatever
gathered in one transaction per ``interval``. ``flush()`` writes what is pending now
(the ProxyHandler calls it, bounded, when it stops).

Usage is advisory: a failed batch is logged and its readings are kept for the next one
(newer readings win over them), so a flaky disk delays usage, never a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from actors.accounts import AccountStore, Usage

log = logging.getLogger("codex_lb_trio.usage")

WRITE_INTERVAL = 1.0  # seconds between batches (readings within one interval coalesce)


class UsageWriter:
    """Coalesces readings per account; one store write per interval. Not an actor: a part
    of the ProxyHandler, running as one task in its nursery."""

    def __init__(
        self, store: AccountStore, merge: Callable[[Usage, Usage], Usage], *,
        interval: float = WRITE_INTERVAL,
    ) -> None:
        self._store = store
        self._merge = merge
        self._interval = interval
        self._pending: dict[str, Usage] = {}  # at most one reading per account
        self._wake = trio.Event()
        self.batches = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def note(self, account_id: str, usage: Usage) -> None:
        """Record a reading; it reaches the store within about one interval. Never waits."""
        previous = self._pending.get(account_id)
        self._pending[account_id] = usage if previous is None else self._merge(previous, usage)
        self._wake.set()

    async def run(self) -> None:
        """Write batches until cancelled (what is pending then is for ``flush``)."""
        while True:
            await self._wake.wait()
            await trio.sleep(self._interval)  # let readings of this interval coalesce
            await self.flush()

    async def flush(self) -> None:
        """Write every pending reading in one transaction. Cancel-safe: a batch whose write
        did not finish goes back to pending (the store applies a write whole or not at all)."""
        self._wake = trio.Event()
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        written = False
        try:
            await self._store.merge_usages(batch, self._merge)
            written = True
            self.batches += 1
        except Exception as exc:  # advisory: keep the readings for the next batch
            self.failures += 1
            log.warning("usage write of %d account(s) failed (kept for the next batch): %s",
                        len(batch), exc)
        finally:
            if not written:
                self._restore(batch)

    def _restore(self, batch: dict[str, Usage]) -> None:
        for account_id, reading in batch.items():
            newer = self._pending.get(account_id)
            self._pending[account_id] = reading if newer is None else self._merge(reading, newer)
        self._wake.set()
