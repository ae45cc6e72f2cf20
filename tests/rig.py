"""An in-process engine for actor unit tests: the real ClientManager, TokenRefresher and
ProxyHandler in one trio run (autojump clock), an upstream and auth server as one
``httpx.MockTransport`` handler, and an in-memory store whose operations can fail or take
time like a disk.

Used by tests/test_isolation.py and tests/test_token_durability.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from actors.accounts import (
    Account,
    AccountNotFound,
    AccountStatus,
    InMemoryAccountStore,
    StoreFailure,
    TokenSet,
    Usage,
)
from actors.client_manager import ClientHandle, ClientManager, ClientSettings
from actors.proxy_handler import ProxyHandle, ProxyHandler, ProxyRequest, ProxySettings
from actors.token_refresher import RefreshSettings, TokenHandle, TokenRefresher
from actors.upstream import parse_event_json

BASE_WALL = 1_800_000_000.0
BASE_URL = "http://backend.test/backend-api"
AUTH_URL = "http://auth.test"


def wall() -> float:
    return BASE_WALL + trio.current_time()


class FlakyStore(InMemoryAccountStore):
    """An in-memory store that fails on demand and can take time per write (a disk)."""

    def __init__(self, accounts: list[Account]) -> None:
        super().__init__(accounts)
        self.fail: dict[str, int] = {}  # operation name -> how many calls fail next
        self.broken: dict[str, Exception] = {}  # operation name -> raised on every call
        self.hidden: set[str] = set()  # ids that get() pretends were removed
        self.write_delay = 0.0
        self.writes: list[tuple[str, str]] = []  # (operation, account id), in commit order

    async def _enter(self, operation: str) -> None:
        if operation in self.broken:
            raise self.broken[operation]
        if self.fail.get(operation, 0) > 0:
            self.fail[operation] -= 1
            raise StoreFailure(f"store.db: disk I/O error ({operation})")

    async def _write_delay(self) -> None:
        if self.write_delay:
            await trio.sleep(self.write_delay)

    async def list_accounts(self) -> list[Account]:
        await self._enter("list_accounts")
        return await super().list_accounts()

    async def get(self, account_id: str) -> Account:
        await self._enter("get")
        if account_id in self.hidden:
            raise AccountNotFound(account_id)
        return await super().get(account_id)

    async def save_tokens(self, account_id: str, tokens: TokenSet, **kwargs: Any) -> Account:
        await self._enter("save_tokens")
        await self._write_delay()
        self.writes.append(("save_tokens", account_id))
        return await super().save_tokens(account_id, tokens, **kwargs)

    async def set_status(self, account_id: str, status: AccountStatus, reason: str = "",
                         **kwargs: Any) -> Account:
        await self._enter("set_status")
        await self._write_delay()
        self.writes.append(("set_status", account_id))
        return await super().set_status(account_id, status, reason, **kwargs)

    async def set_cooldown(self, account_id: str, until: float | None) -> Account:
        await self._enter("set_cooldown")
        await self._write_delay()
        self.writes.append(("set_cooldown", account_id))
        return await super().set_cooldown(account_id, until)

    async def set_usage(self, account_id: str, usage: Usage) -> Account:
        await self._enter("set_usage")
        await self._write_delay()
        self.writes.append(("set_usage", account_id))
        return await super().set_usage(account_id, usage)

    async def merge_usages(
        self, readings: Mapping[str, Usage], merge: Callable[[Usage, Usage], Usage]
    ) -> None:
        await self._enter("merge_usages")
        await self._write_delay()
        self.writes.append(("merge_usages", ",".join(sorted(readings))))
        await super().merge_usages(readings, merge)


def make_account(n: int, *, expires_in: float = 10 * 86400) -> Account:
    acct = f"acct-{n}"
    return Account(
        id=f"acc_{n}", email=f"{n}@example.com", chatgpt_account_id=acct, plan="plus",
        tokens=TokenSet(access_token=f"at-{acct}-0", refresh_token=f"rt-{acct}-0",
                        id_token="not-a-jwt"),
        access_expires_at=wall() + expires_in, created_at=float(n),
    )


Handler = Callable[[httpx.Request], Awaitable[httpx.Response | None]]


@dataclass
class Upstream:
    """The backend's /codex/responses and the auth server's /oauth/token.

    Refresh tokens are single use and rotate the whole pair on receipt (before the answer
    is sent, like a real server whose answer may then be lost). ``before`` hooks run first
    per endpoint and may answer instead (return a Response) or raise.
    """

    access: dict[str, str] = field(default_factory=dict)  # access token -> account
    refresh: dict[str, str] = field(default_factory=dict)  # live refresh token -> account
    spent: set[str] = field(default_factory=set)
    presented: list[str] = field(default_factory=list)  # refresh tokens, in order
    reused: int = 0  # spent refresh tokens presented again
    issued: int = 0
    responses: list[str] = field(default_factory=list)  # account per responses request
    before: dict[str, list[Handler]] = field(default_factory=dict)
    token_delay: float = 0.0  # after rotating, before answering
    event_delay: float = 0.0
    events: int = 3  # output_text deltas per stream
    after_terminal: str | None = None  # "reset": the connection breaks after the last event
    rate_limits_event: bool = True

    def add(self, account: Account) -> Account:
        self.access[account.tokens.access_token] = account.chatgpt_account_id
        self.refresh[account.tokens.refresh_token] = account.chatgpt_account_id
        return account

    def handler(self, generation: int) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
        async def handle(request: httpx.Request) -> httpx.Response:
            endpoint = "token" if request.url.path == "/oauth/token" else "responses"
            hooks = self.before.get(endpoint) or []
            if hooks:
                answer = await hooks.pop(0)(request)
                if answer is not None:
                    return answer
            if endpoint == "token":
                return await self._token(request)
            return self._responses(request)

        return handle

    async def _token(self, request: httpx.Request) -> httpx.Response:
        presented = json.loads(request.content)["refresh_token"]
        self.presented.append(presented)
        acct = self.refresh.pop(presented, None)
        if presented in self.spent:
            self.reused += 1
        if acct is None:
            return httpx.Response(401, json={"error": {"code": "refresh_token_reused"}})
        self.spent.add(presented)
        self.issued += 1
        access, refresh = f"at-{acct}-{self.issued}", f"rt-{acct}-{self.issued}"
        for token in [t for t, a in self.access.items() if a == acct]:
            del self.access[token]  # the old access token dies with the rotation
        self.access[access], self.refresh[refresh] = acct, acct
        if self.token_delay:
            await trio.sleep(self.token_delay)
        return httpx.Response(200, json={"access_token": access, "refresh_token": refresh,
                                         "id_token": "not-a-jwt", "expires_in": 864000})

    def _responses(self, request: httpx.Request) -> httpx.Response:
        acct = request.headers["chatgpt-account-id"]
        self.responses.append(acct)
        token = request.headers["authorization"].removeprefix("Bearer ")
        if self.access.get(token) != acct:
            return httpx.Response(401, json={"error": {"code": "token_invalidated"}})
        return httpx.Response(
            200, headers={"content-type": "text/event-stream",
                          "x-codex-primary-used-percent": "12",
                          "x-codex-primary-window-minutes": "300"},
            content=self._stream(acct))

    async def _stream(self, acct: str) -> AsyncIterator[bytes]:
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {"id": "resp_1"}},
            *({"type": "response.output_text.delta", "delta": f"w{i} "}
              for i in range(self.events)),
        ]
        if self.rate_limits_event:
            events.append({"type": "codex.rate_limits", "rate_limits": {
                "secondary": {"used_percent": 33.0, "window_minutes": 10080}}})
        events.append({"type": "response.completed", "response": {"id": "resp_1", "usage": {}}})
        for event in events:
            if self.event_delay:
                await trio.sleep(self.event_delay)
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        if self.after_terminal == "reset":
            raise httpx.RemoteProtocolError("peer closed connection without sending complete "
                                            "message body")


@dataclass
class Rig:
    upstream: Upstream
    store: FlakyStore
    clients: ClientHandle
    tokens: TokenHandle
    proxy: ProxyHandle
    refresher: TokenRefresher
    handler: ProxyHandler
    nursery: trio.Nursery

    async def rotations(self) -> int:
        return (await self.clients.stats()).rotations.get("transport", 0)


@asynccontextmanager
async def rig(
    accounts: list[Account], *, upstream: Upstream | None = None, background: bool = False,
    refresh: dict[str, Any] | None = None, clients: dict[str, Any] | None = None,
    on_record: Any = None,
) -> AsyncIterator[Rig]:
    """The engine without hypercorn; the proxy runs under a real supervisor (restarts and all)."""
    from actors.supervisor import supervise

    upstream = upstream or Upstream()
    for account in accounts:
        upstream.add(account)
    store = FlakyStore(accounts)
    factory = lambda generation: httpx.AsyncClient(  # noqa: E731
        transport=httpx.MockTransport(upstream.handler(generation)))
    async with trio.open_nursery() as nursery:
        settings = ClientSettings(**(clients or {}))
        clients = await nursery.start(ClientManager(settings, client_factory=factory).run)
        refresher = TokenRefresher(
            store=store, clients=clients, wall_clock=wall, background=background,
            settings=RefreshSettings(auth_base_url=AUTH_URL, spacing=0.0, jitter=0,
                                     **(refresh or {})),
        )
        tokens = await nursery.start(supervise, "token refresher", refresher.run)
        handler = ProxyHandler(store=store, clients=clients, tokens=tokens, wall_clock=wall,
                               settings=ProxySettings(base_url=BASE_URL), on_record=on_record)
        proxy = await nursery.start(supervise, "proxy handler", handler.run)
        yield Rig(upstream, store, clients, tokens, proxy, refresher, handler, nursery)
        nursery.cancel_scope.cancel()


def turn(**changes: Any) -> ProxyRequest:
    fields: dict[str, Any] = {
        "path": "/codex/responses", "headers": (("session-id", "s1"),),
        "body": {"model": "gpt-5", "input": "hi", "stream": True},
    }
    fields.update(changes)
    return ProxyRequest(**fields)


async def events_of(proxy: ProxyHandle, request: ProxyRequest) -> list[dict[str, Any]]:
    """Forward a streamed request and read every event payload to the end of the stream."""
    exchange = await proxy.forward(request)
    assert exchange.events is not None
    payloads = []
    with exchange.events:
        async for event in exchange.events:
            payload = parse_event_json(event)
            assert payload is not None
            payloads.append(payload)
    return payloads
