"""The fake auth server's accounts and token families.

Each login starts a ``TokenSession`` (a token family). Refreshing rotates the whole triple:
the old refresh token is spent (presenting it again is ``refresh_token_reused``) and the old
access token stops working at once. Tokens are unsigned JWTs that
``actors.accounts.jwt_claims`` can read.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .jwt import mint_jwt
from .wire import UsageState

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIMS_NAMESPACE = "https://api.openai.com/auth"


def pkce_challenge(verifier: str) -> str:
    """S256: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(slots=True, eq=False, kw_only=True)
class TokenSession:
    """One login's token family: the refresh token rotates, the family stays."""

    account: FakeAccount
    access_token: str = ""
    refresh_token: str = ""
    id_token: str = ""
    access_expires_at: float = 0.0
    alive: bool = True


@dataclass(slots=True, eq=False, kw_only=True)
class FakeAccount:
    """An upstream account. Token properties show the most recently issued triple."""

    email: str
    chatgpt_account_id: str
    plan: str
    chatgpt_user_id: str
    usage: UsageState = field(default_factory=UsageState)
    sessions: list[TokenSession] = field(default_factory=list)

    @property
    def latest(self) -> TokenSession:
        return self.sessions[-1]

    @property
    def access_token(self) -> str:
        return self.latest.access_token

    @property
    def refresh_token(self) -> str:
        return self.latest.refresh_token

    @property
    def id_token(self) -> str:
        return self.latest.id_token


def auth_json(account: FakeAccount) -> dict[str, Any]:
    """The account's latest tokens in Codex CLI's auth.json shape."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": account.id_token,
            "access_token": account.access_token,
            "refresh_token": account.refresh_token,
            "account_id": account.chatgpt_account_id,
        },
        "last_refresh": now,
    }


class TokenVault:
    """Every token the fake ever issued, and what each one is still good for."""

    def __init__(self, *, access_ttl: float) -> None:
        self.access_ttl = access_ttl
        self.revoke_family_on_reuse = False
        self._by_access: dict[str, TokenSession] = {}
        self._by_refresh: dict[str, TokenSession] = {}
        self._spent_refresh: dict[str, TokenSession] = {}

    def new_session(self, account: FakeAccount) -> TokenSession:
        """Start an independent token family for ``account`` (what a fresh login does)."""
        session = TokenSession(account=account)
        account.sessions.append(session)
        self._issue(session)
        return session

    def rotate(self, session: TokenSession) -> None:
        """A successful refresh: a whole new triple; the old refresh and access tokens die."""
        self._by_access.pop(session.access_token, None)
        old_refresh = session.refresh_token
        self._by_refresh.pop(old_refresh, None)
        self._spent_refresh[old_refresh] = session
        self._issue(session)

    def revoke_access(self, session: TokenSession) -> None:
        self._by_access.pop(session.access_token, None)

    def kill(self, session: TokenSession) -> None:
        """End the family: its refresh token answers refresh_token_invalidated from now on."""
        session.alive = False
        self._by_access.pop(session.access_token, None)

    def owner_of_refresh_token(self, refresh_token: str) -> FakeAccount | None:
        session = self._by_refresh.get(refresh_token) or self._spent_refresh.get(refresh_token)
        return session.account if session else None

    def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        """Apply the refresh grant: (status, JSON body)."""
        session = self._by_refresh.get(refresh_token)
        if session is not None and session.alive:
            self.rotate(session)
            return 200, self.token_answer(session)
        if session is not None:
            return 401, {
                "error": {"code": "refresh_token_invalidated", "message": "fake: family revoked"}
            }
        spent = self._spent_refresh.get(refresh_token)
        if spent is not None:
            if self.revoke_family_on_reuse:
                self.kill(spent)
            return 401, {
                "error": {
                    "code": "refresh_token_reused",
                    "message": "fake: this refresh token has already been used",
                }
            }
        return 400, {"error": "invalid_grant", "error_description": "fake: unknown refresh token"}

    def authenticate(self, authorization: str, chatgpt_account_id: str) -> str | None:
        """Check a backend call's credentials; None when good, else the 401 error code."""
        scheme, _, token = authorization.partition(" ")
        session = self._by_access.get(token) if scheme.lower() == "bearer" else None
        if session is None or not session.alive:
            return "token_invalidated"
        if session.account.chatgpt_account_id != chatgpt_account_id:
            return "token_invalidated"
        if time.time() >= session.access_expires_at:
            return "token_expired"
        return None

    def token_answer(self, session: TokenSession) -> dict[str, Any]:
        return {
            "access_token": session.access_token,
            "refresh_token": session.refresh_token,
            "id_token": session.id_token,
            "expires_in": max(0, int(session.access_expires_at - time.time())),
            "token_type": "Bearer",
            "scope": "openid profile email offline_access",
        }

    def _issue(self, session: TokenSession) -> None:
        account = session.account
        now = time.time()
        # Whole seconds, rounded up: the token never claims to expire before access_ttl.
        exp = math.ceil(now + self.access_ttl)
        auth_claim = {
            "chatgpt_account_id": account.chatgpt_account_id,
            "chatgpt_plan_type": account.plan,
            "chatgpt_user_id": account.chatgpt_user_id,
            "user_id": account.chatgpt_user_id,
        }
        session.access_token = mint_jwt(
            {
                "iss": "https://auth.openai.com",
                "aud": ["https://api.openai.com/v1"],
                "sub": account.chatgpt_user_id,
                "iat": int(now),
                "exp": exp,
                "jti": secrets.token_hex(8),
                "scp": ["openid", "profile", "email", "offline_access"],
                AUTH_CLAIMS_NAMESPACE: auth_claim,
                "https://api.openai.com/profile": {"email": account.email},
            }
        )
        session.id_token = mint_jwt(
            {
                "iss": "https://auth.openai.com",
                "aud": [CLIENT_ID],
                "sub": account.chatgpt_user_id,
                "iat": int(now),
                "exp": int(now) + 3600,
                "email": account.email,
                "email_verified": True,
                AUTH_CLAIMS_NAMESPACE: auth_claim,
            }
        )
        session.refresh_token = "rt_fake_" + secrets.token_urlsafe(24)
        session.access_expires_at = exp
        self._by_access[session.access_token] = session
        self._by_refresh[session.refresh_token] = session
