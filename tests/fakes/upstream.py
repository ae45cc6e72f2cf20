"""A fake ChatGPT backend and auth server on a real socket, for integration tests.

``FakeUpstream`` holds the state (accounts, token sessions, faults, counters) and serves the
quart-trio app of ``upstream_routes`` with hypercorn on 127.0.0.1 port 0. Tests drive it
through this Python API; subprocess tests use the HTTP control API under ``/_fake/``.
See tests/README.md for the whole harness.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NamedTuple

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .faults import ENDPOINTS, Fault, FaultBook, FaultKind
from .logins import LoginDesk
from .tokens import CLIENT_ID, FakeAccount, TokenSession, TokenVault, auth_json, pkce_challenge
from .upstream_routes import DropConnection, FakeSocket, build_app
from .wire import default_models

log = logging.getLogger("tests.fakes.upstream")


def _not_a_planned_drop(record: logging.LogRecord) -> bool:
    """Logging filter: hide hypercorn's traceback for connections the fake dropped on purpose."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, DropConnection):
        return False
    if isinstance(error, BaseExceptionGroup):
        _planned, rest = error.split(DropConnection)
        return rest is not None
    return True


class RecordedRequest(NamedTuple):
    """One request as the fake saw it (headers lowercased; body parsed JSON or form dict)."""

    endpoint: str
    account_id: str | None
    headers: dict[str, str]
    body: Any


