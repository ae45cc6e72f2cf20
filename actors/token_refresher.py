"""The TokenRefresher actor: keeps every account's access token fresh.

* ``ensure_fresh(account_id, force=False)`` answers the account's tokens, refreshing
  first if the access token is inside the margin (or ``force``). Single flight: while
  one refresh of an account is under way, every other caller waits for its result.
* A background loop refreshes each account ``token_margin`` (+ a per-token jitter)
  before its access token's ``exp``; refreshes of different accounts start at least
  ``token_spacing`` apart, because sibling refreshes in a burst have been seen to
  invalidate each other upstream.
* Refresh tokens are single use: the new triple is written durably to the store
  *before* anyone is told, and the exchange runs under a bounded shield so shutdown
  cannot cut it between the upstream's answer and the write.
* Failures go through ``errors.classify``: a permanent code marks the account
  ``reauth_required``/``deactivated`` and is never retried; a transport failure
  rotates the client (compare-and-swap on the lease's generation) and retries once on
  the new generation, unless every caller waiting for that refresh asked
  ``rotate_on_transport=False`` (a caller that keeps its own rotation budget); anything
  else backs off with the status unchanged.
"""

from __future__ import annotations

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
    TokenSet,
    identity_from_id_token,
    token_expiry,
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
EXCHANGE_BOUND = 60.0  # shielded ceiling on one refresh exchange + its durable write
RESCAN_INTERVAL = 60.0  # the background loop looks for new accounts at least this often
BACKOFF_INITIAL, BACKOFF_MAX = 30.0, 600.0
REFRESHABLE = frozenset({AccountStatus.ACTIVE, AccountStatus.PAUSED, AccountStatus.COOLING_DOWN})


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshSettings:
    auth_base_url: str = "https://auth.openai.com"
    margin: float = 600.0
    spacing: float = 2.0
    jitter: float = 30.0

    @classmethod
    def from_config(cls, config: Any) -> RefreshSettings:
        return cls(
            auth_base_url=config.upstream.auth_base_url,
            margin=config.refresh.token_margin,
            spacing=config.refresh.token_spacing,
            jitter=config.refresh.token_jitter,
        )


