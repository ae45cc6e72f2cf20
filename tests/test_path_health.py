"""Path health by evidence: the ClientManager's rules, the hedge, address evidence.

Unit tests drive the manager with MockTransport clients under the autojump clock; the
integration tests at the end go through real sockets and the chaos proxy.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing

from actors.client_manager import ClientManager, ClientSettings, keepalive_socket_options
from actors.errors import PoolExhausted, TransportError, classify
from actors.hedge import Hedge
from actors.messages import RotationReason
from actors.network import NetworkWatcher
from actors.path_health import HeaderLatency, SocketRegistry
from tests.fakes.chaos import ChaosProxy
from tests.fakes.upstream import FakeUpstream
from tests.stack import CODEX_BODY, open_stack, read_sse

URL = "http://upstream.test/x"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


async def answer_now(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="ok")


async def never_answer(request: httpx.Request) -> httpx.Response:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def answer_after(seconds: float) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(seconds)
        return httpx.Response(200, text="slow")

    return handler


class PerGeneration:
    """A client factory whose generations can each behave differently."""

    def __init__(self, default: Handler = answer_now) -> None:
        self.default = default
        self.handlers: dict[int, Handler] = {}
        self.calls: dict[int, int] = {}

    def __call__(self, generation: int) -> httpx.AsyncClient:
        async def handler(request: httpx.Request) -> httpx.Response:
            self.calls[generation] = self.calls.get(generation, 0) + 1
            return await self.handlers.get(generation, self.default)(request)

        return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def start(nursery: trio.Nursery, factory: PerGeneration, **settings):
    manager = ClientManager(ClientSettings(**settings), client_factory=factory)
    return await nursery.start(manager.run)


async def get(lease, **kwargs) -> httpx.Response:
    response = await lease.send(lease.client.build_request("GET", URL), **kwargs)
    await response.aread()
    await response.aclose()
    return response


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# --- rule 3: application evidence counts only when corroborated ------------------------


async def test_header_timeout_alone_marks_nothing_and_corroboration_marks_n(autojump_clock):
    factory = PerGeneration()
    factory.handlers[1] = never_answer
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=15.0)
        async with clients.lease() as lease:
            started = trio.current_time()
            with pytest.raises(TransportError) as info:
                await get(lease)
            assert trio.current_time() - started == pytest.approx(15.0, abs=0.1)
            assert not info.value.path_dead
            assert await clients.rotate(seen_generation=1, reason=RotationReason.TRANSPORT) == 2
            await settle()
            assert not lease.path_dead.is_set()  # suspect only
            assert (await clients.stats()).dead == ()
            async with clients.lease() as fresh:
                assert (await get(fresh)).status_code == 200  # N+1 answers where N did not
            await settle()
            assert lease.path_dead.is_set()
            assert lease.idle_timeout() == ClientSettings().dead_path_silence
        stats = await clients.stats()
        assert stats.evidence == {"application": 1}
        await clients.shutdown()


async def test_slow_fresh_connection_marks_nothing_and_rotates_no_more(autojump_clock):
    factory = PerGeneration(default=never_answer)
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=15.0)
        for _ in range(3):
            async with clients.lease() as lease:
                with pytest.raises(TransportError):
                    await get(lease)
                await clients.rotate(seen_generation=lease.generation, reason=RotationReason.TRANSPORT)
        stats = await clients.stats()
        assert stats.dead == ()
        assert stats.evidence == {}
        await clients.shutdown()


async def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_a_refused_connect_rotates_but_marks_no_open_stream_dead(autojump_clock):
    # A new socket that failed to connect says nothing about the sockets generation N has
    # open: every generation connects over the same route. Taking it as evidence marked N
    # dead once N+1 answered, and cut N's healthy slow streams to 3 s of silence (the sim
    # found a request failed over and answered after 119 s).
    factory = PerGeneration()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory)
        streaming = await clients.acquire()  # a slow stream in flight on generation 1
        async with clients.lease() as lease:
            factory.handlers[1] = refuse
            with pytest.raises(TransportError) as info:
                await get(lease)
            err = info.value
            assert await clients.rotate(seen_generation=1, reason=RotationReason.TRANSPORT,
                                        path_dead=err.path_dead, phase=err.phase) == 2
        async with clients.lease() as fresh:
            assert (await get(fresh)).status_code == 200
        await settle()
        assert not streaming.path_dead.is_set()
        assert streaming.idle_timeout() == ClientSettings().stream_idle_timeout
        stats = await clients.stats()
        assert stats.dead == ()
        assert stats.rotations == {"transport": 1}
        streaming.release()
        await clients.shutdown()


async def test_stale_rotation_still_carries_its_evidence(autojump_clock):
    factory = PerGeneration()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory)
        old = await clients.acquire()
        assert await clients.rotate(seen_generation=1, reason=RotationReason.ADMIN) == 2
        # a request on generation 1 failed after someone else rotated: still evidence
        assert await clients.rotate(seen_generation=1, reason=RotationReason.TRANSPORT) == 2
        async with clients.lease() as fresh:
            await get(fresh)
        await settle()
        assert old.path_dead.is_set()
        old.release()
        await clients.shutdown()


# --- dead generations: header waits end too -------------------------------------------


async def test_header_wait_on_a_dead_generation_ends_after_dead_path_silence(autojump_clock):
    factory = PerGeneration()
    factory.handlers[1] = never_answer
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=300.0, dead_path_silence=3.0)
        async with clients.lease() as lease:
            results: list[float] = []

            async def wait_headers(delay: float) -> None:
                await trio.sleep(delay)
                started = trio.current_time()
                with pytest.raises(TransportError) as info:
                    await get(lease, header_timeout=300.0)
                assert info.value.path_dead
                assert info.value.pre_dispatch
                results.append(trio.current_time() - started)

            async with trio.open_nursery() as waits:
                waits.start_soon(wait_headers, 0.0)  # waiting for 10 s already at the wake
                waits.start_soon(wait_headers, 9.0)  # waiting for 1 s at the wake
                await trio.sleep(10)
                await clients.rotate(reason=RotationReason.WAKE)
        assert sorted(round(r, 1) for r in results) == [3.0, 10.0]
        await clients.shutdown()


async def test_wake_marks_every_older_generation_dead_even_when_coalesced(autojump_clock):
    factory = PerGeneration()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, rotation_cooldown=1.0)
        first = await clients.acquire()
        await clients.rotate(seen_generation=1, reason=RotationReason.ADMIN)
        second = await clients.acquire()
        await clients.rotate(seen_generation=2, reason=RotationReason.TRANSPORT)
        third = await clients.acquire()
        # within the cooldown of the last rotation: coalesced, yet 1 and 2 are dead now
        assert await clients.rotate(reason=RotationReason.WAKE) == 3
        assert first.path_dead.is_set()
        assert second.path_dead.is_set()
        assert not third.path_dead.is_set()
        stats = await clients.stats()
        assert stats.dead == (1, 2)
        assert stats.evidence == {"wake": 2}
        for lease in (first, second, third):
            lease.release()
        await clients.shutdown()


# --- the hedge ---------------------------------------------------------------------------


async def hedged_get(clients, lease) -> tuple[httpx.Response, int]:
    async with Hedge(clients, lease) as hedge:
        response = await hedge.send(lambda held: held.client.build_request("GET", URL))
        await response.aread()
        await response.aclose()
        return response, hedge.lease.generation


async def test_hedge_wins_on_a_fresh_generation_and_marks_the_original_dead(autojump_clock):
    factory = PerGeneration()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=15.0, hedge_after=2.0)
        async with clients.lease() as lease:
            await get(lease)  # generation 1 has answered before: it is proven
        factory.handlers[1] = never_answer  # the network flipped under generation 1
        async with clients.lease() as lease:
            started = trio.current_time()
            response, generation = await hedged_get(clients, lease)
            assert response.text == "ok"
            assert generation == 2
            assert trio.current_time() - started == pytest.approx(2.0, abs=0.1)
            await settle()
            assert lease.path_dead.is_set()
        stats = await clients.stats()
        assert stats.rotations == {"hedge": 1}
        assert stats.hedges == {"started": 1, "hedge_won": 1}
        assert stats.evidence == {"hedge": 1}
        await clients.shutdown()


async def test_slow_upstream_at_most_one_hedge_per_request_and_one_rotation(autojump_clock):
    factory = PerGeneration()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=15.0, hedge_after=2.0)
        async with clients.lease() as lease:
            await get(lease)  # proven while fast
        factory.default = answer_after(5.0)  # from now on every answer takes 5 s
        factory.handlers.clear()
        for _ in range(10):
            async with clients.lease() as lease:
                response, _ = await hedged_get(clients, lease)
                assert response.text == "slow"
        await settle()
        stats = await clients.stats()
        assert sum(stats.rotations.values()) <= 1
        assert stats.hedges.get("started", 0) <= 10
        assert stats.hedges.get("hedge_won", 0) == 0
        assert stats.dead == ()
        assert stats.hedge_after == pytest.approx(15.0)  # 3 × the p99 of 5 s
        await clients.shutdown()


async def test_hedge_from_an_unproven_generation_does_not_rotate(autojump_clock):
    factory = PerGeneration()
    factory.handlers[1] = answer_after(3.0)
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory, header_timeout=15.0, hedge_after=2.0)
        async with clients.lease() as lease:
            response, generation = await hedged_get(clients, lease)
        assert generation == 1
        await settle()
        stats = await clients.stats()
        assert stats.rotations == {}
        assert stats.hedges["started"] == 1
        assert factory.calls[1] == 2  # the hedge ran on a fresh connection of generation 1
        await clients.shutdown()


def test_header_latency_p99_sets_hedge_after():
    latency = HeaderLatency()
    assert latency.hedge_after(2.0, 3.0) == 2.0
    for _ in range(99):
        latency.add(0.2)
    latency.add(4.0)
    assert latency.hedge_after(2.0, 3.0) == pytest.approx(2.0)  # one outlier in 100 is not p99
    latency.add(4.0)
    assert latency.hedge_after(2.0, 3.0) == pytest.approx(12.0)


# --- classification, cookies, socket options -------------------------------------------


def test_pool_timeout_is_our_own_capacity_not_the_network():
    err = classify(httpx.PoolTimeout("pool full"))
    assert isinstance(err, PoolExhausted)
    assert not isinstance(err, TransportError)
    assert err.http_status == 503


async def test_no_cookie_is_kept_between_requests(autojump_clock):
    seen: list[str | None] = []

    async def set_cookie(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "session=abc; Path=/"})

    factory = PerGeneration(default=set_cookie)
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, factory)
        async with clients.lease() as lease:
            await get(lease)
            await get(lease)
            assert len(lease.client.cookies) == 0
        assert seen == [None, None]
        await clients.shutdown()


def test_every_upstream_socket_gets_keepalive_and_user_timeout():
    options = set(keepalive_socket_options(ClientSettings()))
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3) in options
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 15000) in options


# --- address evidence ------------------------------------------------------------------


class FakeSocket:
    def __init__(self, address: str) -> None:
        self.address = address
        self.shut = False

    def getsockname(self) -> tuple[str, int]:
        return (self.address, 40000)

    def shutdown(self, how: int) -> None:
        self.shut = True


def test_registry_closes_exactly_the_sockets_on_other_addresses():
    registry = SocketRegistry()
    old, kept = FakeSocket("10.0.0.2"), FakeSocket("192.168.1.5")
    registry.add(old)
    registry.add(kept)
    assert registry.close_not_bound_to("192.168.1.5") == 1
    assert old.shut
    assert not kept.shut
    assert len(registry) == 1


class ScriptedRoute:
    def __init__(self) -> None:
        self.address: str | None = "10.0.0.2"

    async def probe(self) -> str | None:
        return self.address

    def wall(self) -> float:
        return 1_700_000_000.0 + trio.current_time()


async def test_watcher_dns_failure_and_same_address_blip_are_no_change(autojump_clock):
    route = ScriptedRoute()
    async with trio.open_nursery() as nursery:
        clients = await start(nursery, PerGeneration())
        old = await clients.acquire()
        old_socket, other = FakeSocket("10.0.0.2"), FakeSocket("127.0.0.1")
        old.sockets.add(old_socket)
        old.sockets.add(other)
        watcher = NetworkWatcher(clients, route_probe=route.probe, wall_clock=route.wall)
        await nursery.start(watcher.run)
        route.address = None  # DNS fails, or the route is lost for a while
        await trio.sleep(5)
        route.address = "10.0.0.2"  # ...and comes back on the same address
        await trio.sleep(5)
        stats = await clients.stats()
        assert stats.rotations == {}
        assert not old_socket.shut

        route.address = "192.168.1.5"  # a real change
        await trio.sleep(1.5)
        stats = await clients.stats()
        assert stats.rotations == {"network-change": 1}
        assert old_socket.shut  # neither is bound to the route's new address
        assert other.shut
        assert stats.sockets_closed == {"address": 2}
        assert stats.dead == ()  # address evidence is per socket, not per generation
        old.release()
        await clients.shutdown()
        nursery.cancel_scope.cancel()


# --- integration: real sockets through the chaos proxy -----------------------------------

TURN_HEADERS = {"session-id": "flip", "originator": "codex_exec"}


async def timed_turn(http: httpx.AsyncClient, body=None) -> tuple[float, int, list[dict]]:
    started = trio.current_time()
    async with http.stream("POST", "/backend-api/codex/responses", json=body or CODEX_BODY,
                           headers=TURN_HEADERS) as response:
        events = await read_sse(response) if response.status_code == 200 else []
        if response.status_code != 200:
            await response.aread()
    return trio.current_time() - started, response.status_code, events


async def test_black_holed_pool_request_succeeds_via_hedge_and_silent_stream_ends(
    tmp_path, fake_upstream: FakeUpstream, chaos: ChaosProxy
):
    from tests.fakes.faults import Fault

    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"header_timeout": 15.0}) as stack, stack.http() as http:
            for _ in range(2):  # pools a connection, proves the generation
                _, status, _ = await timed_turn(http)
                assert status == 200
            sockets = (await stack.engine.clients.stats()).sockets
            assert sockets >= 1  # the pool's sockets are tracked with their local address

            # a stream in flight at the flip: three events, then thinking (silent)
            fake_upstream.fault("*", "responses", Fault.stop_midway(3, mode="silent"))
            results: dict[str, tuple[float, int, list[dict]]] = {}

            async def long_stream() -> None:
                results["stream"] = await timed_turn(http)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_stream)
                with trio.fail_after(30):
                    await fake_upstream.wait_for_count("responses", 3)
                async with stack.http() as other:
                    _, status, _ = await timed_turn(other)  # pools a second, idle connection
                    assert status == 200
                    await trio.sleep(0.5)
                    flipped = trio.current_time()
                    chaos.blackhole_existing()  # the stream's socket and the pooled one go dead
                    results["request"] = await timed_turn(other)
            stream_ended = trio.current_time()
            request_took, status, events = results["request"]
            assert status == 200
            assert events[-1]["type"] == "response.completed"
            # The hedge answered, not the 15 s header timeout. hedge_after is 2 s or 3x the recent
            # p99 header latency, which grows on a loaded machine: the bound only separates
            # the two mechanisms.
            assert request_took < 15.0, f"request took {request_took:.2f}s"
            _, status, stream_events = results["stream"]
            assert stream_events[-1]["type"] == "response.failed"
            assert stream_events[-1]["response"]["error"]["code"] == "upstream_connection_lost"
            # dead_path_silence (3 s) after the hedge's evidence, not the 240 s idle timeout.
            assert stream_ended - flipped < 30.0
            stats = await stack.engine.clients.stats()
            assert stats.hedges.get("hedge_won", 0) >= 1
            assert stats.evidence.get("hedge") == 1  # generation 1 (closed since) was marked dead
            print(f"black-hole flip: request {request_took:.2f}s, stream ended "
                  f"{stream_ended - flipped:.2f}s after the flip")


async def test_slow_compact_beside_a_silent_stream_no_rotation(
    tmp_path, fake_upstream: FakeUpstream, chaos: ChaosProxy
):
    from tests.fakes.faults import Fault

    with trio.fail_after(90):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"header_timeout": 15.0}) as stack, stack.http() as http:
            _, status, _ = await timed_turn(http)
            assert status == 200
            fake_upstream.fault("*", "compact", Fault.slow_headers(40.0))
            results: dict[str, object] = {}

            async def compact() -> None:
                response = await http.post("/backend-api/codex/responses/compact",
                                           json={"model": "gpt-5-codex", "input": []},
                                           headers=TURN_HEADERS, timeout=120)
                results["compact"] = response.status_code

            async def silent_stream() -> None:
                fake_upstream.event_delay = 25.0  # one 25 s silence between the first events
                results["stream"] = await timed_turn(http)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(compact)
                await trio.sleep(0.5)
                nursery.start_soon(silent_stream)
                await trio.sleep(1.0)
                fake_upstream.event_delay = 0.0  # the rest of the stream comes at once
            assert results["compact"] == 200
            assert fake_upstream.count("compact") == 1  # no replay
            _, status, events = results["stream"]  # type: ignore[misc]
            assert events[-1]["type"] == "response.completed"
            stats = await stack.engine.clients.stats()
            assert stats.rotations == {}
            assert stats.dead == ()


async def test_upstream_slow_headers_every_request_no_failure(
    tmp_path, fake_upstream: FakeUpstream, chaos: ChaosProxy
):
    from tests.fakes.faults import Fault

    with trio.fail_after(120):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"header_timeout": 15.0}) as stack, stack.http() as http:
            _, status, _ = await timed_turn(http)
            assert status == 200
            before = fake_upstream.count("responses")
            turns = 4
            for _ in range(turns * 2):  # every request (hedges included) takes 5 s
                fake_upstream.fault("*", "responses", Fault.slow_headers(5.0))
            for _ in range(turns):
                took, status, events = await timed_turn(http)
                assert status == 200
                assert events[-1]["type"] == "response.completed"
            stats = await stack.engine.clients.stats()
            assert sum(stats.rotations.values()) <= 1
            assert fake_upstream.count("responses") - before <= 2 * turns  # ≤ 1 hedge each
            assert stats.dead == ()


async def test_address_evidence_ends_streams_and_retries_header_waits_on_real_sockets(
    tmp_path, fake_upstream: FakeUpstream, chaos: ChaosProxy
):
    """Address evidence without namespaces: every socket here is bound to 127.0.0.1."""
    from tests.fakes.faults import Fault

    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos,
                              upstream={"header_timeout": 15.0, "hedge_after": 30.0}) as stack:
            async with stack.http() as http:
                _, status, _ = await timed_turn(http)
                assert status == 200
            results: dict[str, tuple[float, int, list[dict]]] = {}

            async def run(name: str) -> None:
                async with stack.http() as own:
                    results[name] = await timed_turn(own)

            async with trio.open_nursery() as nursery:
                fake_upstream.fault("*", "responses", Fault.stop_midway(3, mode="silent"))
                nursery.start_soon(run, "stream")
                await fake_upstream.wait_for_count("responses", 2)
                fake_upstream.fault("*", "responses", Fault.slow_headers(20.0))
                nursery.start_soon(run, "waiting")
                await fake_upstream.wait_for_count("responses", 3)
                await trio.sleep(0.3)
                changed = trio.current_time()
                await stack.engine.clients.address_changed(old="127.0.0.1", new="127.0.0.2")
            _, _, stream_events = results["stream"]
            assert stream_events[-1]["type"] == "response.failed"
            assert stream_events[-1]["response"]["error"]["code"] == "upstream_connection_lost"
            took, status, events = results["waiting"]
            assert status == 200  # retried
            assert events[-1]["type"] == "response.completed"
            # retried at the address change, not after the 15 s header timeout
            assert trio.current_time() - changed < 10.0
            stats = await stack.engine.clients.stats()
            assert stats.sockets_closed["address"] >= 2
            assert stats.rotations == {"network-change": 1}
            assert fake_upstream.count("responses") == 4  # the waiting one once more, no more


def test_metrics_show_hedges_evidence_and_closed_sockets_per_host():
    from actors.messages import ClientStats
    from service.app import render_metrics

    backend = ClientStats(generation=3, leases={3: 1}, retired=(), rotations={"hedge": 1},
                          force_closes=0, rotation_failures=0, host="backend", hedge_after=2.0,
                          hedges={"started": 2, "hedge_won": 1}, evidence={"hedge": 1},
                          sockets_closed={"address": 4})
    auth = ClientStats(generation=1, leases={1: 0}, retired=(), rotations={}, force_closes=0,
                       rotation_failures=0, host="auth", hedge_after=math.inf)
    text = render_metrics(backend, auth)
    assert 'codex_lb_path_hedges_total{host="backend",outcome="hedge_won"} 1' in text
    assert 'codex_lb_path_evidence_total{host="backend",kind="hedge"} 1' in text
    assert 'codex_lb_path_sockets_closed_total{host="backend",reason="address"} 4' in text
    assert 'codex_lb_path_generation{host="auth"} 1' in text
    assert 'codex_lb_path_hedge_after_seconds{host="auth"} +Inf' in text
    assert backend.to_json()["sockets_closed"] == {"address": 4}
