"""The pooled ChatGPT accounts: the record, the store protocol, and an in-memory store.

An ``Account`` is an immutable snapshot. Stores change one concern at a time
(tokens, status, cooldown, usage) so that two actors writing different concerns of
the same account never overwrite each other's work.

Token writes are versioned: ``token_version`` grows by one with every saved triple (a
refresh, a login, an import). A write about the tokens (``save_tokens``, or a
``set_status`` verdict on them) may name the version it is based on; the store refuses it
with TokenVersionConflict if a newer triple was saved meanwhile, so a server acting on an
old login can never overwrite a fresh ``accounts login`` made from the CLI.

Times that are persisted (expiry, cooldown, usage resets) are wall-clock epoch
seconds; actors compare them against ``time.time()`` passed in by the caller.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class AccountStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    COOLING_DOWN = "cooling_down"
    REAUTH_REQUIRED = "reauth_required"
    DEACTIVATED = "deactivated"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSet:
    """The OAuth token triple. Never log or serialise this outside the store."""

    access_token: str
    refresh_token: str
    id_token: str

    def __repr__(self) -> str:  # keeps tokens out of tracebacks and debug logs
        return "TokenSet(<redacted>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageWindow:
    """One rate-limit window: the 5-hour primary or the weekly secondary."""

    used_percent: float
    reset_at: float | None = None
    window_seconds: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "used_percent": self.used_percent,
            "reset_at": self.reset_at,
            "window_seconds": self.window_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> UsageWindow | None:
        if not data:
            return None
        return cls(
            used_percent=float(data.get("used_percent") or 0.0),
            reset_at=_opt_float(data.get("reset_at")),
            window_seconds=_opt_int(data.get("window_seconds")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Credits:
    """Purchased credits: an account past its plan limit keeps working while it has some."""

    has_credits: bool
    unlimited: bool = False
    balance: str | None = None  # as the backend writes it (a decimal string)

    @property
    def usable(self) -> bool:
        return self.unlimited or self.has_credits

    def to_json(self) -> dict[str, Any]:
        return {"has_credits": self.has_credits, "unlimited": self.unlimited,
                "balance": self.balance}

    @classmethod
    def from_json(cls, data: Any) -> Credits | None:
        if not isinstance(data, dict):
            return None
        balance = data.get("balance")
        return cls(has_credits=bool(data.get("has_credits")), unlimited=bool(data.get("unlimited")),
                   balance=None if balance is None else str(balance))


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitFamily:
    """A rate-limit family beside the plan's own (``x-<name>-primary-*`` headers)."""

    name: str  # the header's family id, e.g. "codex-bengalfox"
    limit_name: str | None = None  # its display name (``x-<name>-limit-name``)
    primary: UsageWindow | None = None
    secondary: UsageWindow | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "limit_name": self.limit_name,
                "primary": self.primary.to_json() if self.primary else None,
                "secondary": self.secondary.to_json() if self.secondary else None}

    @classmethod
    def from_json(cls, data: Any) -> LimitFamily | None:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        limit_name = data.get("limit_name")
        return cls(name=data["name"],
                   limit_name=limit_name if isinstance(limit_name, str) else None,
                   primary=UsageWindow.from_json(data.get("primary")),
                   secondary=UsageWindow.from_json(data.get("secondary")))


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    primary: UsageWindow | None = None
    secondary: UsageWindow | None = None
    updated_at: float | None = None
    credits: Credits | None = None
    families: tuple[LimitFamily, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary.to_json() if self.primary else None,
            "secondary": self.secondary.to_json() if self.secondary else None,
            "updated_at": self.updated_at,
            "credits": self.credits.to_json() if self.credits else None,
            "families": [family.to_json() for family in self.families],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Usage:
        if not data:
            return cls()
        families = data.get("families")
        return cls(
            primary=UsageWindow.from_json(data.get("primary")),
            secondary=UsageWindow.from_json(data.get("secondary")),
            updated_at=_opt_float(data.get("updated_at")),
            credits=Credits.from_json(data.get("credits")),
            families=tuple(f for item in (families if isinstance(families, list) else [])
                           if (f := LimitFamily.from_json(item)) is not None),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """A snapshot of one pooled account."""

    id: str
    email: str
    chatgpt_account_id: str
    chatgpt_user_id: str = ""
    plan: str = "unknown"
    status: AccountStatus = AccountStatus.ACTIVE
    status_reason: str = ""
    tokens: TokenSet = field(repr=False)
    access_expires_at: float | None = None
    last_refresh: float | None = None
    cooldown_until: float | None = None
    usage: Usage = field(default_factory=Usage)
    created_at: float = field(default_factory=time.time)
    token_version: int = 1  # grows with every saved token triple (see the module docstring)

    def public_json(self, now: float | None = None) -> dict[str, Any]:
        """The account as the admin API shows it: every field but the tokens."""
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "email": self.email,
            "chatgpt_account_id": self.chatgpt_account_id,
            "plan": self.plan,
            "status": self.effective_status(now).value,
            "status_reason": self.status_reason,
            "access_expires_at": self.access_expires_at,
            "last_refresh": self.last_refresh,
            "cooldown_until": self.cooldown_until,
            "usage": self.usage.to_json(),
        }

    def effective_status(self, now: float) -> AccountStatus:
        """ACTIVE accounts inside a cooldown show as COOLING_DOWN."""
        if (
            self.status is AccountStatus.ACTIVE
            and self.cooldown_until is not None
            and self.cooldown_until > now
        ):
            return AccountStatus.COOLING_DOWN
        return self.status


class StoreFailure(Exception):
    """The store could not do what was asked (disk, lock, a corrupt row); says why in one line.

    Not the caller's fault and not the account's: a request that meets one fails (or fails
    over) on its own, and an actor that meets one logs it and carries on.
    """


class AccountNotFound(LookupError):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"no account with id {account_id!r}")
        self.account_id = account_id


