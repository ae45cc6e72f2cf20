"""The whole proxy in-process on real loopback sockets: fake upstream ← chaos ← engine ← hypercorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from actors.accounts import Account
from actors.supervisor import Engine
from service.config import Config, with_overrides
from service.login import import_auth_data
from service.server import serve
from service.store import SQLiteAccountStore
from tests.fakes.chaos import ChaosProxy
from tests.fakes.upstream import FakeAccount, FakeUpstream


@dataclass
class Stack:
    url: str
    fake: FakeUpstream
    chaos: ChaosProxy
    store: SQLiteAccountStore
    config: Config
    engine_box: dict[str, Engine]
    accounts: dict[str, Account]

    @property
    def engine(self) -> Engine:
        return self.engine_box["engine"]

    def http(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)

    async def add_account(self, fake_account: FakeAccount) -> Account:
        result = await import_auth_data(self.store, self.fake.auth_json(fake_account))
        self.accounts[fake_account.chatgpt_account_id] = result.account
        return result.account


@asynccontextmanager
async def open_stack(
    tmp_path: Path, fake: FakeUpstream, chaos: ChaosProxy, *, accounts: int = 1, **overrides: Any
) -> AsyncIterator[Stack]:
    sections: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "drain_seconds": 5.0},
        "upstream": {"base_url": fake.base_url_for(chaos.port),
                     "auth_base_url": fake.auth_base_url_for(chaos.port),
                     "header_timeout": 2.0, "connect_timeout": 2.0},
        "client": {"shutdown_grace": 2.0, "watch_interval": 0.5},
        "storage": {"home": str(tmp_path / "home")},  # the request log's file goes here too
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    config = with_overrides(Config(), **sections)
    store = await SQLiteAccountStore.open(tmp_path / "home")
    engine_box: dict[str, Engine] = {}
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(_serve_capturing, config, store, shutdown, engine_box)
            stack = Stack(url=urls[0], fake=fake, chaos=chaos, store=store, config=config,
                          engine_box=engine_box, accounts={})
            for index in range(accounts):
                letter = "abcdefgh"[index]
                await stack.add_account(fake.add_account(
                    email=f"{letter}@example.com", chatgpt_account_id=f"acct-{letter}", plan="plus"))
            try:
                yield stack
            finally:
                shutdown.set()
    finally:
        await store.aclose()


async def _serve_capturing(config, store, shutdown, engine_box, *, task_status=trio.TASK_STATUS_IGNORED):
    def keep(urls: list[str], engine: Engine) -> None:
        engine_box["engine"] = engine

    await serve(config, shutdown=shutdown, handle_signals=False, store=store, on_listening=keep,
                task_status=task_status)


async def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """Every event payload of an SSE response, in order."""
    import json

    events: list[dict[str, Any]] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data and data != "[DONE]":
                events.append(json.loads(data))
    return events


CODEX_BODY = {
    "model": "gpt-5-codex",
    "instructions": "You are a test.",
    "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
    "store": False, "stream": True, "include": [], "prompt_cache_key": "cache-1",
}
