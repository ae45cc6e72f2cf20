"""RefreshScheduler unit tests: an in-process upstream (MockTransport), autojump clock.

The real ClientManager and TokenRefresher run too, so rotations are real generations and
token refreshes go through the single-flight actor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from actors.accounts import (
    Account,
    AccountStatus,
    InMemoryAccountStore,
    StoreFailure,
    TokenSet,
    Usage,
    UsageWindow,
)
from actors.client_manager import ClientHandle, ClientManager, ClientSettings
from actors.messages import Catalog, UsageUpdate
from actors.refresh_scheduler import RefreshScheduler, SchedulerHandle, SchedulerSettings
from actors.token_refresher import RefreshSettings, TokenRefresher

BASE_WALL = 1_800_000_000.0
BASE_URL = "http://backend.test/backend-api"
NEVER = math.inf  # a first_cycle_delay that leaves every cycle to the test


def wall() -> float:
    return BASE_WALL + trio.current_time()


class Upstream:
    """The backend and the token endpoint in one MockTransport handler.

    Access and refresh tokens are plain strings; refresh tokens are single use. Failures
    are scripted per (endpoint, chatgpt account id or "*"): "transport", "500",
    "invalid", "not_json", "401"; ``always`` makes an endpoint fail with a kind forever;
    ``dead`` makes an endpoint time out on the given generations.
    """

    def __init__(self) -> None:
        self.models = {
            "plus": [{"slug": "gpt-a", "display_name": "A", "x_unknown_field": {"kept": True}}],
            "pro": [{"slug": "gpt-a", "display_name": "A"}, {"slug": "gpt-b", "display_name": "B"}],
        }
        self.usage: dict[str, dict[str, Any]] = {}
        self.fail: dict[tuple[str, str], list[str]] = {}
        self.always: dict[str, str] = {}
        self.dead: set[tuple[str, int]] = set()  # (endpoint, generation): a stale pool
        self.calls: list[tuple[str, str, int]] = []  # (endpoint, account, generation)
        self.access: dict[str, str] = {}  # access token -> chatgpt account id
        self.refresh: dict[str, str] = {}  # live refresh token -> chatgpt account id
        self.plan: dict[str, str] = {}
        self.issued = 0
        self.seen_access: list[str] = []
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[float] = []

    def account(self, n: int, plan: str = "plus", **changes: Any) -> Account:
        acct = f"acct-{n}"
        access, refresh = f"at-{acct}-0", f"rt-{acct}-0"
        self.access[access], self.refresh[refresh], self.plan[acct] = acct, acct, plan
        self.usage[acct] = usage_body(10, wall() + 18000, 5, wall() + 7 * 86400)
        fields: dict[str, Any] = dict(
            id=f"acc_{n}", email=f"{n}@example.com", chatgpt_account_id=acct, plan=plan,
            tokens=TokenSet(access_token=access, refresh_token=refresh, id_token="not-a-jwt"),
            access_expires_at=wall() + 10 * 86400, created_at=float(n),
        )
        fields.update(changes)
        return Account(**fields)

    def _failure(self, endpoint: str, acct: str) -> str | None:
        if endpoint in self.always:
            return self.always[endpoint]
        for key in ((endpoint, acct), (endpoint, "*")):
            queue = self.fail.get(key)
            if queue:
                return queue.pop(0)
        return None

    def handler(self, generation: int) -> Any:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.starts.append(trio.current_time())
            try:
                if self.delay:
                    await trio.sleep(self.delay)
                return self._answer(request, generation)
            finally:
                self.in_flight -= 1

        return handle

    def _answer(self, request: httpx.Request, generation: int) -> httpx.Response:
        path = request.url.path
        if path == "/oauth/token":
            body = json.loads(request.content)
            acct = self.refresh.get(body["refresh_token"], "?")
            self.calls.append(("token", acct, generation))
            failure = self._failure("token", acct)
            if failure == "transport":
                raise httpx.ConnectError("connection refused", request=request)
            if acct == "?":
                return httpx.Response(401, json={"error": {"code": "refresh_token_reused"}})
            del self.refresh[body["refresh_token"]]
            self.issued += 1
            access, refresh = f"at-{acct}-{self.issued}", f"rt-{acct}-{self.issued}"
            self.access[access], self.refresh[refresh] = acct, acct
            return httpx.Response(200, json={"access_token": access, "refresh_token": refresh,
                                             "id_token": "not-a-jwt", "expires_in": 864000})
        endpoint = {"/backend-api/codex/models": "models", "/backend-api/wham/usage": "usage"}[path]
        acct = request.headers["chatgpt-account-id"]
        self.calls.append((endpoint, acct, generation))
        token = request.headers["authorization"].removeprefix("Bearer ")
        self.seen_access.append(token)
        failure = self._failure(endpoint, acct)
        if failure == "transport" or (endpoint, generation) in self.dead:
            raise httpx.ReadTimeout("timed out", request=request)
        if failure == "500":
            return httpx.Response(500, json={"error": {"code": "server_error", "message": "boom"}})
        if failure == "invalid":
            return httpx.Response(200, json={"detail": "no models here"})
        if failure == "not_json":
            return httpx.Response(200, text="<html>gateway</html>")
        if failure == "401" or self.access.get(token) != acct:
            return httpx.Response(401, json={"error": {"code": "token_invalidated"}})
        if endpoint == "models":
            assert request.url.params["client_version"] == "0.169.0"
            return httpx.Response(200, json={"models": self.models[self.plan[acct]]})
        return httpx.Response(200, json=self.usage[acct])

    def count(self, endpoint: str) -> int:
        return sum(1 for call in self.calls if call[0] == endpoint)


def usage_body(
    primary: float, primary_reset: float, secondary: float, secondary_reset: float
) -> dict[str, Any]:
    def window(used: float, reset_at: float, seconds: int) -> dict[str, Any]:
        return {"used_percent": used, "reset_at": int(reset_at), "limit_window_seconds": seconds,
                "reset_after_seconds": max(0, int(reset_at - wall()))}

    return {"plan_type": "plus", "credits": {"has_credits": False},
            "rate_limit": {"primary_window": window(primary, primary_reset, 18000),
                           "secondary_window": window(secondary, secondary_reset, 604800)}}


@dataclass
class Rig:
    upstream: Upstream
    store: InMemoryAccountStore
    clients: ClientHandle
    scheduler: SchedulerHandle
    updates: trio.MemoryReceiveChannel[Catalog | UsageUpdate]

    async def rotations(self) -> int:
        return (await self.clients.stats()).rotations.get("transport", 0)


@asynccontextmanager
async def rig(upstream: Upstream, accounts: list[Account], **settings: Any) -> AsyncIterator[Rig]:
    store = InMemoryAccountStore(accounts)
    factory = lambda generation: httpx.AsyncClient(  # noqa: E731
        transport=httpx.MockTransport(upstream.handler(generation)))
    updates_send, updates_recv = trio.open_memory_channel[Catalog | UsageUpdate](100)
    async with trio.open_nursery() as nursery:
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
        refresher = TokenRefresher(
            store=store, clients=clients, wall_clock=wall, background=False,
            settings=RefreshSettings(auth_base_url="http://auth.test", spacing=0.0, jitter=0),
        )
        tokens = await nursery.start(refresher.run)
        options: dict[str, Any] = {"base_url": BASE_URL, "first_cycle_delay": NEVER} | settings
        scheduler = RefreshScheduler(
            store=store, clients=clients, tokens=tokens, settings=SchedulerSettings(**options),
            wall_clock=wall, updates=updates_send,
        )
        handle = await nursery.start(scheduler.run)
        yield Rig(upstream, store, clients, handle, updates_recv)
        await handle.shutdown()
        nursery.cancel_scope.cancel()


async def test_model_fetch_transport_failure_rotates_once_and_retry_succeeds(
    autojump_clock, caplog
):
    caplog.set_level(logging.INFO, logger="codex_lb_trio.scheduler")
    upstream = Upstream()
    upstream.fail[("models", "*")] = ["transport"]
    async with rig(upstream, [upstream.account(1)]) as r:
        report = await r.scheduler.refresh_now()
        catalog = await r.scheduler.catalog(fetch_if_missing=False)
        assert await r.rotations() == 1
        assert (await r.clients.stats()).generation == 2
    assert [c for c in upstream.calls if c[0] == "models"] == [
        ("models", "acct-1", 1), ("models", "acct-1", 2)]
    assert catalog is not None
    assert [m["slug"] for m in catalog.models] == ["gpt-a"]
    assert catalog.models[0]["x_unknown_field"] == {"kept": True}  # raw JSON kept
    assert catalog.fetched_at == pytest.approx(BASE_WALL, abs=5)
    assert report["models"] == 1
    assert report["catalog_refreshed"] is True
    assert report["rotations"] == 1
    assert report["errors"] == []
    assert ("model refresh plan=plus account=acc_1 error=transport step=fetch rotated "
            "generation=1->2 retry=ok") in caplog.text
    assert "Traceback" not in caplog.text


async def test_token_refresh_transport_failure_rotates_once_then_both_succeed(autojump_clock):
    upstream = Upstream()
    upstream.fail[("token", "*")] = ["transport"]
    due = upstream.account(1, access_expires_at=wall() + 60)  # inside the refresh margin
    async with rig(upstream, [due]) as r:
        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 1
        stored = await r.store.get("acc_1")
    token_calls = [c for c in upstream.calls if c[0] == "token"]
    assert token_calls == [("token", "acct-1", 1), ("token", "acct-1", 2)]
    assert ("models", "acct-1", 2) in upstream.calls
    assert stored.tokens.refresh_token == "rt-acct-1-1"  # the new token was persisted
    assert upstream.seen_access[0] == "at-acct-1-1"  # the fetch used the fresh access token
    assert report["models"] == 1
    assert report["errors"] == []


async def test_every_attempt_failing_rotates_once_per_cycle_and_keeps_the_catalog(
    autojump_clock, caplog
):
    caplog.set_level(logging.INFO, logger="codex_lb_trio.scheduler")
    upstream = Upstream()
    async with rig(upstream, [upstream.account(1), upstream.account(2)]) as r:
        await r.scheduler.refresh_now()
        before = await r.scheduler.catalog()
        assert before is not None
        assert await r.rotations() == 0
        upstream.calls.clear()
        upstream.always["models"] = "transport"

        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 1
        assert await r.scheduler.catalog() is before  # unchanged
        assert [c for c in upstream.calls if c[0] == "models"] == [
            ("models", "acct-1", 1), ("models", "acct-1", 2), ("models", "acct-2", 2)]
        assert report["rotations"] == 1
        assert [(e["account"], e["error"]) for e in report["errors"]] == [
            ("acc_1", "transport"), ("acc_2", "transport")]

        await r.scheduler.refresh_now()  # the next cycle has its own rotation
        assert await r.rotations() == 2
        assert (await r.clients.stats()).generation == 3
    assert ("model refresh plan=plus account=acc_1 error=transport step=fetch rotated "
            "generation=1->2 retry=failed error=transport step=fetch generation=2 next=acc_2"
            ) in caplog.text
    assert ("model refresh plan=plus account=acc_2 error=transport step=fetch generation=2 "
            "rotation=spent next=none") in caplog.text
    assert "model refresh plan=plus failed on all 2 account(s)" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("failures", [["500", "invalid"], ["not_json", "500"]])
async def test_http_errors_and_bad_payloads_never_rotate_and_fail_over(autojump_clock, failures):
    upstream = Upstream()
    upstream.fail[("models", "acct-1")] = [failures[0]]
    upstream.fail[("models", "acct-2")] = [failures[1]]
    accounts = [upstream.account(1), upstream.account(2), upstream.account(3)]
    async with rig(upstream, accounts) as r:
        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 0
        catalog = await r.scheduler.catalog()
    assert [c for c in upstream.calls if c[0] == "models"] == [
        ("models", "acct-1", 1), ("models", "acct-2", 1), ("models", "acct-3", 1)]
    assert catalog is not None
    assert [m["slug"] for m in catalog.models] == ["gpt-a"]
    assert report["plans"] == {"plus": "acc_3"}
    labels = {"500": "http_500", "invalid": "invalid_response", "not_json": "invalid_response"}
    assert [e["error"] for e in report["errors"]] == [labels[f] for f in failures]


async def test_401_forces_one_refresh_and_retries_the_same_account(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="codex_lb_trio.scheduler")
    upstream = Upstream()
    upstream.fail[("models", "acct-1")] = ["401"]
    async with rig(upstream, [upstream.account(1), upstream.account(2)]) as r:
        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 0
    models_calls = [c for c in upstream.calls if c[0] == "models"]
    assert models_calls == [("models", "acct-1", 1), ("models", "acct-1", 1)]
    assert [c for c in upstream.calls if c[0] == "token"] == [("token", "acct-1", 1)]
    assert upstream.seen_access[:2] == ["at-acct-1-0", "at-acct-1-1"]
    assert report["plans"] == {"plus": "acc_1"}
    assert report["errors"] == []
    assert "account=acc_1 error=http_401 step=fetch forced_refresh retry=ok" in caplog.text


async def test_second_401_fails_over_after_a_single_forced_refresh(autojump_clock):
    upstream = Upstream()
    upstream.fail[("models", "acct-1")] = ["401", "401"]
    async with rig(upstream, [upstream.account(1), upstream.account(2)]) as r:
        report = await r.scheduler.refresh_now()
    assert [c[1] for c in upstream.calls if c[0] == "models"] == ["acct-1", "acct-1", "acct-2"]
    assert [c[1] for c in upstream.calls if c[0] == "token"] == ["acct-1"]
    assert report["plans"] == {"plus": "acc_2"}
    assert [(e["account"], e["error"]) for e in report["errors"]] == [("acc_1", "http_401")]


async def test_catalog_is_the_union_of_plans_and_skips_dead_logins(autojump_clock):
    upstream = Upstream()
    accounts = [upstream.account(1, plan="plus"), upstream.account(2, plan="pro"),
                upstream.account(3, plan="team", status=AccountStatus.REAUTH_REQUIRED)]
    async with rig(upstream, accounts) as r:
        await r.scheduler.refresh_now()
        catalog = await r.scheduler.catalog()
    assert catalog is not None
    assert [m["slug"] for m in catalog.models] == ["gpt-a", "gpt-b"]
    assert sorted(catalog.by_plan) == ["plus", "pro"]
    assert [m["slug"] for m in catalog.by_plan["pro"]] == ["gpt-a", "gpt-b"]
    assert all(c[1] != "acct-3" for c in upstream.calls)


async def test_catalog_on_demand_before_the_first_cycle_is_shared(autojump_clock):
    upstream = Upstream()
    upstream.delay = 1.0  # long enough for every asker to arrive while it is under way
    async with rig(upstream, [upstream.account(1)]) as r:
        assert await r.scheduler.catalog(fetch_if_missing=False) is None
        assert upstream.count("models") == 0
        answers: list[Catalog | None] = []

        async def ask() -> None:
            answers.append(await r.scheduler.catalog())

        async with trio.open_nursery() as askers:
            for _ in range(5):
                askers.start_soon(ask)
        assert upstream.count("models") == 1
        assert len(answers) == 5
        assert answers[0] is not None
        assert all(a is answers[0] for a in answers)
        assert await r.updates.receive() is answers[0]  # published to the subscriber too


async def test_periodic_cycles_follow_their_jittered_intervals(autojump_clock):
    upstream = Upstream()
    async with rig(upstream, [upstream.account(1)], first_cycle_delay=0.0) as r:
        await trio.sleep(1000)
        # models at 0, ~300, ~600, ~900 (±10 % each); usage every ~60 s
        assert upstream.count("models") == 4
        assert 15 <= upstream.count("usage") <= 19
        assert await r.scheduler.catalog(fetch_if_missing=False) is not None


async def test_usage_polling_updates_windows_and_uncools_after_reset(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="codex_lb_trio.scheduler")
    upstream = Upstream()
    reset_at = wall() + 100
    cooled = upstream.account(1, cooldown_until=wall() + 3600, usage=Usage(
        primary=UsageWindow(used_percent=100.0, reset_at=reset_at, window_seconds=18000)))
    other = upstream.account(2)
    upstream.usage["acct-1"] = usage_body(100, reset_at, 40, wall() + 86400)
    upstream.usage["acct-2"] = usage_body(52, wall() + 9000, 7, wall() + 86400)
    async with rig(upstream, [cooled, other], usage_interval=60.0, first_cycle_delay=0.0) as r:
        await trio.sleep(1)
        first = await r.store.get("acc_1")
        assert first.cooldown_until is not None  # still at 100 %, window not reset yet
        assert first.usage.primary is not None
        assert first.usage.primary.used_percent == 100.0
        second = await r.store.get("acc_2")
        assert second.usage.primary is not None
        assert second.usage.primary.used_percent == 52.0
        assert second.usage.secondary is not None
        assert second.usage.secondary.used_percent == 7.0

        await trio.sleep_until(101)  # the window resets; the upstream reports a new one
        upstream.usage["acct-1"] = usage_body(3, wall() + 18000, 41, wall() + 86400)
        report = await r.scheduler.refresh_now()
        uncooled = await r.store.get("acc_1")
        assert uncooled.cooldown_until is None
        assert uncooled.usage.primary is not None
        assert uncooled.usage.primary.used_percent == 3.0
        assert report["cooldowns_cleared"] == ["acc_1"]
        assert report["accounts_polled"] == 2
        assert report["usage_updated"] == 2
        assert await r.rotations() == 0
    assert "usage poll account=acc_1 cooldown cleared: primary window reset" in caplog.text


async def test_usage_cooldown_stays_while_a_window_is_still_full(autojump_clock):
    upstream = Upstream()
    reset_at = wall() + 100
    cooled = upstream.account(1, cooldown_until=wall() + 3600, usage=Usage(
        primary=UsageWindow(used_percent=100.0, reset_at=reset_at)))
    async with rig(upstream, [cooled]) as r:
        await trio.sleep_until(101)
        upstream.usage["acct-1"] = usage_body(3, wall() + 18000, 100, wall() + 86400)  # weekly full
        await r.scheduler.refresh_now()
        assert (await r.store.get("acc_1")).cooldown_until is not None


async def test_usage_sweep_spends_one_rotation_and_is_bounded_and_spaced(autojump_clock):
    upstream = Upstream()
    upstream.delay = 2.0
    upstream.dead.add(("usage", 1))
    accounts = [upstream.account(n) for n in range(1, 6)]
    async with rig(upstream, accounts, usage_concurrency=2, usage_spacing=0.5) as r:
        upstream.calls.clear()
        upstream.starts.clear()
        upstream.max_in_flight = 0
        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 1
    first_starts: dict[str, float] = {}
    for started, call in zip(upstream.starts, upstream.calls, strict=True):
        if call[0] == "usage":
            first_starts.setdefault(call[1], started)
    usage_starts = sorted(first_starts.values())
    gaps = [b - a for a, b in zip(usage_starts, usage_starts[1:], strict=False)]
    assert upstream.max_in_flight <= 2
    assert all(gap >= 0.5 - 1e-9 for gap in gaps), gaps
    # acc_1 failed on generation 1, rotated and retried on 2; acc_2, already in flight
    # on generation 1, failed too but only gave up; acc_3.. started on generation 2.
    usage_calls = [c for c in upstream.calls if c[0] == "usage"]
    assert usage_calls[:3] == [("usage", "acct-1", 1), ("usage", "acct-2", 1),
                               ("usage", "acct-1", 2)]
    assert {c[2] for c in usage_calls[3:]} == {2}
    assert report["rotations"] == 1
    assert report["usage_updated"] == 4
    assert [(e["account"], e["error"]) for e in report["errors"]] == [("acc_2", "transport")]


async def test_a_store_failure_loses_one_accounts_reading_not_the_sweep(autojump_clock, caplog):
    # A failing write for one account used to escape the sweep's nursery and cancel the
    # polls of every other account (and the sweep's report).
    upstream = Upstream()
    accounts = [upstream.account(n) for n in range(1, 4)]
    async with rig(upstream, accounts, usage_spacing=0.5) as r:
        save = r.store.set_usage

        async def flaky_set_usage(account_id: str, usage: Usage) -> Any:
            if account_id == "acc_1":
                raise StoreFailure("store.db: disk I/O error (set_usage)")
            await trio.sleep(1)  # the others are still polling when acc_1's write fails
            return await save(account_id, usage)

        r.store.set_usage = flaky_set_usage  # type: ignore[method-assign]
        report = await r.scheduler.refresh_now()
        assert report["usage_updated"] == 2
        assert [(e["account"], e["error"]) for e in report["errors"]] == [("acc_1", "store")]
        for account_id in ("acc_2", "acc_3"):
            assert (await r.store.get(account_id)).usage.primary is not None
        assert (await r.store.get("acc_1")).usage.primary is None
    assert "usage poll account=acc_1 not saved: store.db: disk I/O error" in caplog.text


async def test_updates_and_logs_never_carry_tokens(autojump_clock, caplog):
    caplog.set_level(logging.DEBUG)
    upstream = Upstream()
    upstream.fail[("models", "*")] = ["transport", "401"]
    async with rig(upstream, [upstream.account(1)]) as r:
        await r.scheduler.refresh_now()
        usage_update = None
        while usage_update is None:
            update = await r.updates.receive()
            usage_update = update if isinstance(update, UsageUpdate) else None
    assert usage_update.account_id == "acc_1"
    for secret in ("at-acct-1-0", "rt-acct-1-0", "at-acct-1-1", "rt-acct-1-1"):
        assert secret not in caplog.text


async def test_shutdown_makes_later_calls_fail_fast(autojump_clock):
    from actors.errors import ActorUnavailable

    upstream = Upstream()
    async with rig(upstream, [upstream.account(1)]) as r:
        await r.scheduler.shutdown()
        with trio.fail_after(1), pytest.raises(ActorUnavailable):
            await r.scheduler.catalog()


def test_settings_from_config_reads_upstream_and_refresh_sections() -> None:
    from service.config import Config, RefreshConfig, UpstreamConfig

    config = Config(upstream=UpstreamConfig(base_url="http://up.test/backend-api",
                                            client_version="9.9.9"),
                    refresh=RefreshConfig(models_interval=120.0, usage_interval=30.0,
                                          usage_concurrency=3))
    settings = SchedulerSettings.from_config(config)
    assert (settings.base_url, settings.client_version) == ("http://up.test/backend-api", "9.9.9")
    assert (settings.models_interval, settings.usage_interval) == (120.0, 30.0)
    assert (settings.usage_concurrency, settings.usage_spacing) == (3, 0.5)
