"""The TokenRefresher actor: keeps every account's access token fresh.

* ``ensure_fresh(account_id, force=False)`` answers the account's tokens, refreshing
  first if the access token is inside the margin (or ``force``). Single flight: while
  one refresh of an account is under way, every other caller waits for its result.
* A background loop refreshes each account ``token_margin`` (+ a per-token jitter)
  before its access token's ``exp``; refreshes of different accounts start at least
  ``token_spacing`` apart, because sibling refreshes in a burst have been seen to
  invalidate each other upstream.
* Refresh tokens are single use. The new triple is the truth from the moment the
  server answered: it is kept in memory (``_pending``) and written to the store before
  anyone is told; if that write fails it is retried in the background with backoff while
  every caller (and the next refresh) uses the in-memory triple, so the old refresh token
  is never presented again. The exchange runs under a bounded shield so shutdown cannot
  cut it between the upstream's answer and the write.
* A refresh request that may have reached the server is never replayed on a short
  timeout: the token endpoint gets a long header timeout (``header_timeout``, 60 s); a
  failure after the request may have been sent (no headers in time, a broken body, the
  exchange bound) leaves its outcome unknown, and no new refresh of that account starts
  before a backoff (callers keep the current access token while it is valid). Only a
  failure before the request was sent (connect) rotates the client (compare-and-swap on
  the lease's generation) and retries at once, unless every caller waiting for that
  refresh asked ``rotate_on_transport=False`` (a caller that keeps its own rotation
  budget).
* Every token write names the token version it is based on: a newer login saved by the
  CLI meanwhile wins over both a refreshed triple and a ``reauth_required`` verdict about
  the older one.
* A permanent code marks the account ``reauth_required``/``deactivated`` and is never
  retried; anything else backs off with the status unchanged. Concurrent callers share
  one refresh, forced or not; a forced refresh for an access token that has already been
  replaced is not made at all.
* A store that fails answers the caller at once and never stops the actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

import trio

from actors.accounts import (
    Account,
    AccountNotFound,
    AccountStatus,
    AccountStore,
    StoreFailure,
    TokenSet,
    TokenVersionConflict,
    identity_from_id_token,
    token_expiry,
    token_fingerprint,
)
from actors.client_manager import ClientHandle
from actors.errors import (
    ActorUnavailable,
    ClientError,
    CodexLBError,
    InvalidResponse,
    PermanentAuth,
    Phase,
    TransportError,
    classify,
    from_status,
)
from actors.messages import (
    EnsureFresh,
    FreshTokens,
    RefreshDone,
    RotationReason,
    ShutdownRefresher,
    TokenRefresherMessage,
    answer,
    call,
    close_inbox,
)

log = logging.getLogger("codex_lb_trio.tokens")

OAUTH_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
REFRESH_SCOPE = "openid profile email"
INBOX_SIZE = 64
TOKEN_HEADER_TIMEOUT = 60.0  # the token endpoint's answer may be slow; a refresh is not replayable
BODY_AND_WRITE_BOUND = 30.0  # after the headers: the body and the first durable write
EXCHANGE_BOUND = TOKEN_HEADER_TIMEOUT + BODY_AND_WRITE_BOUND  # shielded ceiling on one exchange
RESCAN_INTERVAL = 60.0  # the background loop looks for new accounts at least this often
BACKOFF_INITIAL, BACKOFF_MAX = 30.0, 600.0
WRITE_RETRY_INITIAL, WRITE_RETRY_MAX = 1.0, 60.0  # a token write the store refused
REFRESHABLE = frozenset({AccountStatus.ACTIVE, AccountStatus.PAUSED, AccountStatus.COOLING_DOWN})


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshSettings:
    auth_base_url: str = "https://auth.openai.com"
    margin: float = 600.0
    spacing: float = 2.0
    jitter: float = 30.0
    header_timeout: float = TOKEN_HEADER_TIMEOUT

    @property
    def exchange_bound(self) -> float:
        return self.header_timeout + BODY_AND_WRITE_BOUND

    @classmethod
    def from_config(cls, config: Any) -> RefreshSettings:
        return cls(
            auth_base_url=config.upstream.auth_base_url,
            margin=config.refresh.token_margin,
            spacing=config.refresh.token_spacing,
            jitter=config.refresh.token_jitter,
            header_timeout=getattr(config.upstream, "token_header_timeout", TOKEN_HEADER_TIMEOUT),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _PendingWrite:
    """A triple the server gave us that the store has not saved yet: the account's truth."""

    account: Account  # with the new tokens; its token_version is what it will be once saved
    base_version: int  # the stored version the write is based on


