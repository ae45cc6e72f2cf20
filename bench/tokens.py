"""Token refresh latency through the proxy's own client, and durable store write latency.

    python bench/tokens.py [--rounds 50]

Refreshes go to the fake upstream on loopback (tests/fakes), once through the
engine (TokenRefresher → ClientManager lease → httpx) and once with a bare httpx
client, so the ratio is the engine's overhead. Store writes are SQLiteAccountStore
.save_tokens (WAL, synchronous=FULL, Fernet) on a real file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.accounts import TokenSet  # noqa: E402
from actors.supervisor import open_actors  # noqa: E402
from service.config import Config, with_overrides  # noqa: E402
from service.login import import_auth_data  # noqa: E402
from service.store import SQLiteAccountStore  # noqa: E402
from tests.fakes.upstream import open_fake_upstream  # noqa: E402


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_fake_upstream() as fake:
            store = await SQLiteAccountStore.open(Path(tmp) / "home")
            acct = fake.add_account(email="bench@example.com", chatgpt_account_id="acct-bench")
            account = (await import_auth_data(store, fake.auth_json(acct))).account
            config = with_overrides(
                Config(),
                upstream={"base_url": fake.base_url, "auth_base_url": fake.auth_base_url},
                refresh={"token_spacing": 0.0},
            )
            engine_samples: list[float] = []
            async with open_actors(config, store, watch_network=False, periodic_refresh=False) as engine:
                for _ in range(rounds):
                    started = time.perf_counter()
                    await engine.tokens.ensure_fresh(account.id, force=True)
                    engine_samples.append(time.perf_counter() - started)

            direct_samples: list[float] = []
            async with httpx.AsyncClient() as client:
                for _ in range(rounds):
                    refresh_token = acct.refresh_token
                    started = time.perf_counter()
                    response = await client.post(f"{fake.auth_base_url}/oauth/token", json={
                        "grant_type": "refresh_token", "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
                        "refresh_token": refresh_token, "scope": "openid profile email"})
                    response.raise_for_status()
                    direct_samples.append(time.perf_counter() - started)

            write_samples: list[float] = []
            for index in range(rounds):
                tokens = TokenSet(access_token=f"a{index}", refresh_token=f"r{index}", id_token="i")
                started = time.perf_counter()
                await store.save_tokens(account.id, tokens, access_expires_at=None, last_refresh=time.time())
                write_samples.append(time.perf_counter() - started)
            await store.aclose()

    print(f"refresh via engine : {summary(engine_samples)}")
    print(f"refresh direct     : {summary(direct_samples)}")
    print(f"ratio engine/direct (median): "
          f"{statistics.median(engine_samples) / statistics.median(direct_samples):.2f}x")
    print(f"store save_tokens  : {summary(write_samples)} (WAL, synchronous=FULL, Fernet)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    trio.run(main, parser.parse_args().rounds)
