"""Tokens that cannot be lost (issue 8, items 2, 3, 4, 6-scheduler, 7, 8).

Actor unit tests run the real ClientManager and TokenRefresher under the autojump clock
against a single-use token endpoint (tests/rig.py); the token-version tests use a real
SQLite file and the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from actors.accounts import AccountStatus, StoreFailure, token_fingerprint
from actors.client_manager import ClientManager, ClientSettings
from actors.errors import ActorUnavailable, PermanentAuth, TransportError
from actors.refresh_scheduler import RefreshScheduler, SchedulerSettings
from actors.token_refresher import RefreshSettings, TokenRefresher
from service.config import Config, with_overrides
from service.store import SQLiteAccountStore
from tests.fakes.jwt import mint_jwt
from tests.rig import AUTH_URL, FlakyStore, Upstream, make_account, rig, wall

ROOT = Path(__file__).resolve().parents[1]


# --- 2: a failed token write loses nothing ------------------------------------------------


async def test_failed_token_write_keeps_the_new_triple_and_never_presents_the_old(autojump_clock):
    async with rig([make_account(1, expires_in=60)]) as r:
        r.store.fail["save_tokens"] = 3  # the disk refuses the first writes
        fresh = await r.tokens.ensure_fresh("acc_1")
        assert fresh.tokens.refresh_token == "rt-acct-1-1"  # the server's answer is the truth
        assert (await r.store.get("acc_1")).tokens.refresh_token == "rt-acct-1-0"  # not yet saved

        # Meanwhile the in-memory triple is served and used for the next refresh.
        again = await r.tokens.ensure_fresh("acc_1")
        assert again.tokens == fresh.tokens
        forced = await r.tokens.ensure_fresh("acc_1", force=True)
        assert forced.tokens.refresh_token == "rt-acct-1-2"
        assert r.upstream.presented == ["rt-acct-1-0", "rt-acct-1-1"]
        assert r.upstream.reused == 0

        await trio.sleep(30)  # the background writer retries with backoff
        stored = await r.store.get("acc_1")
        assert stored.tokens == forced.tokens
        assert stored.status is AccountStatus.ACTIVE
        assert r.store.fail["save_tokens"] == 0
        assert r.refresher.write_failures >= 3


async def test_pending_token_write_is_flushed_at_shutdown(autojump_clock):
    async with rig([make_account(1, expires_in=60)]) as r:
        r.store.fail["save_tokens"] = 1
        fresh = await r.tokens.ensure_fresh("acc_1")
        await r.tokens.shutdown()  # before the writer's first retry
        assert (await r.store.get("acc_1")).tokens == fresh.tokens


# --- 3: a refresh that may have reached the server is not replayed quickly ----------------


async def test_slow_token_endpoint_is_waited_for_not_replayed(autojump_clock):
    upstream = Upstream(token_delay=20.0)  # rotates at once, answers 20 s later
    async with rig([make_account(1, expires_in=60)], upstream=upstream) as r:
        started = trio.current_time()
        fresh = await r.tokens.ensure_fresh("acc_1")
        assert 20 <= trio.current_time() - started < 21
        assert fresh.tokens.refresh_token == "rt-acct-1-1"
        assert upstream.presented == ["rt-acct-1-0"]
        assert (await r.store.get("acc_1")).status is AccountStatus.ACTIVE


async def test_lost_refresh_answer_is_not_replayed_at_once(autojump_clock, caplog):
    async def rotate_then_lose_the_answer(request: httpx.Request) -> httpx.Response:
        await upstream._token(request)  # the server rotated...
        raise httpx.ReadError("connection reset by peer", request=request)  # ...we never hear

    upstream = Upstream()
    upstream.before["token"] = [rotate_then_lose_the_answer]
    async with rig([make_account(1, expires_in=300)], upstream=upstream) as r:
        with pytest.raises(TransportError):
            await r.tokens.ensure_fresh("acc_1")
        assert "outcome unknown" in caplog.text
        # Callers keep the still-valid access token; nothing is replayed, forced or not.
        assert (await r.tokens.ensure_fresh("acc_1")).tokens.refresh_token == "rt-acct-1-0"
        forced = await r.tokens.ensure_fresh("acc_1", force=True)
        assert forced.tokens.access_token == "at-acct-1-0"
        assert upstream.presented == ["rt-acct-1-0"]
        assert await r.rotations() == 0
        assert (await r.store.get("acc_1")).status is AccountStatus.ACTIVE


async def test_failure_before_the_request_was_sent_rotates_and_retries_at_once(autojump_clock):
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    upstream = Upstream()
    upstream.before["token"] = [refuse]
    async with rig([make_account(1, expires_in=60)], upstream=upstream) as r:
        fresh = await r.tokens.ensure_fresh("acc_1")
        assert fresh.tokens.refresh_token == "rt-acct-1-1"
        assert fresh.rotated
        assert await r.rotations() == 1


def test_token_header_timeout_is_a_config_key():
    assert RefreshSettings.from_config(Config()).header_timeout == 60.0
    config = with_overrides(Config(), upstream={"token_header_timeout": 90.0})
    assert RefreshSettings.from_config(config).header_timeout == 90.0
    assert "token_header_timeout = 60.0" in (ROOT / "config.example.toml").read_text()


# --- 4: a store error answers the caller at once and never kills the refresher --------------


async def test_store_error_in_ensure_fresh_answers_at_once(autojump_clock):
    async with rig([make_account(1)]) as r:
        r.store.fail["get"] = 1
        started = trio.current_time()
        with pytest.raises(ActorUnavailable) as info:
            await r.tokens.ensure_fresh("acc_1")
        assert trio.current_time() - started < 1.0  # not the handle's deadline
        assert info.value.code == "store_unavailable"
        assert (await r.tokens.ensure_fresh("acc_1")).account.id == "acc_1"  # still serving


async def test_failing_list_accounts_in_the_background_loop_is_retried(autojump_clock):
    store = FlakyStore([make_account(1, expires_in=60)])
    store.fail["list_accounts"] = 3
    upstream = Upstream()
    upstream.add(make_account(1))
    factory = lambda generation: httpx.AsyncClient(  # noqa: E731
        transport=httpx.MockTransport(upstream.handler(generation)))
    async with trio.open_nursery() as nursery:  # no supervisor: a crash would fail the test
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
        refresher = TokenRefresher(store=store, clients=clients, wall_clock=wall,
                                   settings=RefreshSettings(auth_base_url=AUTH_URL, jitter=0))
        tokens = await nursery.start(refresher.run)
        await trio.sleep(120)
        assert store.fail["list_accounts"] == 0
        assert upstream.presented == ["rt-acct-1-0"]  # refreshed once the store came back
        assert (await tokens.ensure_fresh("acc_1")).tokens.refresh_token == "rt-acct-1-1"
        nursery.cancel_scope.cancel()


# --- 7: concurrent 401s on one account share one forced refresh ---------------------------


async def test_concurrent_401s_share_one_forced_refresh(autojump_clock):
    from tests.rig import events_of, turn

    upstream = Upstream()
    delays = iter(range(6))

    async def slow_rejection(request: httpx.Request) -> None:
        # Six requests sent with the same access token get their 401s one second apart,
        # the later ones well after the first forced refresh has replaced that token.
        if request.headers["authorization"] == "Bearer at-acct-1-0":
            await trio.sleep(next(delays))
            upstream.access.pop("at-acct-1-0", None)
        return None

    upstream.before["responses"] = [slow_rejection] * 20
    # The 401s are slow on purpose; a hedge (2 s) would add requests this test counts.
    async with rig([make_account(1)], upstream=upstream, clients={"hedge_after": math.inf}) as r:
        results = []

        async def one() -> None:
            results.append(await events_of(r.proxy, turn()))

        async with trio.open_nursery() as burst:
            for _ in range(6):
                burst.start_soon(one)
        assert [events[-1]["type"] for events in results] == ["response.completed"] * 6
        assert upstream.presented == ["rt-acct-1-0"]  # one forced refresh for all of them
        assert upstream.responses.count("acct-1") <= 12  # at most one 401 and one retry each


async def test_forced_refresh_for_a_token_already_replaced_is_not_made(autojump_clock):
    async with rig([make_account(1)]) as r:
        old = (await r.tokens.ensure_fresh("acc_1")).tokens.access_token
        new = await r.tokens.ensure_fresh("acc_1", force=True, rejected_access_token=old)
        again = await r.tokens.ensure_fresh("acc_1", force=True, rejected_access_token=old)
        assert again.tokens == new.tokens
        assert r.upstream.presented == ["rt-acct-1-0"]
        assert token_fingerprint(old) != token_fingerprint(new.tokens.access_token)


# --- 6 (scheduler): one cycle rotates at most once in total ---------------------------------


async def test_one_model_cycle_rotates_once_across_plans(autojump_clock):
    from tests.test_refresh_scheduler import Upstream as SchedulerUpstream
    from tests.test_refresh_scheduler import rig as scheduler_rig

    upstream = SchedulerUpstream()
    accounts = [upstream.account(1, plan="plus"), upstream.account(2, plan="pro")]
    upstream.fail[("models", "*")] = ["transport", "transport", "transport", "transport"]
    async with scheduler_rig(upstream, accounts) as r:
        report = await r.scheduler.refresh_now()
        assert await r.rotations() == 1
        assert report["rotations"] == 1


async def test_a_joined_refresh_that_rotated_spends_the_cycle_rotation(autojump_clock):
    from tests.test_refresh_scheduler import BASE_URL as SCHEDULER_BASE_URL
    from tests.test_refresh_scheduler import Upstream as SchedulerUpstream

    upstream = SchedulerUpstream()
    upstream.delay = 1.0
    account = upstream.account(1, access_expires_at=wall() + 60)  # due for a refresh
    upstream.fail[("token", "acct-1")] = ["transport"]  # connect error: rotate + retry
    upstream.fail[("models", "acct-1")] = ["transport"]
    store = FlakyStore([account])
    factory = lambda generation: httpx.AsyncClient(  # noqa: E731
        transport=httpx.MockTransport(upstream.handler(generation)))
    async with trio.open_nursery() as nursery:
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=factory).run)
        tokens = await nursery.start(TokenRefresher(
            store=store, clients=clients, wall_clock=wall, background=False,
            settings=RefreshSettings(auth_base_url=AUTH_URL, spacing=0.0, jitter=0)).run)
        scheduler = await nursery.start(RefreshScheduler(
            store=store, clients=clients, tokens=tokens, wall_clock=wall,
            settings=SchedulerSettings(base_url=SCHEDULER_BASE_URL, first_cycle_delay=1e9)).run)
        nursery.start_soon(tokens.ensure_fresh, "acc_1")  # a request's refresh (may rotate)
        await trio.sleep(0.5)
        report = await scheduler.refresh_now()  # its token step joins that refresh
        assert (await clients.stats()).rotations.get("transport", 0) == 1
        assert report["rotations"] == 1
        nursery.cancel_scope.cancel()


# --- 8: token versions: the CLI's newer login is never overwritten ---------------------------


def auth_json(tmp_path: Path, n: int) -> Path:
    namespace = "https://api.openai.com/auth"
    claims = {namespace: {"chatgpt_account_id": "acct-1", "chatgpt_plan_type": "plus"}}
    path = tmp_path / f"auth-{n}.json"
    path.write_text(json.dumps({"OPENAI_API_KEY": None, "tokens": {
        "id_token": mint_jwt({"email": "1@example.com", "exp": int(time.time()) + 3600, **claims}),
        "access_token": mint_jwt({"exp": int(time.time()) + 3600, **claims}),
        "refresh_token": f"rt-cli-login-{n}", "account_id": "acct-1"},
        "last_refresh": "2026-01-01T00:00:00Z"}))
    return path


async def cli_import(home: Path, auth: Path) -> None:
    env = {**os.environ, "CODEX_LB_TRIO_HOME": str(home)}
    env.pop("CODEX_LB_TRIO_CONFIG", None)
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "service.cli", "accounts", "import", str(auth)],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT))
    assert done.returncode == 0, done.stderr


async def server_with_cli_login_during_refresh(tmp_path: Path, answer: str):
    """A server-side refresher on store.db; while its refresh is at the auth server, the
    user runs `codex-lb-trio accounts import` (a new login) in another process."""
    home = tmp_path / "home"
    await cli_import(home, auth_json(tmp_path, 1))
    store = await SQLiteAccountStore.open(home)
    [account] = await store.list_accounts()
    assert account.token_version == 1
    calls = []

    async def token_endpoint(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["refresh_token"])
        await cli_import(home, auth_json(tmp_path, 2))
        if answer == "reused":
            return httpx.Response(401, json={"error": {"code": "refresh_token_reused"}})
        return httpx.Response(200, json={"access_token": "at-server", "refresh_token": "rt-server",
                                         "id_token": "not-a-jwt", "expires_in": 3600})

    return store, account, calls, token_endpoint


@pytest.mark.parametrize("answer", ["reused", "rotated"])
async def test_cli_login_during_a_refresh_is_kept(tmp_path, answer):
    with trio.fail_after(60):
        store, account, calls, token_endpoint = await server_with_cli_login_during_refresh(
            tmp_path, answer)
        factory = lambda generation: httpx.AsyncClient(  # noqa: E731
            transport=httpx.MockTransport(token_endpoint))
        try:
            async with trio.open_nursery() as nursery:
                clients = await nursery.start(
                    ClientManager(ClientSettings(), client_factory=factory).run)
                refresher = TokenRefresher(store=store, clients=clients, background=False,
                                           settings=RefreshSettings(auth_base_url=AUTH_URL))
                tokens = await nursery.start(refresher.run)
                fresh = await tokens.ensure_fresh(account.id, force=True)
                nursery.cancel_scope.cancel()
            assert calls == ["rt-cli-login-1"]
            assert fresh.tokens.refresh_token == "rt-cli-login-2"  # the newer login answers
        finally:
            await store.aclose()
        async with await SQLiteAccountStore.open(tmp_path / "home") as reopened:
            stored = await reopened.get(account.id)
        assert stored.status is AccountStatus.ACTIVE
        assert stored.tokens.refresh_token == "rt-cli-login-2"
        assert stored.token_version == 2


async def test_versioned_writes_are_refused_when_a_newer_triple_is_stored(tmp_path):
    from actors.accounts import TokenVersionConflict

    async with await SQLiteAccountStore.open(tmp_path) as store:
        account = make_account(1)
        await store.upsert(account)
        saved = await store.save_tokens("acc_1", account.tokens, access_expires_at=None,
                                        last_refresh=1.0, expected_version=1)
        assert saved.token_version == 2
        with pytest.raises(TokenVersionConflict):
            await store.set_status("acc_1", AccountStatus.REAUTH_REQUIRED, "x", expected_version=1)
        with pytest.raises(TokenVersionConflict):
            await store.save_tokens("acc_1", account.tokens, access_expires_at=None,
                                    last_refresh=2.0, expected_version=1)
        assert (await store.get("acc_1")).status is AccountStatus.ACTIVE
        # Unversioned writes (admin pause/resume) still apply.
        paused = await store.set_status("acc_1", AccountStatus.PAUSED)
        assert paused.token_version == 2


def test_store_failure_is_the_store_error_base():
    from service.store import StoreError

    assert issubclass(StoreError, StoreFailure)


async def test_permanent_failure_marks_reauth_when_no_newer_login(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    upstream = Upstream()
    async with rig([make_account(1, expires_in=60)], upstream=upstream) as r:
        upstream.refresh.clear()  # the CLI's own copy used it
        with pytest.raises(PermanentAuth):
            await r.tokens.ensure_fresh("acc_1")
        stored = await r.store.get("acc_1")
        assert stored.status is AccountStatus.REAUTH_REQUIRED


class _ClosingTransport(httpx.AsyncBaseTransport):
    """A mock transport whose close breaks the exchanges in flight, as a socket's close does."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self._open: set[trio.CancelScope] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                return await self._inner.handle_async_request(request)
            finally:
                self._open.discard(scope)
        raise httpx.ReadError("the client was closed under the exchange", request=request)

    async def aclose(self) -> None:
        for scope in self._open:
            scope.cancel()