class TokenVersionConflict(Exception):
    """A token write based on an older triple than the stored one; nothing was written."""

    def __init__(self, account_id: str, *, stored: int, expected: int) -> None:
        super().__init__(f"account {account_id}: tokens are at version {stored}, the write "
                         f"was based on version {expected}")
        self.account_id = account_id
        self.stored = stored
        self.expected = expected
        self.current: Account | None = None  # the stored account, when the store has it


def token_fingerprint(token: str) -> str:
    """A short, one-way name for a token: compares tokens without carrying them around."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class AccountStore(Protocol):
    """Where accounts live. Every method is async; writes are durable when they return."""

    async def list_accounts(self) -> list[Account]: ...

    async def get(self, account_id: str) -> Account:
        """Raise AccountNotFound if there is no such account."""
        ...

    async def upsert(self, account: Account) -> tuple[Account, bool]:
        """Add an account, or update the one with the same (chatgpt_account_id, email).

        Returns the stored account and whether it was newly created. An update keeps
        the existing id and replaces tokens, plan and identity fields, and sets the
        status back to ACTIVE.
        """
        ...

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
        """Persist a new token triple durably before returning; its version is one more.

        With ``expected_version``, raise TokenVersionConflict (writing nothing) if the
        stored triple is newer than that version.
        """
        ...

    async def set_status(
        self, account_id: str, status: AccountStatus, reason: str = "",
        *, expected_version: int | None = None,
    ) -> Account:
        """With ``expected_version``: a verdict about that triple; refused if a newer one
        is stored (TokenVersionConflict)."""
        ...

    async def set_cooldown(self, account_id: str, until: float | None) -> Account: ...

    async def set_usage(self, account_id: str, usage: Usage) -> Account: ...

    async def merge_usages(
        self, readings: Mapping[str, Usage], merge: Callable[[Usage, Usage], Usage]
    ) -> None:
        """Store ``merge(stored, reading)`` for every account, in one write.

        Accounts that no longer exist are skipped.
        """
        ...

    async def remove(self, account_id: str) -> None: ...


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(6)


class InMemoryAccountStore:
    """An AccountStore kept in a dict: for embedding and tests. Nothing survives a restart."""

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self._accounts: dict[str, Account] = {a.id: a for a in accounts}

    async def list_accounts(self) -> list[Account]:
        return sorted(self._accounts.values(), key=lambda a: a.created_at)

    async def get(self, account_id: str) -> Account:
        try:
            return self._accounts[account_id]
        except KeyError:
            raise AccountNotFound(account_id) from None

    async def upsert(self, account: Account) -> tuple[Account, bool]:
        for existing in self._accounts.values():
            if (existing.chatgpt_account_id, existing.email) == (
                account.chatgpt_account_id,
                account.email,
            ):
                updated = dataclasses.replace(
                    existing,
                    chatgpt_user_id=account.chatgpt_user_id,
                    plan=account.plan,
                    tokens=account.tokens,
                    access_expires_at=account.access_expires_at,
                    last_refresh=account.last_refresh,
                    status=AccountStatus.ACTIVE,
                    status_reason="",
                    token_version=existing.token_version + 1,
                )
                self._accounts[existing.id] = updated
                return updated, False
        self._accounts[account.id] = account
        return account, True

    def _change(self, account_id: str, **changes: Any) -> Account:
        try:
            current = self._accounts[account_id]
        except KeyError:
            raise AccountNotFound(account_id) from None
        updated = dataclasses.replace(current, **changes)
        self._accounts[account_id] = updated
        return updated

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
        current = self._check_version(account_id, expected_version)
        changes: dict[str, Any] = {
            "tokens": tokens,
            "access_expires_at": access_expires_at,
            "last_refresh": last_refresh,
            "token_version": current.token_version + 1,
        }
        if plan:
            changes["plan"] = plan
        return self._change(account_id, **changes)

    async def set_status(
        self, account_id: str, status: AccountStatus, reason: str = "",
        *, expected_version: int | None = None,
    ) -> Account:
        self._check_version(account_id, expected_version)
        return self._change(account_id, status=status, status_reason=reason)

    def _check_version(self, account_id: str, expected: int | None) -> Account:
        try:
            current = self._accounts[account_id]
        except KeyError:
            raise AccountNotFound(account_id) from None
        if expected is not None and current.token_version > expected:
            raise TokenVersionConflict(account_id, stored=current.token_version, expected=expected)
        return current

    async def set_cooldown(self, account_id: str, until: float | None) -> Account:
        return self._change(account_id, cooldown_until=until)

    async def set_usage(self, account_id: str, usage: Usage) -> Account:
        return self._change(account_id, usage=usage)

    async def merge_usages(
        self, readings: Mapping[str, Usage], merge: Callable[[Usage, Usage], Usage]
    ) -> None:
        for account_id, reading in readings.items():
            current = self._accounts.get(account_id)
            if current is not None:
                self._accounts[account_id] = dataclasses.replace(
                    current, usage=merge(current.usage, reading))

    async def remove(self, account_id: str) -> None:
        if self._accounts.pop(account_id, None) is None:
            raise AccountNotFound(account_id)


# --- JWT claims (no signature check: the tokens came from the upstream over TLS) ---

AUTH_CLAIMS_NAMESPACE = "https://api.openai.com/auth"


def jwt_claims(token: str) -> dict[str, Any]:
    """Decode a JWT's payload. Returns {} for anything that is not a readable JWT."""
    parts = token.split(".")
    if len(parts) < 2:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """What the id_token says about who the account is."""

    email: str
    chatgpt_account_id: str
    chatgpt_user_id: str
    plan: str


def identity_from_id_token(id_token: str, *, fallback_account_id: str = "") -> Identity:
    claims = jwt_claims(id_token)
    auth = claims.get(AUTH_CLAIMS_NAMESPACE)
    auth = auth if isinstance(auth, dict) else {}
    return Identity(
        email=str(claims.get("email") or ""),
        chatgpt_account_id=str(auth.get("chatgpt_account_id") or fallback_account_id or ""),
        chatgpt_user_id=str(auth.get("chatgpt_user_id") or auth.get("user_id") or ""),
        plan=str(auth.get("chatgpt_plan_type") or "unknown"),
    )


def token_expiry(access_token: str) -> float | None:
    """The access token's ``exp`` claim, the best signal of when to refresh."""
    exp = jwt_claims(access_token).get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None
