"""The dashboard in a real headless browser (Playwright driving Debian's chromium) against the
real program as a subprocess and the fake upstream; plus the page's JSON routes in-process.

Screenshots go to .cache/dashboard/ (not committed). The browser is never downloaded: the
tests skip with a reason when /usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.request_record import RequestRecord
from service.login import import_auth_data
from service.request_log import open_request_log
from service.store import SQLiteAccountStore
from tests.proc import ServerProcess
from tests.stack import CODEX_BODY, open_stack

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".cache" / "dashboard"
WAIT_MS = 30_000  # every wait in the page: a hang guard, generous for a loaded machine
KEY = "open-sesame-0123456789"  # a proxy API key for the key-prompt test
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]

needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install -y chromium; .ci/run does it when root)")


def sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:  # pragma: no cover - the test extra installs it
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    return start()


def write_config(tmp_path: Path, fake_port: int, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        "[upstream]\n"
        f'base_url = "http://127.0.0.1:{fake_port}/backend-api"\n'
        f'auth_base_url = "http://127.0.0.1:{fake_port}"\n'
        "[client]\nshutdown_grace = 1.0\nrotation_cooldown = 0.0\n" + extra
    )
    return config


def cli(home: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CODEX_LB_TRIO_HOME": str(home)}
    env.pop("CODEX_LB_TRIO_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "service.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def account_line(listing: str, account_id: str) -> str:
    return next(line for line in listing.splitlines() if account_id in line)


async def seed_history(home: Path, account_ids: list[str], now: float) -> tuple[int, int]:
    """Earlier traffic in the request log file; (rows in the last 24 h, rows in 30 d)."""
    hourly = daily = 0
    async with open_request_log(home) as log:
        for age_hours in range(30 * 24 - 1, 0, -5):  # oldest first, as they would have come
            for n in range(1 + age_hours % 3):
                account = account_ids[(age_hours + n) % len(account_ids)]
                failed = (age_hours + n) % 11 == 0
                log.record(RequestRecord(
                    started_at=now - age_hours * 3600 - n * 60,
                    request_id=f"req_old_{age_hours}_{n}",
                    surface="codex_http", model="gpt-5.1-codex", account_id=account,
                    status=200, terminal="response.failed" if failed else "response.completed",
                    error_code="server_is_overloaded" if failed else "", attempts=1, generation=1,
                    ttfe_ms=300.0 + 40 * n, duration_ms=4000.0, input_tokens=9000 + 100 * n,
                    cached_input_tokens=6000, output_tokens=700, reasoning_tokens=300))
                hourly += age_hours < 23
                daily += age_hours < 29 * 24
    return hourly, daily


async def seed(home: Path, fake, *specs: tuple[str, str, str]) -> dict[str, str]:
    """Import fake accounts into the store before the server starts; chatgpt id -> our id."""
    store = await SQLiteAccountStore.open(home)
    ids: dict[str, str] = {}
    try:
        for email, chatgpt_id, plan in specs:
            fake_account = fake.add_account(email=email, chatgpt_account_id=chatgpt_id, plan=plan)
            result = await import_auth_data(store, fake.auth_json(fake_account))
            ids[chatgpt_id] = result.account.id
    finally:
        await store.aclose()
    return ids


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS,
                                      headless=True)


def watch_console(page: Any) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"console.{msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    return problems


@needs_browser
async def test_dashboard_in_a_real_browser(tmp_path: Path, fake_upstream) -> None:
    home = tmp_path / "home"
    ids = await seed(home, fake_upstream, ("a@example.com", "acct-a", "plus"),
                     ("b@example.com", "acct-b", "pro"))
    soon = time.time()
    fake_upstream.set_usage("acct-a", primary_used=42.0, primary_reset_at=soon + 2 * 3600,
                            secondary_used=7.0, secondary_reset_at=soon + 4 * 86400)
    fake_upstream.set_usage("acct-b", primary_used=93.0, primary_reset_at=soon + 1800,
                            secondary_used=55.0, secondary_reset_at=soon + 6 * 86400)
    seeded_hourly, _ = await seed_history(home, [ids["acct-a"], ids["acct-b"]], soon)
    newcomer = fake_upstream.add_account(email="c@example.com", chatgpt_account_id="acct-c",
                                         plan="team")
    fake_upstream.next_login = fake_upstream.add_account(
        email="d@example.com", chatgpt_account_id="acct-d", plan="pro")
    fake_upstream.device_auto_approve_after = 2
    upload = tmp_path / "auth.json"
    upload.write_text(json.dumps(fake_upstream.auth_json(newcomer)))
    config = write_config(tmp_path, fake_upstream.port)
    SHOTS.mkdir(parents=True, exist_ok=True)

    def in_browser(url: str) -> None:
        api = httpx.Client(base_url=url, timeout=30, trust_env=False)
        api.post("/api/refresh").raise_for_status()  # usage windows from /wham/usage, now
        with sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 1180})
                page.set_default_timeout(WAIT_MS)
                problems = watch_console(page)
                page.goto(url + "/")
                row_a = page.locator(f'#account-rows tr[data-account="{ids["acct-a"]}"]')
                row_b = page.locator(f'#account-rows tr[data-account="{ids["acct-b"]}"]')
                row_a.wait_for()
                page.wait_for_selector("#updated:has-text('updated')")
                # The usage bars show the fake's windows (after the refresh above).
                page.wait_for_function(
                    """id => { const r = document.querySelector(`tr[data-account="${id}"]`);
                    const bar = r && r.querySelector('[role=meter]');
                    return bar && bar.getAttribute('aria-valuenow') === '42'; }""",
                    arg=ids["acct-a"])
                bars_a = row_a.locator("[role=meter]")
                bars_b = row_b.locator("[role=meter]")
                def used(bars: Any) -> list[str | None]:
                    return [bars.nth(i).get_attribute("aria-valuenow") for i in (0, 1)]

                assert used(bars_a) == ["42", "7"]
                assert used(bars_b) == ["93", "55"]
                assert "high" in (bars_b.nth(0).get_attribute("class") or "")
                assert "resets in 1h" in row_a.locator(".countdown").nth(0).inner_text()
                assert "a@example.com" in row_a.inner_text()
                assert row_a.locator("td").nth(5).inner_text() == "none"  # the fake: no credits
                assert "plus" in row_a.inner_text()

                # A request made now shows in the table without a reload (the page polls each
                # second).
                started = time.monotonic()
                with api.stream("POST", "/backend-api/codex/responses",
                                json={**CODEX_BODY, "model": "dash-probe-model"}) as response:
                    assert response.status_code == 200
                    response.read()
                page.wait_for_selector("#request-rows tr:has-text('dash-probe-model')")
                # Printed, not asserted: no test fails on wall-clock time.
                print(f"the request showed in the table after {time.monotonic() - started:.2f}s")
                probe = page.locator("#request-rows tr:has-text('dash-probe-model')")
                assert "response.completed" in probe.inner_text()

                # Pause with the mouse, resume with the keyboard; the CLI sees both.
                row_a.locator("button[data-action=pause]").click()
                row_a.locator("td.status:has-text('paused')").wait_for()
                listing = cli(home, config, "accounts", "list")
                assert "paused" in account_line(listing.stdout, ids["acct-a"]), listing.stdout
                resume = row_a.locator("button[data-action=resume]")
                resume.focus()
                page.keyboard.press("Enter")
                row_a.locator("td.status:has-text('active')").wait_for()
                listing = cli(home, config, "accounts", "list")
                assert "active" in account_line(listing.stdout, ids["acct-a"]), listing.stdout

                # An auth.json upload adds an account.
                page.set_input_files("#auth-file", str(upload))
                page.click("#upload-form button[type=submit]")
                page.wait_for_selector("#account-rows tr:has-text('c@example.com')")
                assert "c@example.com" in cli(home, config, "accounts", "list").stdout

                # A device-code login: the page shows the link and the code, then the result.
                page.click("#device-login")
                page.wait_for_selector("#device-result .device-code")
                assert "/codex/device" in page.locator("#device-result a").inner_text()
                page.wait_for_selector("#device-result:has-text('Added d@example.com')")
                page.wait_for_selector("#account-rows tr:has-text('d@example.com')")

                # A rotation shows on the network timeline with its reason.
                rotated = api.post("/api/clients/rotate").json()
                assert rotated["rotated"]
                page.wait_for_selector("#timeline li:has(.reason:text-is('admin'))")
                timeline = page.locator("#timeline li").first.inner_text()
                assert f"→ {rotated['generation']}" in timeline

                # Charts render with data (history refetches at most every 10 s).
                page.wait_for_function(
                    """() => [...document.querySelectorAll('[data-chart]')].every(
                    el => el.querySelector('canvas') && Number(el.dataset.rendered) > 0)""",)
                assert page.locator("[data-chart] canvas").count() == 4
                rendered = page.get_attribute('[data-chart="hourly:requests"]', "data-rendered")
                assert int(rendered or 0) >= seeded_hourly + 1  # the seeded rows and the probe
                tiles = page.locator("[data-tile=requests]").inner_text()
                assert int(tiles) >= seeded_hourly + 1
                page.screenshot(path=str(SHOTS / "laptop-full.png"), full_page=True)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(SHOTS / "laptop.png"))  # the README's docs/dashboard.png

                # A narrow window: nothing overflows the page sideways.
                page.set_viewport_size({"width": 420, "height": 900})
                page.wait_for_timeout(500)
                assert page.evaluate("document.documentElement.scrollWidth") <= 420
                page.screenshot(path=str(SHOTS / "narrow.png"), full_page=True)
                assert problems == [], problems

                # Without JavaScript the tables are still there, rendered by the server.
                plain = browser.new_context(java_script_enabled=False).new_page()
                plain.goto(url + "/dashboard?status=ok")
                assert plain.locator("#account-rows tr").count() == 4
                assert "dash-probe-model" in plain.locator("#request-rows").inner_text()
                assert plain.locator("#timeline li .reason").first.inner_text() == "admin"
                plain.screenshot(path=str(SHOTS / "no-js.png"), full_page=True)
            finally:
                browser.close()
                api.close()

    with trio.fail_after(300):
        with ServerProcess(home, config=config) as server:
            url = await trio.to_thread.run_sync(server.wait_listening)
            await trio.to_thread.run_sync(in_browser, url)
            assert server.terminate() == 0


@needs_browser
async def test_the_page_asks_for_a_key_and_keeps_it_out_of_the_url(tmp_path: Path,
                                                                  fake_upstream) -> None:
    home = tmp_path / "home"
    await seed(home, fake_upstream, ("k@example.com", "acct-k", "plus"))
    config = write_config(tmp_path, fake_upstream.port, f'[auth]\napi_keys = ["{KEY}"]\n')

    def in_browser(url: str) -> None:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page()
                page.set_default_timeout(WAIT_MS)
                problems = watch_console(page)
                page.goto(url + "/")
                page.wait_for_selector("#key-form:not([hidden])")
                assert "k@example.com" not in page.content()  # no data before the key
                page.fill("#api-key", KEY)
                page.press("#api-key", "Enter")
                page.wait_for_selector("#account-rows tr:has-text('k@example.com')")
                assert KEY not in page.url
                assert page.evaluate("sessionStorage.getItem('codex-lb-trio.api-key')") == KEY
                assert page.evaluate("localStorage.length") == 0
                assert problems == [], problems
                # The data routes stay behind the key; the page shell does not need it.
                assert httpx.get(url + "/api/dashboard", trust_env=False).status_code == 401
                assert httpx.get(url + "/dashboard", trust_env=False).status_code == 200
            finally:
                browser.close()

    with trio.fail_after(180):
        with ServerProcess(home, config=config) as server:
            url = await trio.to_thread.run_sync(server.wait_listening)
            await trio.to_thread.run_sync(in_browser, url)
            assert server.terminate() == 0


# --- the page's routes, in-process ------------------------------------------------------------


async def test_device_login_from_the_page_routes(tmp_path: Path, fake_upstream, chaos) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=1) as stack:
            fake_upstream.next_login = fake_upstream.add_account(
                email="d@example.com", chatgpt_account_id="acct-d")
            fake_upstream.device_auto_approve_after = 1
            async with stack.http() as client:
                started = (await client.post("/api/accounts/login/device")).json()
                assert started["state"] == "pending"
                assert started["user_code"]
                assert started["verification_url"].endswith("/codex/device")
                state = started
                while state["state"] == "pending":
                    await trio.sleep(0.2)
                    state = (await client.get(f"/api/accounts/login/device/{started['id']}")).json()
                assert state["state"] == "done", state
                assert state["account"]["email"] == "d@example.com"
                listed = (await client.get("/api/accounts")).json()["accounts"]
                emails = [a["email"] for a in listed]
                assert "d@example.com" in emails
                missing = await client.get("/api/accounts/login/device/dl_nope")
                assert missing.status_code == 404
                assert missing.json()["error"]["code"] == "not_found"


async def test_page_escapes_what_it_renders(tmp_path: Path, fake_upstream, chaos) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path, fake_upstream, chaos, accounts=1) as stack:
            async with stack.http() as client:
                page = await client.get("/dashboard", params={"model": '"><script>x()</script>'})
                assert page.status_code == 200
                assert "<script>x()" not in page.text
                assert "&lt;script&gt;x()" in page.text
                assert "script-src 'self'" in page.headers["content-security-policy"]
                assert "a@example.com" in page.text  # rendered without JavaScript
                script = await client.get("/dashboard/static/dashboard.js")
                assert script.status_code == 200
                assert "uPlot" in script.text
                vendored = await client.get("/dashboard/static/uPlot-1.6.32.iife.min.js")
                assert vendored.status_code == 200
                assert len(vendored.content) > 10_000
                escape = await client.get("/dashboard/static/../request_log.py")
                assert escape.status_code == 404
