"""The engine's actors over real loopback sockets, through the chaos proxy."""

from __future__ import annotations

import logging

import pytest
import trio

from actors.accounts import AccountStatus
from actors.errors import PermanentAuth, TransportError
from actors.messages import RotationReason
from actors.supervisor import open_actors
from service.config import Config, with_overrides
from service.login import import_auth_data
from service.store import SQLiteAccountStore
from tests.stack import CODEX_BODY, open_stack, read_sse


def engine_config(fake, chaos, **client):
    return with_overrides(
        Config(),
        upstream={"base_url": fake.base_url_for(chaos.port), "auth_base_url": fake.auth_base_url_for(chaos.port),
                  "header_timeout": 1.0, "token_header_timeout": 1.0, "connect_timeout": 1.0},
        client={"shutdown_grace": 1.0, **client},
    )


async def test_black_holed_pooled_connection_fails_fast_then_rotated_retry_succeeds(fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_actors(engine_config(fake_upstream, chaos), watch_network=False) as engine:
            url = fake_upstream.base_url_for(chaos.port) + "/codex/models?client_version=0.169.0"
            acct = fake_upstream.add_account(email="m@example.com", chatgpt_account_id="acct-m")
            headers = {"authorization": f"Bearer {acct.access_token}", "chatgpt-account-id": "acct-m"}
            async with engine.clients.lease() as lease:
                response = await lease.send(lease.client.build_request("GET", url, headers=headers))
                await response.aread()
                await response.aclose()
            assert chaos.active == 1  # one pooled keep-alive connection
            chaos.blackhole_existing()

            started = trio.current_time()
            async with engine.clients.lease() as lease:
                with pytest.raises(TransportError) as info:
                    await lease.send(lease.client.build_request("GET", url, headers=headers))
                failed_gen = lease.generation
            elapsed = trio.current_time() - started
            # the configured 1 s header timeout, not a hang (the upper bound is loose: a loaded
            # machine stretches it)
            assert 1.0 <= elapsed < 10.0
            assert info.value.generation == failed_gen == 1
            assert info.value.pre_dispatch
            assert not info.value.path_dead  # a header timeout alone says nothing about the path

            assert await engine.clients.rotate(seen_generation=info.value.generation,
                                               reason=RotationReason.TRANSPORT) == 2
            async with engine.clients.lease() as lease:
                assert lease.generation == 2
                response = await lease.send(lease.client.build_request("GET", url, headers=headers))
                body = await response.aread()
                await response.aclose()
            assert response.status_code == 200
            assert b"models" in body


async def test_slow_stream_survives_two_rotations_and_new_requests_use_n_plus_2(tmp_path, fake_upstream, chaos):
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos) as stack, stack.http() as http:
            fake_upstream.event_delay = 0.15  # a slow stream: ~2 s in all
            generation = (await stack.engine.clients.stats()).generation
            events: list[dict] = []

            async def slow_turn() -> None:
                async with http.stream("POST", "/backend-api/codex/responses", json=CODEX_BODY) as response:
                    events.extend(await read_sse(response))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_turn)
                while (await stack.engine.clients.stats()).leases.get(generation, 0) == 0:
                    await trio.sleep(0.01)
                await trio.sleep(0.3)
                for _ in range(2):
                    await stack.engine.clients.rotate(reason=RotationReason.ADMIN)
                    await trio.sleep(1.1)  # past the admin cooldown
                stats = await stack.engine.clients.stats()
                assert stats.generation == generation + 2
                fake_upstream.event_delay = 0.0
                async with stack.http() as other:
                    response = await other.post("/backend-api/codex/responses", json=CODEX_BODY)
                    assert "response.completed" in response.text
            assert events[-1]["type"] == "response.completed"
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert text == fake_upstream.reply_text  # intact
            stats = await stack.engine.clients.stats()
            assert set(stats.leases) == {generation + 2}  # N and N+1 drained and closed
            assert stats.force_closes == 0


async def _engine_with_account(tmp_path, fake_upstream, chaos, **client):
    store = await SQLiteAccountStore.open(tmp_path / "home")
    acct = fake_upstream.add_account(email="r@example.com", chatgpt_account_id="acct-r")
    imported = await import_auth_data(store, fake_upstream.auth_json(acct))
    return store, acct, imported.account


async def test_twenty_concurrent_ensure_fresh_make_one_upstream_refresh(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        store, acct, account = await _engine_with_account(tmp_path, fake_upstream, chaos)
        try:
            async with open_actors(engine_config(fake_upstream, chaos), store, watch_network=False) as engine:
                results = []

                async def refresh() -> None:
                    results.append(await engine.tokens.ensure_fresh(account.id, force=True))

                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(refresh)
                assert fake_upstream.count("token", "acct-r") == 1
                assert {r.tokens.refresh_token for r in results} == {acct.refresh_token}
                assert (await store.get(account.id)).tokens.refresh_token == acct.refresh_token
        finally:
            await store.aclose()


async def test_reused_refresh_token_takes_the_account_out_of_rotation(tmp_path, fake_upstream, chaos):
    with trio.fail_after(30):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=2) as stack, stack.http() as http:
            victim = stack.accounts["acct-a"]
            fake_upstream.rotate_tokens("acct-a")  # Codex CLI refreshed its shared copy first
            with pytest.raises(PermanentAuth):
                await stack.engine.tokens.ensure_fresh(victim.id, force=True)
            stored = await stack.store.get(victim.id)
            assert stored.status is AccountStatus.REAUTH_REQUIRED
            calls = fake_upstream.count("token", "acct-a")
            for session in range(4):
                response = await http.post("/backend-api/codex/responses", json=CODEX_BODY,
                                           headers={"session-id": f"s{session}"})
                assert "response.completed" in response.text
            assert fake_upstream.count("responses", "acct-a") == 0
            assert fake_upstream.count("token", "acct-a") == calls  # never retried


async def test_refresh_into_a_black_hole_is_not_replayed(tmp_path, fake_upstream, chaos, caplog):
    # The refresh request went out on a pooled connection that goes nowhere: whether the
    # auth server got it (and spent the single-use refresh token) cannot be known, so it is
    # not replayed at once; callers keep the still-valid access token meanwhile.
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(30):
        store, acct, account = await _engine_with_account(tmp_path, fake_upstream, chaos)
        config = with_overrides(engine_config(fake_upstream, chaos),
                                upstream={"token_header_timeout": 2.0})
        try:
            async with open_actors(config, store, watch_network=False) as engine:
                first = await engine.tokens.ensure_fresh(account.id, force=True)  # pools a connection
                chaos.blackhole_existing()
                with pytest.raises(TransportError):
                    await engine.tokens.ensure_fresh(account.id, force=True)
                assert "outcome unknown" in caplog.text
                again = await engine.tokens.ensure_fresh(account.id, force=True)
                assert again.tokens == first.tokens  # served, not replayed
                assert fake_upstream.count("token") == 1  # the black hole swallowed the second
                stats = await engine.clients.stats()
                assert stats.rotations.get("transport", 0) == 0
                assert acct.refresh_token == first.tokens.refresh_token
        finally:
            await store.aclose()
        for secret in (acct.access_token, acct.refresh_token, acct.id_token):
            assert secret not in caplog.text
