"""TokenRefresher unit tests: an in-process token endpoint (MockTransport), autojump clock."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import trio
import trio.testing

from actors.accounts import Account, AccountStatus, InMemoryAccountStore, TokenSet
from actors.client_manager import ClientManager, ClientSettings
from actors.errors import PermanentAuth, TransportError
from actors.token_refresher import RefreshSettings, TokenRefresher
from tests.fakes.jwt import mint_jwt

BASE_WALL = 1_800_000_000.0
NAMESPACE = "https://api.openai.com/auth"


def wall() -> float:
    return BASE_WALL + trio.current_time()


def tokens_expiring(at: float, n: int) -> TokenSet:
    return TokenSet(
        access_token=mint_jwt({"exp": int(at), NAMESPACE: {"chatgpt_account_id": "acct-1"}}),
        refresh_token=f"rt-{n}",
        id_token=mint_jwt({"email": "a@example.com", "exp": int(at),
                           NAMESPACE: {"chatgpt_account_id": "acct-1", "chatgpt_plan_type": "pro"}}),
    )


class TokenEndpoint:
    """Single-use refresh tokens, like the real one; scripted failures."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.valid = {"rt-0"}
        self.calls = 0
        self.issued = 0
        self.fail_next: list[str] = []  # "transport" | "reused" | "500"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/oauth/token"
        self.calls += 1
        body = json.loads(request.content)
        if self.fail_next:
            kind = self.fail_next.pop(0)
            if kind == "transport":
                raise httpx.ConnectError("connection refused", request=request)
            if kind == "500":
                return httpx.Response(500, json={"error": "server_error"})
            if kind == "deactivated":
                return httpx.Response(401, json={"error": {"code": "account_deactivated"}})
        if body["refresh_token"] not in self.valid:
            return httpx.Response(401, json={"error": {"code": "refresh_token_reused", "message": "reused"}})
        self.valid.discard(body["refresh_token"])
        self.issued += 1
        new = tokens_expiring(wall() + self.lifetime, self.issued)
        self.valid.add(new.refresh_token)
        return httpx.Response(200, json={"access_token": new.access_token, "refresh_token": new.refresh_token,
                                         "id_token": new.id_token, "expires_in": self.lifetime})


def account(expires_at: float) -> Account:
    return Account(id="acc_1", email="a@example.com", chatgpt_account_id="acct-1", plan="plus",
                   tokens=tokens_expiring(expires_at, 0), access_expires_at=expires_at)


async def start(nursery, endpoint: TokenEndpoint, store, *, background=True, spacing=2.0):
    factory = lambda generation: httpx.AsyncClient(transport=httpx.MockTransport(endpoint))  # noqa: E731
    clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
    refresher = TokenRefresher(
        store=store, clients=clients, wall_clock=wall, background=background,
        settings=RefreshSettings(auth_base_url="http://auth.test", margin=600, spacing=spacing, jitter=0),
    )
    tokens = await nursery.start(refresher.run)
    return clients, tokens, refresher


async def test_concurrent_ensure_fresh_shares_one_refresh(autojump_clock):
    endpoint = TokenEndpoint()
    store = InMemoryAccountStore([account(wall() + 60)])  # inside the margin
    results = []
    async with trio.open_nursery() as nursery:
        clients, tokens, _ = await start(nursery, endpoint, store, background=False)

        async def ask() -> None:
            results.append(await tokens.ensure_fresh("acc_1"))

        async with trio.open_nursery() as burst:
            for _ in range(20):
                burst.start_soon(ask)
        assert endpoint.calls == 1
        assert {r.tokens.refresh_token for r in results} == {"rt-1"}
        assert (await store.get("acc_1")).tokens.refresh_token == "rt-1"
        assert (await store.get("acc_1")).plan == "pro"  # from the new id_token
        # fresh now: no further call
        await tokens.ensure_fresh("acc_1")
        assert endpoint.calls == 1
        nursery.cancel_scope.cancel()


