"""Which pooled account serves the next request: a pure policy, no trio and no I/O.

The ProxyHandler owns the inputs (account snapshots, its in-flight counts, the sticky
table) and calls ``choose`` once per attempt. Everything here is a function of its
arguments, so the policy can be tested exhaustively without a clock or a network.

Policy, in order:

1. Skip accounts that are paused, need a new login, are deactivated, are cooling down
   (``cooldown_until > now``), or were already tried for this request (``exclude``).
2. A sticky account (same Codex session or prompt cache key) is reused while it is
   eligible, so the upstream prompt cache keeps hitting. It is given up when its usage
   snapshot says it is exhausted: that request would only earn a 429.
3. Otherwise the best score wins: usage headroom minus a penalty per request already in
   flight, so equal accounts share concurrent load evenly. Exhausted accounts (0 %
   headroom) come last whatever their load, unless they have credits: the backend
   bills those past the plan's limit, so such an account is still usable. Ties go to
   the oldest account, then the id.

Errors::

    BalancerError
    ├── NoAccounts           the pool is empty
    ├── AllCoolingDown       every account we could use waits for a reset (.resets_at)
    └── NoEligibleAccounts   accounts exist but none is usable (paused, reauth, tried …)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors.accounts import Account, AccountStatus, UsageWindow

# One request in flight costs as much as this many points of usage headroom. Small
# enough that a clearly fresher account still takes a few parallel requests first, large
# enough that equal accounts alternate.
IN_FLIGHT_PENALTY = 5.0

STICKY_TABLE_SIZE = 10_000

# Session keys longer than this are stored as a digest so a hostile or buggy client
# cannot grow the sticky table by megabytes per entry.
_MAX_RAW_STICKY_KEY = 256

# Statuses whose accounts can serve traffic; COOLING_DOWN is a display status, the
# cooldown itself lives in ``cooldown_until`` and is checked against ``now``.
_USABLE_STATUSES = frozenset({AccountStatus.ACTIVE, AccountStatus.COOLING_DOWN})


class BalancerError(Exception):
    """No account can take the request; the subclass says why."""


class NoAccounts(BalancerError):
    def __init__(self) -> None:
        super().__init__("no accounts in the pool: add one with `codex-lb-trio accounts import`")


class AllCoolingDown(BalancerError):
    """Every usable account is rate limited; ``resets_at`` is the earliest reset (epoch s)."""

    def __init__(self, resets_at: float) -> None:
        super().__init__(f"all accounts are cooling down; the earliest resets at {resets_at:.0f}")
        self.resets_at = resets_at


class NoEligibleAccounts(BalancerError):
    """Accounts exist but none may serve: ``by_status`` counts why, ``tried`` the excluded."""

    def __init__(self, by_status: Mapping[str, int], tried: int) -> None:
        reasons = [f"{count} {status}" for status, count in sorted(by_status.items())]
        if tried:
            reasons.append(f"{tried} already tried for this request")
        super().__init__("no eligible account: " + ", ".join(reasons))
        self.by_status = dict(by_status)
        self.tried = tried


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    account: Account
    sticky_hit: bool


def _status_ok(account: Account) -> bool:
    return account.status in _USABLE_STATUSES


def _cooling(account: Account, now: float) -> bool:
    return account.cooldown_until is not None and account.cooldown_until > now


def is_eligible(account: Account, now: float) -> bool:
    """Whether the account may serve a request right now (status and cooldown)."""
    return _status_ok(account) and not _cooling(account, now)


def _window_used(window: UsageWindow | None, now: float) -> float:
    if window is None:
        return 0.0
    if window.reset_at is not None and window.reset_at <= now:
        return 0.0  # the window rolled over since the snapshot was taken
    return min(max(window.used_percent, 0.0), 100.0)


def headroom(account: Account, now: float) -> float:
    """Percent of usage left (0..100); the more used of the two windows binds."""
    usage = account.usage
    used = max(_window_used(usage.primary, now), _window_used(usage.secondary, now))
    return 100.0 - used


def on_credits(account: Account, now: float) -> bool:
    """Out of its plan's usage but still usable: it has credits (or unlimited ones)."""
    credits = account.usage.credits
    return credits is not None and credits.usable and headroom(account, now) <= 0.0


