"""One hedge for a streamed call whose response headers are late.

A request written onto a pooled connection whose path vanished waits for headers that
will never come, and nothing on our side can tell that from an upstream that is still
thinking. Rather than guess, after ``lease.hedge_after`` seconds (2 s, or 3× the recent
p99 header latency if larger) the same request starts once more on a fresh generation
(``rotate(reason=hedge)``, coalesced like any rotation); the first to answer wins and the
other is cancelled, which closes its connection. The manager hears the outcome
(``HedgeDone``): a hedge that won on a fresh generation is the corroboration that marks the
original generation dead; an original that won says the upstream was slow, and nothing
is marked.

Usage, keeping the caller's lease handling as it was::

    with Hedge(clients, lease) as hedge:
        response = await hedge.send(build_request)      # build_request(lease) -> Request
        lease = hedge.lease                              # the winner's lease
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

import httpx
import trio

from actors.client_manager import CLOSE_GRACE, ClientHandle, Lease
from actors.errors import CodexLBError
from actors.messages import HedgeDone, RotationReason

log = logging.getLogger("codex_lb_trio.hedge")

RequestBuilder = Callable[[Lease], httpx.Request]


class Hedge:
    """At most one hedge for one request; holds the hedge's lease until ``__exit__``."""

    def __init__(self, clients: ClientHandle, lease: Lease) -> None:
        self._clients = clients
        self._original = lease
        self.lease = lease  # the winner's, once ``send`` returned
        self._hedge_lease: Lease | None = None

    def __enter__(self) -> Hedge:
        return self

    async def __aenter__(self) -> Hedge:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hedge_lease is not None:
            self._hedge_lease.release()

    async def send(
        self, build: RequestBuilder, *, header_timeout: float | None = None, hedge: bool = True
    ) -> httpx.Response:
        """Send ``build(lease)``; after ``hedge_after`` without headers, race one hedge.

        Raises the original's error (TransportError, or any CodexLBError) if every attempt
        failed. Cancel-safe: every
        attempt still waiting is cancelled (closing its connection); a response that lost
        the race is closed.
        """
        original = self._original
        if not hedge or original.hedge_after == float("inf"):
            return await original.send(build(original), header_timeout=header_timeout)
        winner: list[tuple[httpx.Response, Lease, str]] = []
        errors: dict[str, CodexLBError] = {}
        running = {"count": 0}
        settled = trio.Event()
        hedge_generation: list[int] = []

        async def attempt(name: str, lease: Lease, scope: trio.CancelScope) -> None:
            try:
                response = await lease.send(build(lease), header_timeout=header_timeout)
            except CodexLBError as exc:  # kept, so the caller sees it plain, not grouped
                errors[name] = exc
                running["count"] -= 1
                if running["count"] == 0:
                    settled.set()
                return
            if winner:  # lost the race by a hair: close it, keep the first
                with trio.move_on_after(CLOSE_GRACE, shield=True):
                    await response.aclose()
                return
            winner.append((response, lease, name))
            settled.set()
            scope.cancel()

        async def start_hedge(scope: trio.CancelScope) -> None:
            with trio.move_on_after(original.hedge_after):
                await settled.wait()
            if settled.is_set():
                return
            hedge_lease = await self._hedge_lease_for(original)
            if hedge_lease is not None and not settled.is_set():
                hedge_generation.append(hedge_lease.generation)
                log.info("hedge host=%s generation=%d->%d after %.1fs without headers",
                         original.settings.host, original.generation,
                         hedge_lease.generation, original.hedge_after)
                running["count"] += 1
                await attempt("hedge", hedge_lease, scope)

        sent_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            # The original goes out from this task at once (no task to start first); the
            # hedge's timer runs beside it.
            running["count"] += 1
            nursery.start_soon(start_hedge, nursery.cancel_scope)
            await attempt("original", original, nursery.cancel_scope)
            await settled.wait()
            nursery.cancel_scope.cancel()
        if hedge_generation:
            won_by = winner[0][2] if winner else "none"
            original.note(HedgeDone(original=original.generation, hedge=hedge_generation[0],
                                    winner=won_by, sent_at=sent_at))
        if winner:
            response, self.lease, _ = winner[0]
            return response
        raise errors.get("original") or errors["hedge"]

    async def _hedge_lease_for(self, original: Lease) -> Lease | None:
        try:
            await self._clients.rotate(seen_generation=original.generation,
                                       reason=RotationReason.HEDGE)
            self._hedge_lease = await self._clients.acquire()
        except Exception as exc:  # no hedge is no worse than before: the original still runs
            log.info("no hedge for generation=%d: %s", original.generation, exc)
            return None
        return self._hedge_lease
