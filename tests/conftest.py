"""Shared fixtures: the fake upstream and a chaos proxy in front of it (see tests/README.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from tests.fakes.chaos import ChaosProxy
from tests.fakes.upstream import FakeUpstream, open_fake_upstream


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """A started FakeUpstream with no accounts; torn down (cancelled) after the test."""
    async with open_fake_upstream() as fake:
        yield fake


@pytest.fixture
async def chaos(fake_upstream: FakeUpstream) -> AsyncIterator[ChaosProxy]:
    """A ChaosProxy forwarding to ``fake_upstream``; reach the fake through ``chaos.port``."""
    proxy = ChaosProxy(target_host="127.0.0.1", target_port=fake_upstream.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()
