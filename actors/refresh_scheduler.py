"""The RefreshScheduler actor: the model catalog and every account's usage windows.

* Every ``models_interval`` (±10 %) the catalog is refreshed. The accounts that may call
  the upstream are grouped by plan; per plan they are tried in turn until one answers
  ``GET {base}/codex/models``. Each model's raw JSON is kept (Codex CLI reads fields we
  do not know) and the catalog is the union of the plans' lists, one entry per slug.
* Every ``usage_interval`` each account's ``GET {base}/wham/usage`` is polled, at most
  ``usage_concurrency`` at once and started ``usage_spacing`` apart, and stored. An
  account cooled down by a window that has reset since leaves its cooldown.
* **The seed's rule.** A *failover cycle* is one model refresh (every plan), or one
  whole usage sweep. In a cycle, the first transport failure of the upstream call rotates
  the client once (compare-and-swap on the failed lease's generation) and retries the same
  step on the same account (a token refresh rotates the auth server's own pool, never
  ours, and retries there); any later transport
  failure in the cycle just moves on to the next account. A token refresh that rotated
  on its own (a request shared it and allowed the rotation) spends the cycle's rotation
  too: one cycle rotates at most once in total. HTTP errors, unusable answers
  and dead logins never rotate. A 401 forces one token refresh and one retry on the same
  account. If every account of a plan fails, that plan's models stay as they were.

Schedules run on trio's clock; only persisted times (``fetched_at``, usage) use the wall
clock. The catalog lives on the actor object, so it survives a supervisor restart.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, assert_never

import trio

from actors.accounts import (
    Account,
    AccountNotFound,
    AccountStatus,
    AccountStore,
    StoreFailure,
    Usage,
)
from actors.client_manager import ClientHandle
from actors.errors import (
    ActorUnavailable,
    AuthExpired,
    CodexLBError,
    InvalidResponse,
    PermanentAuth,
    Phase,
    TransportError,
    UpstreamError,
    classify,
    from_status,
)
from actors.messages import (
    Catalog,
    FreshTokens,
    GetCatalog,
    RefreshNow,
    RefreshSchedulerMessage,
    RotationReason,
    ShutdownScheduler,
    UsageUpdate,
    answer,
    call,
    close_inbox,
)
from actors.token_refresher import TokenHandle
from actors.upstream import InvalidPayload, usage_from_wham

log = logging.getLogger("codex_lb_trio.scheduler")

T = TypeVar("T")

INBOX_SIZE = 16
INTERVAL_JITTER = 0.10  # schedules vary by ±10 % so sibling accounts never line up
CLOSE_BOUND = 5.0  # shielded ceiling on closing one upstream response
ON_DEMAND_GAP = 5.0  # a catalog asker does not start a new fetch this soon after one ended
TIMER_MIN_TICK = 1.0
DEFAULT_USAGE_SPACING = 0.5  # between usage polls of sibling accounts
# Accounts that can still call the upstream; paused ones only lose their client traffic.
POLLED = frozenset({AccountStatus.ACTIVE, AccountStatus.COOLING_DOWN, AccountStatus.PAUSED})


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerSettings:
    """What to fetch from where, and how often (config.example.toml [upstream], [refresh])."""

    base_url: str = "https://chatgpt.com/backend-api"
    client_version: str = "0.169.0"
    models_interval: float = 300.0
    usage_interval: float = 60.0
    usage_concurrency: int = 2
    usage_spacing: float = DEFAULT_USAGE_SPACING
    first_cycle_delay: float = 0.0  # after start; tests push it out to drive cycles by hand
    body_timeout: float = 30.0  # for reading a whole JSON answer once its headers came
    call_timeout: float = 300.0  # what a handle call waits for the actor at most

    @classmethod
    def from_config(cls, config: Any) -> SchedulerSettings:
        up, refresh = config.upstream, config.refresh
        return cls(
            base_url=up.base_url,
            client_version=up.client_version,
            models_interval=refresh.models_interval,
            usage_interval=refresh.usage_interval,
            usage_concurrency=refresh.usage_concurrency,
            usage_spacing=getattr(refresh, "usage_spacing", DEFAULT_USAGE_SPACING),
        )


# --- outcomes -------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class ModelsOutcome:
    """One model refresh: which account answered per plan (or "failed"), what went wrong."""

    refreshed: bool = False
    plans: dict[str, str] = field(default_factory=dict)
    rotations: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class UsageOutcome:
    """One usage sweep."""

    polled: int = 0
    updated: list[str] = field(default_factory=list)
    uncooled: list[str] = field(default_factory=list)
    rotations: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _RotationBudget:
    """A failover cycle's single rotation (the seed's rule)."""

    spent: bool = False


@dataclass(slots=True)
class _Attempt:
    """What happened on one account, for its one log line."""

    account_id: str
    step: str = "token"
    notes: list[str] = field(default_factory=list)
    rotated: bool = False

    def failure(self, err: CodexLBError) -> str:
        words = [*self.notes, "retry=failed"] if self.notes else []
        words.append(f"error={_label(err)}")
        if isinstance(err, UpstreamError) and err.code != f"http_{err.status}":
            words.append(f"code={err.code}")
        words.append(f"step={self.step}")
        if isinstance(err, TransportError):
            words.append(f"generation={err.generation}")
            if not self.rotated:
                words.append("rotation=spent")  # another account used this cycle's rotation
        return " ".join(words)

    def success(self) -> str:
        return " ".join([*self.notes, "retry=ok"])


def _label(err: CodexLBError) -> str:
    if isinstance(err, TransportError):
        return "transport"
    if isinstance(err, PermanentAuth):
        return "permanent_auth"
    if isinstance(err, UpstreamError):
        return f"http_{err.status}"
    if isinstance(err, InvalidResponse):
        return "invalid_response"
    return err.code


def _error_entry(step: str, account_id: str, err: CodexLBError, **extra: str) -> dict[str, str]:
    return {"step": step, "account": account_id, "error": _label(err), **extra}


# --- one kind of cycle at a time -------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Run:
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Any = None  # None when the cycle crashed or was cancelled


class _CycleRunner:
    """Runs one kind of cycle at a time; callers join the run under way or queue for a new one."""

    def __init__(self, name: str, body: Callable[[], Awaitable[Any]]) -> None:
        self._name = name
        self._body = body
        self._current: _Run | None = None
        self.last_end = -math.inf

    @property
    def running(self) -> bool:
        return self._current is not None

    def reset(self) -> None:
        """Forget a run that died with a previous incarnation of the actor."""
        self._current = None

    def start(self, nursery: trio.Nursery) -> _Run:
        """The run under way, or a new one started in ``nursery``."""
        if self._current is None:
            run = _Run()
            self._current = run
            nursery.start_soon(self._drive, run)
        return self._current

    async def join(self, nursery: trio.Nursery) -> Any:
        run = self.start(nursery)
        await run.done.wait()
        return run.outcome

    async def fresh(self, nursery: trio.Nursery) -> Any:
        """The outcome of a run that started after this call."""
        if self._current is not None:
            await self._current.done.wait()
        return await self.join(nursery)

    async def _drive(self, run: _Run) -> None:
        try:
            run.outcome = await self._body()
        except Exception as exc:  # a bug or a failing store: report it, keep the actor
            log.error("%s cycle failed unexpectedly", self._name, exc_info=exc)
        finally:
            if self._current is run:
                self._current = None
            self.last_end = trio.current_time()
            run.done.set()


# --- the handle -------------------------------------------------------------------------


class SchedulerHandle:
    """Talk to the RefreshScheduler."""

    def __init__(
        self, inbox: trio.MemorySendChannel[RefreshSchedulerMessage], timeout: float
    ) -> None:
        self._inbox = inbox
        self._timeout = timeout

    async def refresh_now(self) -> dict[str, Any]:
        """Refresh the catalog, then poll every account's usage; a small JSON-able report.

        Both cycles start after the call (one under way is waited for first). Cancel-safe:
        the cycles go on without the caller.
        """
        result: dict[str, Any] = await call(
            self._inbox, lambda r: RefreshNow(reply=r), actor="refresh scheduler",
            timeout=self._timeout,
        )
        return result

    async def catalog(self, *, fetch_if_missing: bool = True) -> Catalog | None:
        """The current model catalog; None if there is none (no account could fetch it).

        Before the first refresh has produced one, ``fetch_if_missing`` starts a fetch
        (or joins the one under way; concurrent askers share it) and waits for it.
        """
        result: Catalog | None = await call(
            self._inbox, lambda r: GetCatalog(fetch_if_missing=fetch_if_missing, reply=r),
            actor="refresh scheduler", timeout=self._timeout,
        )
        return result

    async def shutdown(self) -> None:
        """Stop the actor; cycles under way are cancelled (they hold nothing durable)."""
        try:
            await call(self._inbox, lambda r: ShutdownScheduler(reply=r),
                       actor="refresh scheduler", timeout=self._timeout)
        except ActorUnavailable:
            pass  # already stopped


# --- the actor --------------------------------------------------------------------------


class RefreshScheduler:
    """The actor. Construct it, then ``handle = await nursery.start(scheduler.run)``.

    ``updates``, if given, receives every new Catalog and UsageUpdate (``send_nowait``;
    a full channel drops the update, the store and ``catalog()`` stay the truth).
    """

    def __init__(
        self,
        *,
        store: AccountStore,
        clients: ClientHandle,
        tokens: TokenHandle,
        settings: SchedulerSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        updates: trio.MemorySendChannel[Catalog | UsageUpdate] | None = None,
    ) -> None:
        self._store = store
        self._clients = clients
        self._tokens = tokens
        self.settings = settings or SchedulerSettings()
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._updates = updates
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[RefreshSchedulerMessage](
            INBOX_SIZE
        )
        self._catalog: Catalog | None = None
        self._models = _CycleRunner("model refresh", self._refresh_models)
        self._usage = _CycleRunner("usage sweep", self._sweep_usage)
        self._usage_limiter = trio.CapacityLimiter(max(1, self.settings.usage_concurrency))
        self._models_due = self._usage_due = 0.0

    def close(self) -> None:
        """The actor is gone for good: queued and later requests fail at once."""
        close_inbox(self._inbox_recv)

    def handle(self) -> SchedulerHandle:
        return SchedulerHandle(self._inbox_send.clone(), self.settings.call_timeout)

    async def run(
        self, *, task_status: trio.TaskStatus[SchedulerHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until shut down. Cancelling it cancels the cycles under way."""
        self._models.reset()
        self._usage.reset()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._models_due = self._usage_due = (
                trio.current_time() + self.settings.first_cycle_delay
            )
            nursery.start_soon(self._timer)
            task_status.started(self.handle())
            async for message in self._inbox_recv:
                match message:
                    case GetCatalog():
                        self._on_get_catalog(message)
                    case RefreshNow():
                        nursery.start_soon(self._refresh_now, message)
                    case ShutdownScheduler():
                        with message.reply:
                            answer(message.reply, None)
                        nursery.cancel_scope.cancel()
                        break
                    case _:
                        assert_never(message)
        # A clean shutdown is final: queued and later calls fail at once, not at their deadline.
        self.close()

    def _on_get_catalog(self, message: GetCatalog) -> None:
        with message.reply:  # closed on every way out; a waiting task holds its own clone
            if self._catalog is not None or not message.fetch_if_missing:
                answer(message.reply, self._catalog)
                return
            recently = trio.current_time() - self._models.last_end < ON_DEMAND_GAP
            if recently and not self._models.running:
                answer(message.reply, None)  # a fetch just failed: do not hammer the upstream
                return
            run = self._models.start(self._nursery)
            self._nursery.start_soon(self._answer_when_done, run, message.reply.clone())

    async def _answer_when_done(self, run: _Run, reply: trio.MemorySendChannel[Any]) -> None:
        with reply:
            await run.done.wait()
            answer(reply, self._catalog)

    async def _refresh_now(self, message: RefreshNow) -> None:
        with message.reply:
            started = trio.current_time()
            # In turn, so the usage sweep profits from a rotation the model refresh made.
            models: ModelsOutcome | None = await self._models.fresh(self._nursery)
            usage: UsageOutcome | None = await self._usage.fresh(self._nursery)
            answer(message.reply, self._report(models, usage, trio.current_time() - started))

    def _report(
        self, models: ModelsOutcome | None, usage: UsageOutcome | None, took: float
    ) -> dict[str, Any]:
        catalog = self._catalog
        errors: list[dict[str, str]] = []
        for outcome, step in ((models, "models"), (usage, "usage")):
            if outcome is None:
                errors.append({"step": step, "error": "internal_error"})
            else:
                errors += outcome.errors
        return {
            "models": len(catalog.models) if catalog else 0,
            "catalog_refreshed": bool(models and models.refreshed),
            "catalog_fetched_at": catalog.fetched_at if catalog else None,
            "plans": dict(models.plans) if models else {},
            "accounts_polled": usage.polled if usage else 0,
            "usage_updated": len(usage.updated) if usage else 0,
            "cooldowns_cleared": list(usage.uncooled) if usage else [],
            "rotations": (models.rotations if models else 0) + (usage.rotations if usage else 0),
            "errors": errors,
            "took_ms": round(took * 1000),
        }

    async def _timer(self) -> None:
        while True:
            now = trio.current_time()
            if now >= self._models_due and not self._models.running:
                self._models.start(self._nursery)
            if now >= self._usage_due and not self._usage.running:
                self._usage.start(self._nursery)
            # A cycle moves its own due time when it starts, whoever started it.
            wake_at = min(self._models_due, self._usage_due)
            await trio.sleep_until(max(wake_at, now + TIMER_MIN_TICK))

    def _jittered(self, interval: float) -> float:
        return interval * (1 + self._rng.uniform(-INTERVAL_JITTER, INTERVAL_JITTER))

    def _publish(self, update: Catalog | UsageUpdate) -> None:
        if self._updates is None:
            return
        try:
            self._updates.send_nowait(update)
        except trio.WouldBlock:
            log.debug("update dropped: the subscriber is behind")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._updates = None

    async def _polled_accounts(self) -> list[Account]:
        now = self._wall_clock()
        accounts = [a for a in await self._store.list_accounts() if a.status in POLLED]
        # Usable accounts first: a paused or cooling one answers the same catalog.
        return sorted(accounts, key=lambda a: a.effective_status(now) is not AccountStatus.ACTIVE)

    # --- the model catalog -------------------------------------------------------------

    async def _refresh_models(self) -> ModelsOutcome:
        self._models_due = trio.current_time() + self._jittered(self.settings.models_interval)
        groups: dict[str, list[Account]] = {}
        for account in await self._polled_accounts():
            groups.setdefault(account.plan, []).append(account)
        outcome = ModelsOutcome()
        fetched: dict[str, tuple[dict[str, Any], ...]] = {}
        budget = _RotationBudget()  # one rotation for the whole cycle, not one per plan
        try:
            for plan, members in groups.items():
                models = await self._refresh_plan(plan, members, outcome, budget)
                if models is not None:
                    fetched[plan] = models
        finally:
            outcome.rotations = int(budget.spent)
        if not fetched:
            if len(groups) > 1:
                log.warning("model refresh failed for every plan; catalog unchanged")
            elif not groups:
                log.debug("model refresh skipped: no account can call the upstream")
            return outcome
        previous = self._catalog.by_plan if self._catalog else {}
        by_plan = {plan: fetched[plan] if plan in fetched else previous[plan]
                   for plan in groups if plan in fetched or plan in previous}
        self._catalog = Catalog(models=_union(by_plan.values()), fetched_at=self._wall_clock(),
                                by_plan=by_plan)
        outcome.refreshed = True
        log.info("model catalog refreshed models=%d plans=%s", len(self._catalog.models),
                 ",".join(sorted(fetched)))
        self._publish(self._catalog)
        return outcome

    async def _refresh_plan(
        self, plan: str, members: list[Account], outcome: ModelsOutcome, budget: _RotationBudget
    ) -> tuple[dict[str, Any], ...] | None:
        """The plan's accounts in turn until one answers (within the cycle's budget)."""
        for index, account in enumerate(members):
            attempt = _Attempt(account.id)
            try:
                models = await self._on_account(account, budget, attempt, self._fetch_models)
            except CodexLBError as err:
                following = members[index + 1].id if index + 1 < len(members) else "none"
                log.warning("model refresh plan=%s account=%s %s next=%s", plan, account.id,
                            attempt.failure(err), following)
                outcome.errors.append(_error_entry("models", account.id, err, plan=plan))
                continue
            if attempt.notes:
                log.info("model refresh plan=%s account=%s %s", plan, account.id,
                         attempt.success())
            outcome.plans[plan] = account.id
            return models
        outcome.plans[plan] = "failed"
        log.warning("model refresh plan=%s failed on all %d account(s); its models are "
                    "unchanged", plan, len(members))
        return None

    async def _fetch_models(self, tokens: FreshTokens) -> tuple[dict[str, Any], ...]:
        body = await self._get_json(tokens, "/codex/models",
                                    params={"client_version": self.settings.client_version})
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise InvalidResponse("the models answer has no models list")
        return tuple(m for m in models
                     if isinstance(m, dict) and isinstance(m.get("slug"), str) and m["slug"])

    # --- usage --------------------------------------------------------------------------

    async def _sweep_usage(self) -> UsageOutcome:
        """One failover cycle over every account: one rotation budget for the sweep."""
        self._usage_due = trio.current_time() + self._jittered(self.settings.usage_interval)
        accounts = await self._polled_accounts()
        budget = _RotationBudget()
        outcome = UsageOutcome(polled=len(accounts))
        async with trio.open_nursery() as nursery:
            next_start = trio.current_time()
            for account in accounts:
                await trio.sleep_until(next_start)
                borrower = object()
                await self._usage_limiter.acquire_on_behalf_of(borrower)
                next_start = trio.current_time() + self.settings.usage_spacing
                nursery.start_soon(self._poll_usage, account, budget, outcome, borrower)
        outcome.rotations = int(budget.spent)
        if outcome.errors:
            log.warning("usage sweep polled=%d updated=%d failed=%d", outcome.polled,
                        len(outcome.updated), len(outcome.errors))
        return outcome

    async def _poll_usage(
        self, account: Account, budget: _RotationBudget, outcome: UsageOutcome, borrower: object
    ) -> None:
        try:
            attempt = _Attempt(account.id)
            try:
                usage = await self._on_account(account, budget, attempt, self._fetch_usage)
            except CodexLBError as err:
                log.warning("usage poll account=%s %s", account.id, attempt.failure(err))
                outcome.errors.append(_error_entry("usage", account.id, err))
                return
            if attempt.notes:
                log.info("usage poll account=%s %s", account.id, attempt.success())
            try:
                before = await self._store.get(account.id)
                await self._store.set_usage(account.id, usage)
                outcome.updated.append(account.id)
                self._publish(UsageUpdate(account_id=account.id, usage=usage))
                reason = cooldown_over(before, usage, self._wall_clock())
                if reason is not None:
                    await self._store.set_cooldown(account.id, None)
                    outcome.uncooled.append(account.id)
                    log.info("usage poll account=%s cooldown cleared: %s", account.id, reason)
            except AccountNotFound:
                pass  # removed while we asked
            except StoreFailure as exc:  # this account's reading is lost, not the sweep's
                log.warning("usage poll account=%s not saved: %s", account.id, exc)
                outcome.errors.append({"step": "usage", "account": account.id,
                                       "error": "store"})
        finally:
            self._usage_limiter.release_on_behalf_of(borrower)

    async def _fetch_usage(self, tokens: FreshTokens) -> Usage:
        body = await self._get_json(tokens, "/wham/usage")
        try:
            return usage_from_wham(body, self._wall_clock())
        except InvalidPayload as exc:
            raise InvalidResponse(str(exc)) from None

    # --- one account, one step ----------------------------------------------------------

    async def _on_account(
        self,
        account: Account,
        budget: _RotationBudget,
        attempt: _Attempt,
        fetch: Callable[[FreshTokens], Awaitable[T]],
    ) -> T:
        """Fresh tokens, then ``fetch``; the seed's rule and the 401 rule applied."""
        tokens: FreshTokens | None = None
        force = False
        rejected: str | None = None  # the access token a 401 refused
        while True:
            if tokens is None:
                attempt.step = "token"
                try:
                    # The refresher reaches the auth server through its own client pool and
                    # rotates that one (once) itself: its failure says nothing about ours.
                    tokens = await self._tokens.ensure_fresh(
                        account.id, force=force, rejected_access_token=rejected,
                    )
                except TransportError as err:
                    if getattr(err, "rotated_by_refresher", False):
                        budget.spent = True  # a shared refresh rotated and still failed
                    raise
                if tokens.rotated:
                    budget.spent = True  # the shared refresh spent this cycle's rotation
            attempt.step = "fetch"
            try:
                return await fetch(tokens)
            except TransportError as err:
                await self._rotate_once(err, budget, attempt)
            except AuthExpired:
                if force:
                    raise  # a second 401: fail over
                force, rejected, tokens = True, tokens.tokens.access_token, None
                attempt.notes += ["error=http_401", "step=fetch", "forced_refresh"]

    async def _rotate_once(
        self, err: TransportError, budget: _RotationBudget, attempt: _Attempt
    ) -> None:
        """Spend the cycle's rotation on ``err`` (and return to retry), or re-raise it."""
        if budget.spent or err.generation is None:
            # No generation named (e.g. a refresh held back after an unknown outcome): it
            # proves nothing about the client, and a rotation without one is a storm.
            raise err
        budget.spent = True
        attempt.rotated = True
        new = await self._clients.rotate(
            seen_generation=err.generation, reason=RotationReason.TRANSPORT,
            path_dead=err.path_dead, phase=err.phase,
        )
        attempt.notes += ["error=transport", f"step={attempt.step}", "rotated",
                          f"generation={err.generation}->{new}"]

    async def _get_json(
        self, tokens: FreshTokens, path: str, params: dict[str, str] | None = None
    ) -> Any:
        """GET ``{base}{path}`` as the account; the parsed JSON of a 2xx answer.

        Raises TransportError (with the lease's generation), AuthExpired for any 401 (on
        a backend call it means the access token, whatever its code), another
        UpstreamError for other statuses, InvalidResponse for a body that is not JSON.
        """
        url = self.settings.base_url.rstrip("/") + path
        async with self._clients.lease() as lease:
            request = lease.client.build_request("GET", url, params=params, headers={
                "authorization": f"Bearer {tokens.tokens.access_token}",
                "chatgpt-account-id": tokens.account.chatgpt_account_id,
                "accept": "application/json",
            })
            response = await lease.send(request)
            raw = b""
            try:
                with trio.move_on_after(self.settings.body_timeout) as body_scope:
                    raw = await response.aread()
            except Exception as exc:
                raise classify(exc, phase=Phase.BODY, generation=lease.generation) from exc
            finally:
                with trio.move_on_after(CLOSE_BOUND, shield=True):
                    await response.aclose()
            if body_scope.cancelled_caught:
                raise TransportError(
                    f"answer body not complete within {self.settings.body_timeout:g}s",
                    phase=Phase.BODY, path_dead=True, generation=lease.generation,
                )
        body = _json_or_none(raw)
        status = response.status_code
        if status == 401:
            code = from_status(status, body, now=self._wall_clock()).code
            raise AuthExpired("the upstream rejected the access token", status=401, code=code)
        if not 200 <= status < 300:
            raise from_status(status, body, now=self._wall_clock(),
                              retry_after=response.headers.get("retry-after"))
        if body is None:
            raise InvalidResponse(f"{path} answered something that is not JSON")
        return body


def cooldown_over(account: Account, usage: Usage, now: float) -> str | None:
    """Why ``account``'s cooldown can end given its new ``usage`` reading, or None.

    It ends once it has expired, or when a window the account last reported has reset
    since (its ``reset_at`` passed) and the new reading has every window under 100 %.
    """
    if account.cooldown_until is None:
        return None
    if account.cooldown_until <= now:
        return "cooldown expired"
    windows = {"primary": usage.primary, "secondary": usage.secondary}
    present = {name: w for name, w in windows.items() if w is not None}
    if not present or any(w.used_percent >= 100 for w in present.values()):
        return None
    for name, old in (("primary", account.usage.primary), ("secondary", account.usage.secondary)):
        if old is not None and old.reset_at is not None and old.reset_at <= now:
            new = present.get(name)
            used = f" now used={new.used_percent:g}%" if new is not None else ""
            return f"{name} window reset at {old.reset_at:.0f}{used}"
    return None


def _union(groups: Any) -> tuple[dict[str, Any], ...]:
    seen: set[str] = set()
    models: list[dict[str, Any]] = []
    for group in groups:
        for model in group:
            if model["slug"] not in seen:
                seen.add(model["slug"])
                models.append(model)
    return tuple(models)


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
