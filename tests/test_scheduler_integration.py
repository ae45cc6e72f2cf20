"""The RefreshScheduler over real sockets: a network flip under its pooled connection.

fake upstream <- chaos proxy <- ClientManager (real httpx, real keepalive sockets). The
scheduler's idle pooled connection goes stale (black-holed) while a long SSE stream keeps
its own connection on the same generation alive.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from actors.accounts import Account, InMemoryAccountStore, TokenSet, token_expiry
from actors.client_manager import ClientHandle, ClientManager, ClientSettings
from actors.messages import Catalog, UsageUpdate
from actors.refresh_scheduler import RefreshScheduler, SchedulerSettings
from actors.token_refresher import RefreshSettings, TokenRefresher
from actors.upstream import SSEParser
from tests.fakes.chaos import ChaosProxy
from tests.fakes.upstream import FakeUpstream

HEADER_TIMEOUT = 1.0  # how long a request on the dead path waits for headers (default 15 s)
EVENT_DELAY = 0.1
WORDS = 100  # the long stream: at least WORDS * EVENT_DELAY seconds (it outlasts the flip)


async def read_stream(
    clients: ClientHandle,
    base_url: str,
    account: Account,
    events: list[dict[str, Any]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold one lease for a whole SSE exchange and read it slowly; reports its generation."""
    async with clients.lease() as lease:
        request = lease.client.build_request(
            "POST", f"{base_url}/codex/responses",
            json={"model": "gpt-5.1-codex", "input": [{"role": "user", "content": "hi"}],
                  "stream": True, "store": False},
            headers={"authorization": f"Bearer {account.tokens.access_token}",
                     "chatgpt-account-id": account.chatgpt_account_id,
                     "accept": "text/event-stream"},
        )
        response = await lease.send(request)
        try:
            assert response.status_code == 200
            task_status.started(lease.generation)
            parser = SSEParser()
            chunk_send, chunk_recv = trio.open_memory_channel[bytes](0)
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    with chunk_send:
                        await lease.pump(response, chunk_send)

                nursery.start_soon(pump)
                with chunk_recv:
                    async for chunk in chunk_recv:
                        for event in parser.feed(chunk):
                            if event.data:
                                events.append(json.loads(event.data))
                        await trio.sleep(0.02)  # a slow reader
        finally:
            with trio.move_on_after(2, shield=True):
                await response.aclose()


async def test_flip_under_the_pooled_connection_rotates_once_while_a_stream_survives(
    fake_upstream: FakeUpstream, chaos: ChaosProxy
) -> None:
    fake = fake_upstream
    upstream_account = fake.add_account(email="a@example.com", chatgpt_account_id="acct-a")
    fake.reply_text = " ".join(f"word{n}" for n in range(WORDS))
    fake.event_delay = EVENT_DELAY
    base_url = fake.base_url_for(chaos.port)
    account = Account(
        id="acc_a", email="a@example.com", chatgpt_account_id="acct-a", plan="plus",
        tokens=TokenSet(access_token=upstream_account.access_token,
                        refresh_token=upstream_account.refresh_token,
                        id_token=upstream_account.id_token),
        access_expires_at=token_expiry(upstream_account.access_token),
    )
    store = InMemoryAccountStore([account])
    events: list[dict[str, Any]] = []
    catalogs: list[tuple[float, Catalog]] = []
    updates_send, updates_recv = trio.open_memory_channel[Catalog | UsageUpdate](64)

    async def watch_catalogs() -> None:
        async for update in updates_recv:
            if isinstance(update, Catalog):
                catalogs.append((trio.current_time(), update))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            manager = ClientManager(
                ClientSettings(header_timeout=HEADER_TIMEOUT, connect_timeout=2.0)
            )
            clients: ClientHandle = await nursery.start(manager.run)
            tokens = await nursery.start(TokenRefresher(
                store=store, clients=clients, background=False,
                settings=RefreshSettings(auth_base_url=fake.auth_base_url_for(chaos.port)),
            ).run)
            scheduler = await nursery.start(RefreshScheduler(
                store=store, clients=clients, tokens=tokens, updates=updates_send,
                settings=SchedulerSettings(base_url=base_url, first_cycle_delay=3600),
            ).run)
            nursery.start_soon(watch_catalogs)

            # Connection A: the long stream, on generation 1.
            stream_done = trio.Event()

            async def stream(
                *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
            ) -> None:
                await read_stream(clients, base_url, account, events, task_status=task_status)
                stream_done.set()

            stream_generation = await nursery.start(stream)
            assert stream_generation == 1

            # Connection B: one good cycle leaves the scheduler's connection idle in the pool.
            first = await scheduler.refresh_now()
            assert first["errors"] == []
            assert first["rotations"] == 0
            assert first["models"] == 2
            assert fake.count("models") == 1
            await trio.sleep(2.0)  # B idles; A forwards an event every EVENT_DELAY meanwhile

            # The flip: B goes dead; A, busy streaming, is spared (wide margins both ways: a
            # loaded machine may hold up A's next event for a while).
            assert not stream_done.is_set()
            flipped_at = trio.current_time()
            assert chaos.blackhole_existing(except_active_within=1.0) == 1
            report = await scheduler.refresh_now()
            recovered_at, catalog = catalogs[-1]
            flip_to_catalog = recovered_at - flipped_at
            print(f"flip-to-catalog: {flip_to_catalog * 1000:.0f} ms")
            print(f"(header_timeout={HEADER_TIMEOUT:g}s; the default is 15 s)")

            stats = await clients.stats()
            assert stats.rotations == {"transport": 1}
            assert stats.generation == 2
            assert report["rotations"] == 1
            assert report["errors"] == []
            assert report["catalog_refreshed"] is True
            assert report["usage_updated"] == 1
            assert catalog.fetched_at > first["catalog_fetched_at"]
            assert [m["slug"] for m in catalog.models] == [m["slug"] for m in fake.models]
            # The request on the dead connection never arrived; the retry did.
            assert fake.count("models") == 2
            assert HEADER_TIMEOUT <= flip_to_catalog  # one header timeout, then the retry

            # The stream, on retired generation 1 whose path is now marked dead, was still
            # delivering events, so it ran to its end intact.
            assert not stream_done.is_set()
            assert stats.leases.get(1) == 1
            assert 1 in stats.retired
            await stream_done.wait()
            assert events[-1]["type"] == "response.completed"
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert text == fake.reply_text
            with trio.fail_after(30):  # generation 1 drains and closes once it is free
                # Polling: the manager publishes no event for a generation's close.
                while 1 in (await clients.stats()).leases:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert (await clients.stats()).force_closes == 0

            await scheduler.shutdown()
            await tokens.shutdown()
            await clients.shutdown()
            nursery.cancel_scope.cancel()