async def test_reused_refresh_token_marks_reauth_and_stops_calling(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.valid = set()  # the CLI's own copy already used it
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        _, tokens, _ = await start(nursery, endpoint, store)
        with pytest.raises(PermanentAuth) as info:
            await tokens.ensure_fresh("acc_1")
        assert info.value.code == "refresh_token_reused"
        stored = await store.get("acc_1")
        assert stored.status is AccountStatus.REAUTH_REQUIRED
        assert stored.status_reason == "refresh_token_reused"
        calls = endpoint.calls
        with pytest.raises(PermanentAuth):
            await tokens.ensure_fresh("acc_1", force=True)
        await trio.sleep(3600)  # the background loop leaves it alone too
        assert endpoint.calls == calls == 1
        nursery.cancel_scope.cancel()


async def test_deactivated_code_marks_account_deactivated(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["deactivated"]
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        _, tokens, _ = await start(nursery, endpoint, store, background=False)
        with pytest.raises(PermanentAuth):
            await tokens.ensure_fresh("acc_1")
        assert (await store.get("acc_1")).status is AccountStatus.DEACTIVATED
        nursery.cancel_scope.cancel()


async def test_transport_failure_rotates_once_and_retry_succeeds(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["transport"]
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        clients, tokens, _ = await start(nursery, endpoint, store, background=False)
        fresh = await tokens.ensure_fresh("acc_1")
        assert fresh.tokens.refresh_token == "rt-1"
        stats = await clients.stats()
        assert stats.generation == 2
        assert stats.rotations == {"transport": 1}
        nursery.cancel_scope.cancel()


async def test_two_transport_failures_give_up_after_one_rotation(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["transport", "transport"]
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        clients, tokens, _ = await start(nursery, endpoint, store, background=False)
        with pytest.raises(TransportError):
            await tokens.ensure_fresh("acc_1")
        assert (await clients.stats()).rotations == {"transport": 1}
        assert (await store.get("acc_1")).status is AccountStatus.ACTIVE  # not penalised
        nursery.cancel_scope.cancel()


async def test_server_error_keeps_status_and_backs_off(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["500"]
    store = InMemoryAccountStore([account(wall() + 700)])
    async with trio.open_nursery() as nursery:
        clients, _, _ = await start(nursery, endpoint, store)
        await trio.sleep(101)  # due at 100 s; fails; retried after a backoff, not in a loop
        assert endpoint.calls == 1
        assert (await store.get("acc_1")).status is AccountStatus.ACTIVE
        await trio.sleep(60)
        assert endpoint.calls == 2
        assert (await store.get("acc_1")).tokens.refresh_token == "rt-1"
        assert (await clients.stats()).rotations == {}
        nursery.cancel_scope.cancel()


async def test_background_loop_refreshes_ten_minutes_before_expiry_once(autojump_clock):
    endpoint = TokenEndpoint(lifetime=4 * 3600)
    expires = wall() + 3600
    store = InMemoryAccountStore([account(expires)])
    refreshed_at = []
    async with trio.open_nursery() as nursery:
        _, _, refresher = await start(nursery, endpoint, store)
        while endpoint.calls == 0:
            await trio.sleep(1)
        refreshed_at.append(wall())
        await trio.sleep(2 * 3600)  # well past the old expiry, before the new margin
        nursery.cancel_scope.cancel()
    assert endpoint.calls == 1
    assert expires - 601 <= refreshed_at[0] <= expires - 599


async def test_refreshes_of_different_accounts_are_spaced(autojump_clock):
    endpoint = TokenEndpoint()
    accounts = []
    for i in range(4):
        accounts.append(Account(id=f"acc_{i}", email=f"{i}@example.com", chatgpt_account_id=f"acct-{i}",
                                tokens=TokenSet(access_token="a", refresh_token="rt-0", id_token="i"),
                                access_expires_at=wall() + 10))
    store = InMemoryAccountStore(accounts)
    stamps: list[float] = []

    def stamping(request: httpx.Request) -> httpx.Response:
        stamps.append(trio.current_time())
        return httpx.Response(500, json={"error": "server_error"})

    async with trio.open_nursery() as nursery:
        factory = lambda generation: httpx.AsyncClient(transport=httpx.MockTransport(stamping))  # noqa: E731
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
        refresher = TokenRefresher(store=store, clients=clients, wall_clock=wall,
                                   settings=RefreshSettings(auth_base_url="http://auth.test", spacing=2.0, jitter=0))
        await nursery.start(refresher.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(stamps) == 4
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(gap >= 2.0 for gap in gaps), gaps


async def test_tokens_never_logged(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["transport"]
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        _, tokens, _ = await start(nursery, endpoint, store, background=False)
        fresh = await tokens.ensure_fresh("acc_1")
        nursery.cancel_scope.cancel()
    assert "token refreshed account=acc_1" in caplog.text
    for secret in (fresh.tokens.access_token, fresh.tokens.refresh_token, fresh.tokens.id_token, "rt-0"):
        assert secret not in caplog.text


async def test_rotate_on_transport_false_raises_without_rotating(autojump_clock):
    endpoint = TokenEndpoint()
    endpoint.fail_next = ["transport"]
    store = InMemoryAccountStore([account(wall() + 60)])
    async with trio.open_nursery() as nursery:
        clients, tokens, _ = await start(nursery, endpoint, store, background=False)
        with pytest.raises(TransportError) as info:
            await tokens.ensure_fresh("acc_1", rotate_on_transport=False)
        assert info.value.generation == 1  # the caller needs it to rotate by itself
        assert endpoint.calls == 1  # no retry behind the caller's back
        stats = await clients.stats()
        assert (stats.generation, stats.rotations) == (1, {})
        # The caller rotates and asks again: the refresh goes through on generation 2.
        await clients.rotate(seen_generation=info.value.generation)
        fresh = await tokens.ensure_fresh("acc_1", rotate_on_transport=False)
        assert fresh.tokens.refresh_token == "rt-1"
        nursery.cancel_scope.cancel()