class TokenHandle:
    """Talk to the TokenRefresher."""

    def __init__(
        self, inbox: trio.MemorySendChannel[TokenRefresherMessage], timeout: float,
        shutdown_timeout: float = EXCHANGE_BOUND + 5,
    ) -> None:
        self._inbox = inbox
        self._timeout = timeout
        self._shutdown_timeout = shutdown_timeout

    async def ensure_fresh(
        self, account_id: str, *, force: bool = False, rotate_on_transport: bool = True,
        rejected_access_token: str | None = None,
    ) -> FreshTokens:
        """The account with tokens valid for at least the margin (refreshed if needed).

        Raises PermanentAuth if the account needs a new login, TransportError if the
        auth server could not be reached even after one rotation, other CodexLBErrors
        for other failures. With ``rotate_on_transport=False`` the first transport
        failure is raised as is (its ``generation`` says which client failed) and the
        caller decides whether to rotate; a refresh shared with a caller that does want
        the rotation still rotates. ``rejected_access_token`` (with ``force``) is the token
        the upstream just refused: if the account's token has changed since, the current
        one is answered without another refresh. Cancel-safe: a cancelled caller leaves the
        refresh running for the others.
        """
        rejected = token_fingerprint(rejected_access_token) if rejected_access_token else None
        result: FreshTokens = await call(
            self._inbox,
            lambda r: EnsureFresh(account_id=account_id, force=force, reply=r,
                                  rotate_on_transport=rotate_on_transport,
                                  rejected_token_id=rejected),
            actor="token refresher",
            timeout=self._timeout,
        )
        return result

    @property
    def shutdown_timeout(self) -> float:
        """How long an orderly stop may take: a refresh in flight finishes and is written."""
        return self._shutdown_timeout

    async def shutdown(self) -> None:
        try:
            await call(self._inbox, lambda r: ShutdownRefresher(reply=r), actor="token refresher",
                       timeout=self._shutdown_timeout)
        except ActorUnavailable:
            pass