class FakeUpstream:
    """The fake ChatGPT upstream. Create, add accounts, then ``await nursery.start(fake.serve)``."""

    def __init__(
        self,
        *,
        access_ttl: float = 3600.0,
        graceful_timeout: float = 1.0,
        keep_alive_timeout: float = 60.0,
    ) -> None:
        self.graceful_timeout = graceful_timeout
        self.keep_alive_timeout = keep_alive_timeout
        # Behaviour knobs tests set directly.
        self.reply_text = "Hello from the fake upstream."
        self.models: list[dict[str, Any]] = default_models()
        self.websocket_enabled = True
        self.event_delay = 0.0
        self.bind_host = "127.0.0.1"  # a network-namespace test binds the path's address
        self.next_login: FakeAccount | None = None
        self.device_poll_interval = 1
        self.allowed_redirect_uris: set[str] | None = None  # None: any redirect_uri
        self.websocket_max_age: float | None = None  # seconds (trio clock); None: no cap
        self.websocket_close_after_turns: int | None = None  # close each socket after N turns
        self.models_etag = "fake-models-etag-1"
        self.transcription_text: str | None = None  # None: "fake transcription of N bytes"
        self.sockets: set[FakeSocket] = set()  # open WebSockets
        self.ws_raw_frames: list[str] = []  # every text frame received, exactly as sent
        # State.
        self.accounts: dict[str, FakeAccount] = {}
        self.requests: list[RecordedRequest] = []
        self.faults = FaultBook()
        self.vault = TokenVault(access_ttl=access_ttl)
        self.logins = LoginDesk(self.vault, self.login_account)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._recorded = trio.Event()  # set and replaced on every recorded request
        # Serving.
        self._port: int | None = None
        self._closing = trio.Event()
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._stopped.set()

    # --- addresses ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not serving")
        return self._port

    @property
    def base_url(self) -> str:
        return self.base_url_for(self.port)

    @property
    def auth_base_url(self) -> str:
        return self.auth_base_url_for(self.port)

    def base_url_for(self, port: int) -> str:
        """The upstream base as reached through ``port`` (a chaos proxy's, say)."""
        return f"http://127.0.0.1:{port}/backend-api"

    def auth_base_url_for(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    # --- serving ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 port 0 until cancelled or ``aclose()``; report the port.

        Cancel-safe: cancelling tears the server down at once (no graceful wait).
        """
        if not self._stopped.is_set():
            raise RuntimeError("FakeUpstream is already serving")
        self._closing = trio.Event()
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        config = HypercornConfig()
        config.bind = [f"{self.bind_host}:0"]
        config.graceful_timeout = self.graceful_timeout
        config.keep_alive_timeout = self.keep_alive_timeout
        errorlog = logging.getLogger("tests.fakes.upstream.hypercorn")
        errorlog.addFilter(_not_a_planned_drop)  # idempotent: the same filter is added once
        config.errorlog = errorlog
        config.accesslog = None
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(
                        hypercorn_serve,
                        build_app(self),
                        config,
                        shutdown_trigger=self._shutdown.wait,
                    )
                )
                self._port = int(binds[0].rsplit(":", 1)[1])
                log.debug("fake upstream listening on port %d", self._port)
                task_status.started(self._port)
        finally:
            self._port = None
            self._closing.set()
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop gracefully: hung streams drop, then hypercorn drains within graceful_timeout.

        Returns once ``serve`` has returned. Cancel-safe: a cancelled wait leaves the
        shutdown under way.
        """
        self._closing.set()
        self._shutdown.set()
        await self._stopped.wait()

    @property
    def closing(self) -> trio.Event:
        """Set when the server starts shutting down: hung handlers wait on it."""
        return self._closing

    # --- accounts and tokens ------------------------------------------------------

    def add_account(
        self,
        *,
        email: str = "a@example.com",
        chatgpt_account_id: str = "acct-a",
        plan: str = "plus",
        chatgpt_user_id: str | None = None,
    ) -> FakeAccount:
        """Create an account with one fresh token session."""
        if chatgpt_account_id in self.accounts:
            raise ValueError(f"account {chatgpt_account_id!r} exists already")
        account = FakeAccount(
            email=email,
            chatgpt_account_id=chatgpt_account_id,
            plan=plan,
            chatgpt_user_id=chatgpt_user_id or "user-" + secrets.token_hex(6),
        )
        self.accounts[chatgpt_account_id] = account
        self.new_session(account)
        return account

    def account(self, chatgpt_account_id: str) -> FakeAccount:
        return self.accounts[chatgpt_account_id]

    def new_session(self, account: FakeAccount) -> TokenSession:
        """Start an independent token family for ``account`` (what a fresh login does)."""
        return self.vault.new_session(account)

    def rotate_tokens(self, chatgpt_account_id: str) -> FakeAccount:
        """Refresh the latest session out of band, as another client sharing it would."""
        account = self.accounts[chatgpt_account_id]
        self.vault.rotate(account.latest)
        return account

    def revoke_access_token(self, chatgpt_account_id: str) -> None:
        """Make the latest access token stale (401 token_invalidated); refreshing still works."""
        self.vault.revoke_access(self.accounts[chatgpt_account_id].latest)

    def revoke_sessions(self, chatgpt_account_id: str) -> None:
        """Kill every token family of the account: refresh answers refresh_token_invalidated."""
        for session in self.accounts[chatgpt_account_id].sessions:
            self.vault.kill(session)

    def auth_json(self, account: FakeAccount) -> dict[str, Any]:
        """The account's latest tokens in Codex CLI's auth.json shape."""
        return auth_json(account)

    # Settings that live in the vault and the login desk, exposed flat for tests.

    @property
    def access_ttl(self) -> float:
        """Lifetime of access tokens issued from now on, in seconds."""
        return self.vault.access_ttl

    @access_ttl.setter
    def access_ttl(self, seconds: float) -> None:
        self.vault.access_ttl = seconds

    @property
    def revoke_family_on_reuse(self) -> bool:
        """Whether presenting a spent refresh token also kills its family."""
        return self.vault.revoke_family_on_reuse

    @revoke_family_on_reuse.setter
    def revoke_family_on_reuse(self, value: bool) -> None:
        self.vault.revoke_family_on_reuse = value

    @property
    def device_auto_approve_after(self) -> int | None:
        """Approve device logins by themselves after this many pending polls (None: never)."""
        return self.logins.device_auto_approve_after

    @device_auto_approve_after.setter
    def device_auto_approve_after(self, polls: int | None) -> None:
        self.logins.device_auto_approve_after = polls

    # --- logins -------------------------------------------------------------------

    def login_account(self) -> FakeAccount | None:
        """Who an auto-approved login logs in as: ``next_login``, else the first account."""
        if self.next_login is not None:
            return self.next_login
        return next(iter(self.accounts.values()), None)

    def approve_device(self, user_code: str, account: FakeAccount | None = None) -> None:
        """Approve a pending device login as ``account`` (default: ``login_account()``)."""
        self.logins.approve_device(user_code, account)

    # --- websockets ---------------------------------------------------------------

    def close_idle_websockets(self) -> int:
        """Close every open WebSocket that is between turns (an idle socket dying).

        Returns how many it closed; each close is recorded as ``ws_idle_closes``.
        """
        idle = [sock for sock in self.sockets if not sock.in_turn]
        for sock in idle:
            sock.close_idle.set()
        return len(idle)

    def age_out_websockets(self) -> int:
        """Every open WebSocket refuses its next turn as the 60-minute cap does
        (an ``error`` frame ``websocket_connection_limit_reached``, then a close)."""
        for sock in self.sockets:
            sock.aged = True
        return len(self.sockets)

    # --- faults, usage, counters --------------------------------------------------

    def fault(
        self, chatgpt_account_id: str, endpoint: str, fault: Fault, *, times: int | None = 1
    ) -> None:
        """Queue ``fault`` for the next ``times`` matching requests (None: until cleared)."""
        if fault.kind is FaultKind.STREAM_FAILED and endpoint not in ("responses", "ws"):
            raise ValueError("stream_failed only applies to 'responses' and 'ws'")
        self.faults.add(chatgpt_account_id, endpoint, fault, times)

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_usage(
        self,
        chatgpt_account_id: str,
        *,
        primary_used: float | None = None,
        primary_reset_at: float | None = None,
        secondary_used: float | None = None,
        secondary_reset_at: float | None = None,
        has_credits: bool | None = None,
        credits_balance: str | None = None,
        credits_unlimited: bool | None = None,
        extra_limits: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        """Change what /wham/usage, the x-codex-* headers and codex.rate_limits report."""
        usage = self.accounts[chatgpt_account_id].usage
        if has_credits is not None:
            usage.has_credits = has_credits
        if credits_balance is not None:
            usage.credits_balance = credits_balance
        if credits_unlimited is not None:
            usage.credits_unlimited = credits_unlimited
        if extra_limits is not None:
            usage.extra_limits = dict(extra_limits)
        if primary_used is not None:
            usage.primary_used = primary_used
        if primary_reset_at is not None:
            usage.primary_reset_at = primary_reset_at
        if secondary_used is not None:
            usage.secondary_used = secondary_used
        if secondary_reset_at is not None:
            usage.secondary_reset_at = secondary_reset_at

    def record(
        self, endpoint: str, account_id: str | None, headers: dict[str, str], body: Any
    ) -> None:
        self._counts[(endpoint, account_id or "")] += 1
        self.requests.append(RecordedRequest(endpoint, account_id, headers, body))
        self._recorded.set()
        self._recorded = trio.Event()

    async def wait_for_count(
        self, endpoint: str, at_least: int = 1, chatgpt_account_id: str | None = None
    ) -> None:
        """Wait until ``count(endpoint, chatgpt_account_id) >= at_least``.

        No deadline of its own: call it under ``trio.fail_after``. Cancel-safe.
        """
        while self.count(endpoint, chatgpt_account_id) < at_least:
            await self._recorded.wait()

    def count(self, endpoint: str, chatgpt_account_id: str | None = None) -> int:
        """Requests that reached ``endpoint`` (all accounts when no account is given)."""
        if chatgpt_account_id is not None:
            return self._counts[(endpoint, chatgpt_account_id)]
        return sum(n for (name, _), n in self._counts.items() if name == endpoint)

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """``{endpoint: {account_id: count}}``; requests with no known account count under ""."""
        out: dict[str, dict[str, int]] = {}
        for (endpoint, account), n in sorted(self._counts.items()):
            out.setdefault(endpoint, {})[account] = n
        return out

    def requests_for(
        self, endpoint: str, chatgpt_account_id: str | None = None
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if r.endpoint == endpoint
            and (chatgpt_account_id is None or r.account_id == chatgpt_account_id)
        ]

    def reset(self) -> None:
        """Forget faults, counters and recorded requests; accounts and tokens stay."""
        self.faults.clear()
        self._counts.clear()
        self.requests.clear()
        self.ws_raw_frames.clear()


@asynccontextmanager
async def open_fake_upstream(**kwargs: Any) -> AsyncIterator[FakeUpstream]:
    """Run a FakeUpstream for the duration of the block; cancelled (not drained) at exit."""
    fake = FakeUpstream(**kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


__all__ = [
    "CLIENT_ID",
    "ENDPOINTS",
    "FakeAccount",
    "FakeUpstream",
    "Fault",
    "FaultKind",
    "RecordedRequest",
    "TokenSession",
    "open_fake_upstream",
    "pkce_challenge",
]
