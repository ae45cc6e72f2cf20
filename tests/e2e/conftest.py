"""Fixtures for the end-to-end tests: the pinned Codex CLI and a loopback sink for stray hosts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.e2e.codex_cli import LoopbackSink, ensure_codex_installed


@pytest.fixture(scope="session")
def codex_binary() -> Path:
    """The ``codex`` binary of the pinned version, installed once into .cache/ with npm.

    Fails (does not skip) every test that needs it when npm is missing or the install fails.
    """
    return ensure_codex_installed()


@pytest.fixture
async def loopback_sink() -> AsyncIterator[LoopbackSink]:
    """A started LoopbackSink; cancelled after the test."""
    sink = LoopbackSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        yield sink
        nursery.cancel_scope.cancel()