class TokenRefresher:
    def __init__(
        self,
        *,
        store: AccountStore,
        clients: ClientHandle,
        settings: RefreshSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        background: bool = True,
    ) -> None:
        self._store = store
        self._clients = clients
        self.settings = settings or RefreshSettings()
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._background = background
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[TokenRefresherMessage](
            INBOX_SIZE
        )
        self._waiters: dict[str, list[trio.MemorySendChannel[Any]]] = {}
        # Per refresh in flight: may a transport failure rotate the client and retry?
        self._may_rotate: dict[str, bool] = {}
        self._next_slot = -float("inf")
        self._jitter: dict[tuple[str, float | None], float] = {}
        self._retry_at: dict[str, tuple[float, float]] = {}  # account -> (trio time, backoff)
        # A refresh that may have reached the server failed: none before this trio time.
        self._unknown_until: dict[str, float] = {}
        # Triples the store has not saved yet (they survive a restart of the actor).
        self._pending: dict[str, _PendingWrite] = {}
        self._writers: set[str] = set()  # accounts whose pending write is being retried
        self.refreshes = 0  # upstream refresh calls that got an answer
        self.write_failures = 0  # token writes the store refused (then retried)

    def close(self) -> None:
        """The actor is gone for good: queued and later requests fail at once."""
        close_inbox(self._inbox_recv)

    def handle(self) -> TokenHandle:
        bound = self.settings.exchange_bound
        timeout = bound * 2 + self.settings.spacing * 16
        return TokenHandle(self._inbox_send.clone(), timeout, shutdown_timeout=bound + 10)

    async def run(self, *, task_status: trio.TaskStatus[TokenHandle] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._writers.clear()
                for account_id in self._pending:  # writes a previous incarnation left unfinished
                    self._start_writer(account_id)
                if self._background:
                    nursery.start_soon(self._background_loop)
                task_status.started(self.handle())
                async for message in self._inbox_recv:
                    match message:
                        case EnsureFresh():
                            await self._on_ensure_fresh(message)
                        case RefreshDone():
                            self._on_done(message)
                        case ShutdownRefresher():
                            with message.reply:
                                await self._finish_exchanges()
                                await self._flush_pending()
                                answer(message.reply, None)
                            nursery.cancel_scope.cancel()
                            break
                        case _:
                            assert_never(message)
        finally:
            # Waiters of a dead incarnation learn at once (their channels close).
            for waiters in self._waiters.values():
                for reply in waiters:
                    reply.close()
            self._waiters.clear()
            self._may_rotate.clear()

    async def _finish_exchanges(self) -> None:
        """Let exchanges under way write their tokens; refuse new requests meanwhile."""
        with trio.move_on_after(self.settings.exchange_bound + self.settings.spacing):
            while self._waiters:
                message = await self._inbox_recv.receive()
                match message:
                    case RefreshDone():
                        self._on_done(message)
                    case EnsureFresh() | ShutdownRefresher():
                        with message.reply:
                            answer(message.reply, ActorUnavailable("the token refresher is stopping"))
                    case _:
                        assert_never(message)

    # --- requests -------------------------------------------------------------------

    async def _on_ensure_fresh(self, message: EnsureFresh) -> None:
        if message.account_id in self._waiters:
            # Single flight, forced or not: a 401 caller joins the refresh under way.
            self._waiters[message.account_id].append(message.reply)
            if message.rotate_on_transport:
                self._may_rotate[message.account_id] = True
            return
        with message.reply:  # closed on every way out: a caller never waits for a deadline
            try:
                reply = self._answer_or_refresh(message, await self._current(message.account_id))
            except AccountNotFound:
                answer(message.reply,
                       ClientError(f"no account with id {message.account_id}", status=404))
            except Exception as exc:  # the store failed: this caller's error, not the actor's
                log.warning("token lookup account=%s failed: %s", message.account_id, exc)
                answer(message.reply, _lookup_error(exc))
            else:
                if reply is not None:
                    answer(message.reply, reply)

    def _answer_or_refresh(self, message: EnsureFresh, account: Account) -> Any:
        """The answer for ``message`` given ``account``, or None once a refresh is started."""
        if account.status in (AccountStatus.REAUTH_REQUIRED, AccountStatus.DEACTIVATED):
            return PermanentAuth(
                f"account {account.id} needs a new login ({account.status_reason or account.status})",
                status=401, code=account.status_reason or str(account.status))
        current = FreshTokens(account=account, tokens=account.tokens)
        now = self._wall_clock()
        if message.force and message.rejected_token_id is not None and (
            token_fingerprint(account.tokens.access_token) != message.rejected_token_id
        ):
            return current  # refreshed since the caller's 401: use the new token
        if not message.force and not self._due(account, now):
            return current
        unknown_until = self._unknown_until.get(account.id)
        if unknown_until is not None and trio.current_time() < unknown_until:
            # The last refresh may have reached the server: do not replay it yet.
            if account.access_expires_at is None or account.access_expires_at > now:
                return current
            return TransportError(
                f"the last token refresh of account {account.id} has an unknown outcome; "
                f"next try in {unknown_until - trio.current_time():.0f}s",
                phase=Phase.HEADERS)
        self._start_refresh(account, [message.reply.clone()],
                            may_rotate=message.rotate_on_transport)
        return None

    async def _current(self, account_id: str) -> Account:
        """The account as we know it: a triple not yet saved is the truth over the store."""
        pending = self._pending.get(account_id)
        stored = await self._store.get(account_id)
        if pending is None:
            return stored
        if stored.token_version > pending.base_version:
            return stored  # a newer login replaced the account's tokens meanwhile
        return dataclasses.replace(pending.account, status=stored.status,
                                   status_reason=stored.status_reason,
                                   cooldown_until=stored.cooldown_until, usage=stored.usage)

    def _start_refresh(
        self,
        account: Account,
        waiters: list[trio.MemorySendChannel[Any]],
        *,
        may_rotate: bool = True,
    ) -> None:
        self._waiters[account.id] = waiters
        self._may_rotate[account.id] = may_rotate
        now = trio.current_time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self.settings.spacing
        self._nursery.start_soon(self._refresh_task, account, slot)

    def _on_done(self, done: RefreshDone) -> None:
        self._may_rotate.pop(done.account_id, None)
        if isinstance(done.result, FreshTokens):
            self._unknown_until.pop(done.account_id, None)
        for reply in self._waiters.pop(done.account_id, []):
            with reply:
                answer(reply, done.result)

    def _due(self, account: Account, now: float) -> bool:
        if account.access_expires_at is None:
            return False  # no expiry known: refresh only on demand (a 401)
        return account.access_expires_at - now <= self.settings.margin

    # --- the exchange -----------------------------------------------------------------

    async def _refresh_task(self, account: Account, slot: float) -> None:
        await trio.sleep_until(slot)
        try:
            result: FreshTokens | CodexLBError = await self._refresh(account)
        except CodexLBError as exc:
            result = exc
        except AccountNotFound:
            result = ClientError(f"account {account.id} was removed during its refresh", status=404)
        except Exception as exc:  # e.g. the store failed: report it, keep the actor
            log.error("token refresh account=%s failed unexpectedly", account.id, exc_info=exc)
            result = _lookup_error(exc) if isinstance(exc, StoreFailure) else classify(exc)
        self._schedule_retry(account.id, result)
        await self._inbox_send.send(RefreshDone(account_id=account.id, result=result))

    async def _refresh(self, account: Account) -> FreshTokens:
        rotated = False
        while True:
            async with self._clients.lease() as lease:
                try:
                    fresh = await self._bounded_exchange(account, lease)
                    return dataclasses.replace(fresh, rotated=rotated)
                except (TransportError, InvalidResponse) as exc:
                    if not isinstance(exc, TransportError) or exc.phase is not Phase.CONNECT:
                        # The request may have reached the server, which may have rotated the
                        # token: replaying it now could present a spent token. Back off.
                        self._outcome_unknown(account.id)
                        wait = self._unknown_until[account.id] - trio.current_time()
                        log.warning("token refresh account=%s outcome unknown generation=%d: %s; "
                                    "not replaying it for %.0fs", account.id, lease.generation,
                                    exc.message, wait)
                        if rotated:
                            exc.rotated_by_refresher = True  # type: ignore[union-attr]
                        raise
                    if rotated:
                        exc.rotated_by_refresher = True  # type: ignore[attr-defined]
                        log.warning("token refresh account=%s error=transport retry=failed "
                                    "generation=%d: %s", account.id, lease.generation, exc.message)
                        raise
                    if not self._may_rotate.get(account.id, True):
                        log.debug("token refresh account=%s error=transport generation=%d "
                                  "(the caller rotates): %s", account.id, lease.generation,
                                  exc.message)
                        raise
                    seen, path_dead = lease.generation, exc.path_dead
            rotated = True
            new = await self._clients.rotate(  # only a failed connect gets here
                seen_generation=seen, reason=RotationReason.TRANSPORT, path_dead=path_dead,
                phase=Phase.CONNECT,
            )
            log.info("token refresh account=%s error=transport rotated generation=%d->%d",
                     account.id, seen, new)

    def _outcome_unknown(self, account_id: str) -> None:
        _, backoff = self._retry_at.get(account_id, (0.0, BACKOFF_INITIAL / 2))
        self._unknown_until[account_id] = trio.current_time() + min(backoff * 2, BACKOFF_MAX)

    async def _bounded_exchange(self, account: Account, lease: Any) -> FreshTokens:
        # Shielded: once the upstream has answered, the old refresh token is dead, so
        # nothing may cut us off before the new one is written (or kept in memory).
        bound = self.settings.exchange_bound
        with trio.move_on_after(bound, shield=True):
            return await self._exchange(account, lease)
        raise TransportError(f"refresh exchange exceeded {bound:g}s",
                             phase=Phase.HEADERS, generation=lease.generation)

    async def _exchange(self, account: Account, lease: Any) -> FreshTokens:
        request = lease.client.build_request(
            "POST",
            f"{self.settings.auth_base_url.rstrip('/')}/oauth/token",
            json={
                "grant_type": "refresh_token",
                "client_id": OAUTH_CLIENT_ID,
                "refresh_token": account.tokens.refresh_token,
                "scope": REFRESH_SCOPE,
            },
            headers={"accept": "application/json"},
        )
        started = trio.current_time()
        response = await lease.send(request, header_timeout=self.settings.header_timeout)
        try:
            raw = await response.aread()
        except Exception as exc:
            raise classify(exc, phase=Phase.BODY, generation=lease.generation) from exc
        finally:
            await response.aclose()
        self.refreshes += 1
        body = _json_or_none(raw)
        now = self._wall_clock()
        if response.status_code != 200:
            err = from_status(response.status_code, body, now=now)
            if isinstance(err, PermanentAuth):
                status = AccountStatus.DEACTIVATED if err.deactivated else AccountStatus.REAUTH_REQUIRED
                try:
                    await self._store.set_status(account.id, status, err.code,
                                                 expected_version=self._base_version(account))
                except TokenVersionConflict:
                    # The CLI saved a newer login meanwhile: the verdict was about the old one.
                    self._pending.pop(account.id, None)
                    log.warning("token refresh account=%s error=%s for an older login; the newer "
                                "login stays", account.id, err.code)
                    newer = await self._store.get(account.id)
                    return FreshTokens(account=newer, tokens=newer.tokens)
                except Exception as exc:  # the verdict stands even if it could not be saved
                    log.error("token refresh account=%s status %s not saved: %s", account.id,
                              status, exc)
                self._pending.pop(account.id, None)  # that triple is dead upstream
                log.warning("token refresh account=%s error=%s: status -> %s (log in again)",
                            account.id, err.code, status)
            else:
                log.warning("token refresh account=%s error=http_%d code=%s",
                            account.id, response.status_code, err.code)
            raise err
        tokens = _tokens_from(body)
        identity = identity_from_id_token(tokens.id_token)
        plan = identity.plan if identity.plan != "unknown" else None
        base = self._base_version(account)
        # From here the new triple is the truth, whatever the store does.
        self._pending[account.id] = _PendingWrite(
            account=dataclasses.replace(
                account, tokens=tokens, last_refresh=now, plan=plan or account.plan,
                access_expires_at=token_expiry(tokens.access_token) or _expires_in(body, now),
                token_version=base + 1),
            base_version=base,
        )
        log.info("token refreshed account=%s generation=%d took_ms=%.0f", account.id,
                 lease.generation, (trio.current_time() - started) * 1000)
        with trio.move_on_after(BODY_AND_WRITE_BOUND):
            await self._write_pending_once(account.id)
        if account.id in self._pending:
            self._start_writer(account.id)
        current = await self._current_or(account.id)
        return FreshTokens(account=current, tokens=current.tokens)

    def _base_version(self, account: Account) -> int:
        pending = self._pending.get(account.id)
        return pending.base_version if pending is not None else account.token_version

    async def _current_or(self, account_id: str) -> Account:
        """The account's truth after a write attempt, without failing on a broken store."""
        pending = self._pending.get(account_id)
        try:
            return await self._current(account_id)
        except Exception:
            if pending is None:
                raise
            return pending.account

    async def _write_pending_once(self, account_id: str) -> bool:
        """Try once to save the account's pending triple. True when nothing is pending now."""
        pending = self._pending.get(account_id)
        if pending is None:
            return True
        new = pending.account
        try:
            await self._store.save_tokens(
                account_id, new.tokens, access_expires_at=new.access_expires_at,
                last_refresh=new.last_refresh or self._wall_clock(),
                plan=new.plan if new.plan != "unknown" else None,
                expected_version=pending.base_version,
            )
        except TokenVersionConflict:
            log.warning("token write account=%s skipped: a newer login was saved meanwhile",
                        account_id)
        except AccountNotFound:
            log.info("token write account=%s skipped: the account was removed", account_id)
        except Exception as exc:
            self.write_failures += 1
            log.error("token write account=%s failed (the new tokens stay in memory and the "
                      "write is retried): %s", account_id, exc)
            return False
        if self._pending.get(account_id) is pending:
            del self._pending[account_id]
        return account_id not in self._pending

    async def _flush_pending(self) -> None:
        """One last bounded try at every token write still pending (stopping for good)."""
        with trio.move_on_after(BODY_AND_WRITE_BOUND):
            for account_id in list(self._pending):
                await self._write_pending_once(account_id)
        for account_id in self._pending:
            log.error("token write account=%s still failing at shutdown: the new tokens are "
                      "lost with this process; the account may need a new login", account_id)

    def _start_writer(self, account_id: str) -> None:
        if account_id not in self._writers:
            self._writers.add(account_id)
            self._nursery.start_soon(self._writer, account_id)

    async def _writer(self, account_id: str) -> None:
        """Retry a refused token write with backoff until it lands (or is overtaken)."""
        delay = WRITE_RETRY_INITIAL
        try:
            while account_id in self._pending:
                await trio.sleep(delay)
                if await self._write_pending_once(account_id):
                    log.info("token write account=%s saved after a retry", account_id)
                    return
                delay = min(delay * 2, WRITE_RETRY_MAX)
        finally:
            self._writers.discard(account_id)

    def _schedule_retry(self, account_id: str, result: FreshTokens | CodexLBError) -> None:
        if isinstance(result, FreshTokens) or isinstance(result, PermanentAuth):
            self._retry_at.pop(account_id, None)
            return
        _, backoff = self._retry_at.get(account_id, (0.0, BACKOFF_INITIAL / 2))
        backoff = min(backoff * 2, BACKOFF_MAX)
        self._retry_at[account_id] = (trio.current_time() + backoff, backoff)

    # --- background ----------------------------------------------------------------------

    async def _background_loop(self) -> None:
        failures = 0
        while True:
            wake_at = trio.current_time() + RESCAN_INTERVAL
            try:
                accounts = await self._store.list_accounts()
            except Exception as exc:  # the store failed: try again later, keep the actor
                failures += 1
                delay = min(self.settings.spacing * 2 ** min(failures, 8), RESCAN_INTERVAL)
                log.warning("token scan failed (retry in %.0fs): %s", delay, exc)
                await trio.sleep(delay)
                continue
            failures = 0
            accounts = [self._pending[a.id].account
                        if a.id in self._pending and a.token_version <= self._pending[a.id].base_version
                        else a for a in accounts]
            now_wall, now = self._wall_clock(), trio.current_time()
            for account in accounts:
                if account.status not in REFRESHABLE or account.access_expires_at is None:
                    continue
                due_wall = account.access_expires_at - self.settings.margin - self._jitter_for(account)
                retry = self._retry_at.get(account.id)
                due = now + max(0.0, due_wall - now_wall)
                if retry is not None:
                    due = max(due, retry[0])
                if account.id in self._unknown_until:
                    due = max(due, self._unknown_until[account.id])
                if due <= now:
                    if account.id not in self._waiters:
                        log.info("token due account=%s expires_in=%.0fs", account.id,
                                 account.access_expires_at - now_wall)
                        self._start_refresh(account, [])
                else:
                    wake_at = min(wake_at, due)
            await trio.sleep_until(max(wake_at, now + self.settings.spacing))

    def _jitter_for(self, account: Account) -> float:
        key = (account.id, account.access_expires_at)
        if key not in self._jitter:
            if len(self._jitter) > 4096:
                self._jitter.clear()
            self._jitter[key] = self._rng.uniform(0, self.settings.jitter)
        return self._jitter[key]


def _lookup_error(exc: Exception) -> CodexLBError:
    if isinstance(exc, CodexLBError):
        return exc
    err = ActorUnavailable(f"the account store failed: {exc}" if isinstance(exc, StoreFailure)
                           else f"token lookup failed: {type(exc).__name__}")
    err.code = "store_unavailable" if isinstance(exc, StoreFailure) else "internal_error"
    return err


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _tokens_from(body: Any) -> TokenSet:
    if not isinstance(body, dict):
        raise InvalidResponse("token endpoint answered something that is not a JSON object")
    missing = [k for k in ("access_token", "refresh_token", "id_token")
               if not isinstance(body.get(k), str) or not body.get(k)]
    if missing:
        raise InvalidResponse(f"token endpoint answer lacks {', '.join(missing)}")
    return TokenSet(access_token=body["access_token"], refresh_token=body["refresh_token"],
                    id_token=body["id_token"])


def _expires_in(body: dict[str, Any], now: float) -> float | None:
    value = body.get("expires_in")
    return now + float(value) if isinstance(value, int | float) else None