def _spent(account: Account, now: float) -> bool:
    return headroom(account, now) <= 0.0 and not on_credits(account, now)


def choose(
    accounts: Sequence[Account],
    *,
    now: float,
    in_flight: Mapping[str, int],
    sticky_account_id: str | None = None,
    exclude: Collection[str] = (),
    in_flight_penalty: float = IN_FLIGHT_PENALTY,
) -> Choice:
    """Pick the account for one attempt of one request.

    ``now`` is wall-clock epoch seconds (the unit of cooldowns and usage resets).
    Raises NoAccounts, AllCoolingDown or NoEligibleAccounts when nothing fits.
    """
    if not accounts:
        raise NoAccounts()
    excluded = frozenset(exclude)
    candidates = [a for a in accounts if a.id not in excluded and is_eligible(a, now)]

    sticky = next((a for a in candidates if a.id == sticky_account_id), None)
    if sticky is not None and not _spent(sticky, now):
        return Choice(account=sticky, sticky_hit=True)

    if candidates:

        def rank(account: Account) -> tuple[bool, float, float, str]:
            room = headroom(account, now)
            score = room - in_flight_penalty * in_flight.get(account.id, 0)
            return (_spent(account, now), -score, account.created_at, account.id)

        best = min(candidates, key=rank)
        if sticky is not None and _spent(best, now):
            return Choice(account=sticky, sticky_hit=True)  # all exhausted: keep the cache
        return Choice(account=best, sticky_hit=False)

    # Nothing usable: say why, preferring the answer a client can act on (wait until X).
    # Tried accounts still count towards the earliest reset: they come back then too.
    resets: list[float] = []
    untried_cooling = False
    for account in accounts:
        until = account.cooldown_until
        if until is not None and until > now and _status_ok(account):
            resets.append(until)
            untried_cooling = untried_cooling or account.id not in excluded
    if untried_cooling:
        raise AllCoolingDown(min(resets))
    by_status: dict[str, int] = {}
    tried = 0
    for account in accounts:
        if account.id in excluded:
            tried += 1
        elif not _status_ok(account):
            by_status[account.status.value] = by_status.get(account.status.value, 0) + 1
    raise NoEligibleAccounts(by_status, tried)


class StickyTable:
    """A bounded LRU map from session key to account id, owned by one actor.

    Least recently used keys are forgotten first once ``max_size`` is reached.
    """

    def __init__(self, max_size: int = STICKY_TABLE_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._max_size = max_size
        self._entries: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> str | None:
        account_id = self._entries.get(key)
        if account_id is not None:
            self._entries.move_to_end(key)
        return account_id

    def set(self, key: str, account_id: str) -> None:
        self._entries[key] = account_id
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def forget_account(self, account_id: str) -> int:
        """Drop every key bound to the account (removed, paused …); returns how many."""
        stale = [key for key, bound in self._entries.items() if bound == account_id]
        for key in stale:
            del self._entries[key]
        return len(stale)


def sticky_key(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> str | None:
    """The key that ties a request to its conversation, or None.

    Looks at the ``session-id`` header, then ``thread-id``, then the body's
    ``prompt_cache_key``. Header names match case-insensitively.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in ("session-id", "thread-id"):
        value = lowered.get(name)
        if isinstance(value, str) and value.strip():
            return _bounded(value.strip())
    if body is not None:
        value = body.get("prompt_cache_key")
        if isinstance(value, str) and value.strip():
            return _bounded(value.strip())
    return None


def _bounded(key: str) -> str:
    if len(key) <= _MAX_RAW_STICKY_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
