"""ClientManager unit tests: MockTransport clients, the autojump clock, no real sleeps."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from actors.client_manager import ClientManager, ClientSettings
from actors.errors import ActorUnavailable, Phase, TransportError
from actors.messages import RotationReason


class CountingTransport(httpx.AsyncBaseTransport):
    """A MockTransport that counts how often it was closed."""

    def __init__(self, handler=None) -> None:
        self._mock = httpx.MockTransport(handler or (lambda request: httpx.Response(200, text="ok")))
        self.closes = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._mock.handle_async_request(request)

    async def aclose(self) -> None:
        self.closes += 1


class Factory:
    def __init__(self, handler=None) -> None:
        self.transports: dict[int, CountingTransport] = {}
        self.fail_generations: set[int] = set()
        self.handler = handler

    def __call__(self, generation: int) -> httpx.AsyncClient:
        if generation in self.fail_generations:
            raise OSError("cannot build client (no route)")
        transport = CountingTransport(self.handler)
        self.transports[generation] = transport
        return httpx.AsyncClient(transport=transport)


async def start(nursery: trio.Nursery, factory: Factory, **settings):
    manager = ClientManager(ClientSettings(**settings), client_factory=factory)
    handle = await nursery.start(manager.run)
    return manager, handle


async def test_rotation_without_leases_closes_old_client_at_once(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        assert await clients.rotate(seen_generation=1, reason=RotationReason.ADMIN) == 2
        await trio.testing.wait_all_tasks_blocked()
        assert factory.transports[1].closes == 1
        assert factory.transports[2].closes == 0
        stats = await clients.stats()
        assert stats.generation == 2
        assert stats.rotations == {"admin": 1}
        await clients.shutdown()
    assert factory.transports[2].closes == 1


async def test_leased_generation_stays_open_until_release_then_closes_once(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        async with clients.lease() as lease:
            assert lease.generation == 1
            assert await clients.rotate(seen_generation=1) == 2
            await trio.sleep(60)
            assert factory.transports[1].closes == 0
            # still usable while held
            response = await lease.client.get("http://upstream.test/x")
            assert response.status_code == 200
            assert (await clients.stats()).leases == {1: 1, 2: 0}
        await trio.testing.wait_all_tasks_blocked()
        assert factory.transports[1].closes == 1
        async with clients.lease() as lease:
            assert lease.generation == 2
        await clients.shutdown()
    assert factory.transports[1].closes == 1


async def test_fifty_concurrent_rotations_make_exactly_one_generation(autojump_clock):
    factory = Factory()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        await clients.rotate(seen_generation=1)
        await clients.rotate(seen_generation=2)
        assert (await clients.stats()).generation == 3

        async def rotate_from_3() -> None:
            results.append(await clients.rotate(seen_generation=3, reason=RotationReason.TRANSPORT))

        async with trio.open_nursery() as burst:
            for _ in range(50):
                burst.start_soon(rotate_from_3)
        assert results == [4] * 50
        assert await clients.rotate(seen_generation=2) == 4  # stale: a no-op
        stats = await clients.stats()
        assert stats.generation == 4
        assert stats.rotations == {"admin": 2, "transport": 1}
        assert sorted(factory.transports) == [1, 2, 3, 4]
        await clients.shutdown()


async def test_rotations_without_generation_are_coalesced_by_cooldown(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, rotation_cooldown=1.0)
        assert await clients.rotate(reason=RotationReason.NETWORK_CHANGE) == 2
        assert await clients.rotate(reason=RotationReason.WAKE) == 2
        await trio.sleep(1.5)
        assert await clients.rotate(reason=RotationReason.WAKE) == 3
        await clients.shutdown()


async def test_cancelled_holder_still_releases(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        got_lease = trio.Event()

        async def holder() -> None:
            async with clients.lease():
                got_lease.set()
                await trio.sleep_forever()

        async with trio.open_nursery() as inner:
            inner.start_soon(holder)
            await got_lease.wait()
            await clients.rotate(seen_generation=1)
            await trio.sleep(1)
            assert factory.transports[1].closes == 0
            inner.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert factory.transports[1].closes == 1
        assert (await clients.stats()).leases == {2: 0}
        await clients.shutdown()


async def test_shutdown_with_leases_held_returns_within_grace(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, shutdown_grace=10.0)
        lease = await clients.acquire()
        await clients.rotate(seen_generation=1)
        lease2 = await clients.acquire()
        start_time = trio.current_time()
        await clients.shutdown()
        assert trio.current_time() - start_time <= 10.0 + 0.01
    assert all(t.closes == 1 for t in factory.transports.values())
    lease.release()  # harmless after shutdown
    lease2.release()
    lease.release()  # and idempotent
    with pytest.raises(ActorUnavailable):
        await clients.acquire()


async def test_shutdown_returns_early_when_holders_release(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, shutdown_grace=10.0)
        lease = await clients.acquire()

        async def release_soon() -> None:
            await trio.sleep(2)
            lease.release()

        nursery.start_soon(release_soon)
        start_time = trio.current_time()
        await clients.shutdown()
        assert 2.0 <= trio.current_time() - start_time < 3.0
    assert factory.transports[1].closes == 1


async def test_retired_generation_past_drain_timeout_is_force_closed(autojump_clock):
    factory = Factory()
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, drain_timeout=900.0)
        lease = await clients.acquire()
        await clients.rotate(seen_generation=1)
        await trio.sleep(899)
        assert factory.transports[1].closes == 0
        await trio.sleep(2)
        assert factory.transports[1].closes == 1
        stats = await clients.stats()
        assert stats.force_closes == 1
        assert 1 not in stats.leases
        lease.release()  # late release of a force-closed generation is ignored
        assert (await clients.stats()).leases == {2: 0}
        await clients.shutdown()


async def test_failure_building_new_generation_keeps_old_one(autojump_clock):
    factory = Factory()
    factory.fail_generations.add(2)
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        assert await clients.rotate(seen_generation=1) == 1
        stats = await clients.stats()
        assert stats.generation == 1
        assert stats.rotation_failures == 1
        async with clients.lease() as lease:
            assert lease.generation == 1
            assert (await lease.client.get("http://upstream.test/")).status_code == 200
        assert factory.transports[1].closes == 0
        # the next attempt builds generation 3 (numbers are never reused)
        assert await clients.rotate(seen_generation=1) == 3
        await clients.shutdown()


async def test_lease_send_classifies_transport_errors_with_generation(autojump_clock):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    factory = Factory(handler)
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory)
        async with clients.lease() as lease:
            with pytest.raises(TransportError) as info:
                await lease.send(lease.client.build_request("GET", "http://upstream.test/"))
        assert info.value.generation == 1
        assert info.value.phase is Phase.CONNECT
        assert info.value.pre_dispatch
        await clients.shutdown()


async def test_dead_path_rotation_shortens_stream_silence(autojump_clock):
    async def silent_body():
        yield b"data: first\n\n"
        await trio.sleep_forever()

    factory = Factory(lambda request: httpx.Response(200, content=silent_body()))
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, stream_idle_timeout=240.0, dead_path_silence=3.0)
        chunks: list[bytes] = []
        async with clients.lease() as lease:
            response = await lease.send(lease.client.build_request("GET", "http://upstream.test/"))
            send, recv = trio.open_memory_channel[bytes](0)

            async def consume() -> None:
                async for chunk in recv:
                    chunks.append(chunk)

            async def flip_network() -> None:
                await trio.sleep(100)
                await clients.rotate(reason=RotationReason.NETWORK_CHANGE)

            nursery.start_soon(consume)
            nursery.start_soon(flip_network)
            started = trio.current_time()
            with send, pytest.raises(TransportError) as info:
                await lease.pump(response, send)
            await response.aclose()
        # silent for longer than dead_path_silence already: ended at the flip, not at 240 s
        assert 100.0 <= trio.current_time() - started < 101.0
        assert info.value.path_dead
        assert info.value.phase is Phase.BODY
        assert chunks == [b"data: first\n\n"]
        await clients.shutdown()


async def test_healthy_silence_uses_the_long_idle_timeout(autojump_clock):
    async def silent_body():
        yield b"x"
        await trio.sleep_forever()

    factory = Factory(lambda request: httpx.Response(200, content=silent_body()))
    async with trio.open_nursery() as nursery:
        _, clients = await start(nursery, factory, stream_idle_timeout=240.0)
        async with clients.lease() as lease:
            response = await lease.send(lease.client.build_request("GET", "http://upstream.test/"))
            send, recv = trio.open_memory_channel[bytes](10)
            started = trio.current_time()
            with send, recv, pytest.raises(TransportError) as info:
                await lease.pump(response, send)
            await response.aclose()
        assert 240.0 <= trio.current_time() - started < 241.0
        assert not info.value.path_dead
        await clients.shutdown()