async def test_shutdown_waits_for_a_slow_refresh_in_flight_and_keeps_its_answer(autojump_clock):
    # The token endpoint may take up to token_header_timeout; its answer is the only copy of
    # the new triple (the old refresh token is spent). An orderly stop that began meanwhile
    # must let it finish and be written before the auth clients close under it.
    from actors.supervisor import open_actors

    upstream = Upstream(token_delay=100.0)
    account = make_account(1, expires_in=60)
    upstream.add(account)
    store = FlakyStore([account])
    config = with_overrides(Config(), upstream={
        "base_url": "http://backend.test/backend-api", "auth_base_url": AUTH_URL,
        "token_header_timeout": 120.0})
    factory = lambda generation: httpx.AsyncClient(  # noqa: E731
        transport=_ClosingTransport(httpx.MockTransport(upstream.handler(generation))))
    answers: list[object] = []

    async def refresh(engine) -> None:
        try:
            answers.append(await engine.tokens.ensure_fresh("acc_1"))
        except Exception as exc:  # the caller may give up; the token must not be lost
            answers.append(exc)

    with trio.fail_after(600):
        async with trio.open_nursery() as outer:
            async with open_actors(config, store, client_factory=factory, watch_network=False,
                                   periodic_refresh=False, wall_clock=wall) as engine:
                outer.start_soon(refresh, engine)
                await trio.sleep(1.0)  # the refresh is on its way; now stop
    stored = await store.get("acc_1")
    assert upstream.presented == ["rt-acct-1-0"]
    assert stored.tokens.refresh_token == "rt-acct-1-1"  # the answer was kept
    assert stored.status is AccountStatus.ACTIVE