class TokenHandle:
    """Talk to the TokenRefresher."""

    def __init__(self, inbox: trio.MemorySendChannel[TokenRefresherMessage], timeout: float) -> None:
        self._inbox = inbox
        self._timeout = timeout

    async def ensure_fresh(
        self, account_id: str, *, force: bool = False, rotate_on_transport: bool = True
    ) -> FreshTokens:
        """The account with tokens valid for at least the margin (refreshed if needed).

        Raises PermanentAuth if the account needs a new login, TransportError if the
        auth server could not be reached even after one rotation, other CodexLBErrors
        for other failures. With ``rotate_on_transport=False`` the first transport
        failure is raised as is (its ``generation`` says which client failed) and the
        caller decides whether to rotate; a refresh shared with a caller that does want
        the rotation still rotates. Cancel-safe: a cancelled caller leaves the refresh
        running for the others.
        """
        result: FreshTokens = await call(
            self._inbox,
            lambda r: EnsureFresh(account_id=account_id, force=force, reply=r,
                                  rotate_on_transport=rotate_on_transport),
            actor="token refresher",
            timeout=self._timeout,
        )
        return result

    async def shutdown(self) -> None:
        try:
            await call(self._inbox, lambda r: ShutdownRefresher(reply=r), actor="token refresher",
                       timeout=EXCHANGE_BOUND + 5)
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
        self.refreshes = 0  # upstream refresh calls that got an answer

    def close(self) -> None:
        """The actor is gone for good: queued and later requests fail at once."""
        close_inbox(self._inbox_recv)

    def handle(self) -> TokenHandle:
        timeout = EXCHANGE_BOUND * 2 + self.settings.spacing * 16
        return TokenHandle(self._inbox_send.clone(), timeout)

    async def run(self, *, task_status: trio.TaskStatus[TokenHandle] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
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
        with trio.move_on_after(EXCHANGE_BOUND + self.settings.spacing):
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
            self._waiters[message.account_id].append(message.reply)
            if message.rotate_on_transport:
                self._may_rotate[message.account_id] = True
            return
        try:
            account = await self._store.get(message.account_id)
        except AccountNotFound:
            with message.reply:
                answer(message.reply, ClientError(f"no account with id {message.account_id}", status=404))
            return
        if account.status in (AccountStatus.REAUTH_REQUIRED, AccountStatus.DEACTIVATED):
            with message.reply:
                answer(message.reply, PermanentAuth(
                    f"account {account.id} needs a new login ({account.status_reason or account.status})",
                    status=401, code=account.status_reason or str(account.status)))
            return
        if not message.force and not self._due(account, self._wall_clock()):
            with message.reply:
                answer(message.reply, FreshTokens(account=account, tokens=account.tokens))
            return
        self._start_refresh(account, [message.reply], may_rotate=message.rotate_on_transport)

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
        except Exception as exc:  # e.g. the store failed: report it, keep the actor
            log.error("token refresh account=%s failed unexpectedly", account.id, exc_info=exc)
            result = classify(exc)
        self._schedule_retry(account.id, result)
        await self._inbox_send.send(RefreshDone(account_id=account.id, result=result))

    async def _refresh(self, account: Account) -> FreshTokens:
        rotated = False
        while True:
            async with self._clients.lease() as lease:
                try:
                    return await self._bounded_exchange(account, lease)
                except TransportError as exc:
                    if rotated:
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
            new = await self._clients.rotate(
                seen_generation=seen, reason=RotationReason.TRANSPORT, path_dead=path_dead
            )
            log.info("token refresh account=%s error=transport rotated generation=%d->%d",
                     account.id, seen, new)

    async def _bounded_exchange(self, account: Account, lease: Any) -> FreshTokens:
        # Shielded: once the upstream has answered, the old refresh token is dead, so
        # nothing may cut us off before the new one is written.
        with trio.move_on_after(EXCHANGE_BOUND, shield=True):
            return await self._exchange(account, lease)
        raise TransportError(f"refresh exchange exceeded {EXCHANGE_BOUND:g}s",
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
        response = await lease.send(request)
        try:
            raw = await response.aread()
        except Exception as exc:
            raise classify(exc, generation=lease.generation) from exc
        finally:
            await response.aclose()
        self.refreshes += 1
        body = _json_or_none(raw)
        now = self._wall_clock()
        if response.status_code != 200:
            err = from_status(response.status_code, body, now=now)
            if isinstance(err, PermanentAuth):
                status = AccountStatus.DEACTIVATED if err.deactivated else AccountStatus.REAUTH_REQUIRED
                await self._store.set_status(account.id, status, err.code)
                log.warning("token refresh account=%s error=%s: status -> %s (log in again)",
                            account.id, err.code, status)
            else:
                log.warning("token refresh account=%s error=http_%d code=%s",
                            account.id, response.status_code, err.code)
            raise err
        tokens = _tokens_from(body)
        identity = identity_from_id_token(tokens.id_token)
        updated = await self._store.save_tokens(
            account.id,
            tokens,
            access_expires_at=token_expiry(tokens.access_token) or _expires_in(body, now),
            last_refresh=now,
            plan=identity.plan if identity.plan != "unknown" else None,
        )
        log.info("token refreshed account=%s generation=%d took_ms=%.0f", account.id,
                 lease.generation, (trio.current_time() - started) * 1000)
        return FreshTokens(account=updated, tokens=tokens)

    def _schedule_retry(self, account_id: str, result: FreshTokens | CodexLBError) -> None:
        if isinstance(result, FreshTokens) or isinstance(result, PermanentAuth):
            self._retry_at.pop(account_id, None)
            return
        _, backoff = self._retry_at.get(account_id, (0.0, BACKOFF_INITIAL / 2))
        backoff = min(backoff * 2, BACKOFF_MAX)
        self._retry_at[account_id] = (trio.current_time() + backoff, backoff)

    # --- background ----------------------------------------------------------------------

    async def _background_loop(self) -> None:
        while True:
            wake_at = trio.current_time() + RESCAN_INTERVAL
            accounts = await self._store.list_accounts()
            now_wall, now = self._wall_clock(), trio.current_time()
            for account in accounts:
                if account.status not in REFRESHABLE or account.access_expires_at is None:
                    continue
                due_wall = account.access_expires_at - self.settings.margin - self._jitter_for(account)
                retry = self._retry_at.get(account.id)
                due = now + max(0.0, due_wall - now_wall)
                if retry is not None:
                    due = max(due, retry[0])
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
