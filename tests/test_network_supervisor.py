"""Network watcher and supervision unit tests (autojump clock, no real sleeps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from actors.client_manager import ClientManager, ClientSettings
from actors.errors import ActorUnavailable
from actors.messages import answer, call
from actors.network import NetworkWatcher
from actors.supervisor import CrashLoop, SupervisionPolicy, supervise
from tests.test_client_manager import Factory


class ScriptedProbes:
    """A route probe and a wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.address: str | None = "192.168.1.20"
        self.wall_offset = 0.0

    async def route(self) -> str | None:
        return self.address

    def wall(self) -> float:
        return 1_700_000_000.0 + trio.current_time() + self.wall_offset


async def test_watcher_rotates_once_per_change_and_never_on_quiet_ticks(autojump_clock):
    probes = ScriptedProbes()
    async with trio.open_nursery() as nursery:
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=Factory()).run)
        watcher = NetworkWatcher(clients, route_probe=probes.route, wall_clock=probes.wall, interval=1.0)
        await nursery.start(watcher.run)
        await trio.sleep(30.5)  # thirty quiet ticks
        assert watcher.ticks == 30
        assert (await clients.stats()).rotations == {}

        probes.address = "10.8.0.2"  # a VPN came up
        await trio.sleep(10)
        stats = await clients.stats()
        assert stats.rotations == {"network-change": 1}
        assert stats.generation == 2

        probes.wall_offset += 3600  # the laptop slept for an hour
        await trio.sleep(10)
        stats = await clients.stats()
        assert stats.rotations == {"network-change": 1, "wake": 1}
        assert stats.generation == 3

        probes.wall_offset += 2  # NTP nudges below the threshold are not a wake
        await trio.sleep(10)
        assert (await clients.stats()).generation == 3
        await clients.shutdown()
        nursery.cancel_scope.cancel()


async def test_watcher_wake_marks_the_old_path_dead_but_a_lost_route_does_not(autojump_clock):
    probes = ScriptedProbes()
    async with trio.open_nursery() as nursery:
        clients = await nursery.start(ClientManager(ClientSettings(), client_factory=Factory()).run)
        lease = await clients.acquire()
        watcher = NetworkWatcher(clients, route_probe=probes.route, wall_clock=probes.wall)
        await nursery.start(watcher.run)
        probes.address = None  # the route vanished (or DNS failed): no change
        await trio.sleep(2)
        assert not lease.path_dead.is_set()
        assert (await clients.stats()).rotations == {}
        probes.wall_offset += 600  # the laptop slept
        await trio.sleep(2)
        assert lease.path_dead.is_set()
        assert lease.idle_timeout() == ClientSettings().dead_path_silence
        lease.release()
        await clients.shutdown()
        nursery.cancel_scope.cancel()


# --- supervision, with a tiny actor whose inbox lives on the object ------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ask:
    text: str
    reply: trio.MemorySendChannel[Any]


class Fragile:
    """Answers 'echo:<text>'; 'boom' crashes it, 'hang-then-boom' crashes while holding."""

    def __init__(self) -> None:
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[Ask](8)
        self.incarnations = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.incarnations += 1
        task_status.started(self.inbox_send.clone())
        async for message in self.inbox_recv:
            with message.reply:
                if message.text == "boom":
                    raise RuntimeError("unexpected state")
                if message.text == "slow-boom":
                    await trio.sleep(1)
                    raise KeyError("lost it")
                answer(message.reply, f"echo:{message.text}")


async def ask(inbox, text: str, timeout: float = 5.0) -> str:
    return await call(inbox, lambda r: Ask(text=text, reply=r), actor="fragile", timeout=timeout)


async def test_crashed_actor_restarts_and_its_handle_keeps_working(autojump_clock, caplog):
    actor = Fragile()
    async with trio.open_nursery() as nursery:
        inbox = await nursery.start(supervise, "fragile actor", actor.run, SupervisionPolicy())
        assert await ask(inbox, "hi") == "echo:hi"
        started = trio.current_time()
        with pytest.raises(ActorUnavailable, match="stopped before answering"):
            await ask(inbox, "slow-boom", timeout=30)
        assert trio.current_time() - started < 30  # told at once, not at the deadline
        assert await ask(inbox, "again") == "echo:again"  # same handle, new incarnation
        assert actor.incarnations == 2
        nursery.cancel_scope.cancel()
    assert "fragile actor crashed" in caplog.text
    assert "KeyError" in caplog.text  # the traceback was logged


async def test_crash_loop_stops_the_service(autojump_clock):
    actor = Fragile()
    with pytest.RaisesGroup(pytest.RaisesExc(CrashLoop, match="crashed 5 times in 60s")):
        async with trio.open_nursery() as nursery:
            inbox = await nursery.start(supervise, "fragile actor", actor.run, SupervisionPolicy())
            for _ in range(5):
                with pytest.raises(ActorUnavailable):
                    await ask(inbox, "boom", timeout=30)
            await trio.sleep_forever()
    assert actor.incarnations == 5


async def test_crashes_spread_out_are_not_a_loop(autojump_clock):
    actor = Fragile()
    async with trio.open_nursery() as nursery:
        inbox = await nursery.start(supervise, "fragile actor", actor.run, SupervisionPolicy())
        for _ in range(8):
            with pytest.raises(ActorUnavailable):
                await ask(inbox, "boom", timeout=30)
            await trio.sleep(20)
        assert await ask(inbox, "still here") == "echo:still here"
        nursery.cancel_scope.cancel()


async def test_cancellation_is_not_a_crash(autojump_clock, caplog):
    actor = Fragile()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "fragile actor", actor.run, SupervisionPolicy())
        nursery.cancel_scope.cancel()
    assert actor.incarnations == 1
    assert "crashed" not in caplog.text
