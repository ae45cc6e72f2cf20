"""auth.json import and the two login flows, against the fake auth server and real SQLite."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from actors.accounts import (
    Account,
    AccountStatus,
    InMemoryAccountStore,
    TokenSet,
    Usage,
    UsageWindow,
)
from service.login import (
    AUTHORIZE_SCOPE,
    CLIENT_ID,
    ImportResult,
    LoginError,
    account_from_token_response,
    format_accounts_table,
    import_auth_data,
    import_auth_file,
    login_browser,
    login_device,
    parse_auth_json,
)
from service.store import SQLiteAccountStore, open_store
from tests.fakes.faults import ANY_ACCOUNT, Fault
from tests.fakes.jwt import mint_jwt
from tests.fakes.upstream import FakeAccount, FakeUpstream, open_fake_upstream, pkce_challenge

NOW = 1_800_000_000.0
AUTH_NS = "https://api.openai.com/auth"


def secrets_of(*accounts: FakeAccount) -> list[str]:
    """Every token an account has ever had: none may show up in a message."""
    return [
        token
        for account in accounts
        for session in account.sessions
        for token in (session.access_token, session.refresh_token, session.id_token)
    ]


def assert_one_clean_line(message: str, secrets: list[str]) -> None:
    assert message
    assert "\n" not in message
    for secret in secrets:
        assert secret not in message
        # No fragment of a JWT either (its payload is the middle part).
        for part in secret.split("."):
            if len(part) > 12:
                assert part not in message


class Announcements:
    """An ``announce`` callback that records what a user would have seen."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.said = trio.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.said.set()

    @property
    def text(self) -> str:
        return "\n".join(self.messages)

    def url(self, containing: str) -> str:
        for url in re.findall(r"https?://\S+", self.text):
            if containing in url:
                return str(url)
        raise AssertionError(f"no URL with {containing!r} in {self.text!r}")


@asynccontextmanager
async def fake_and_store(tmp_path: Path) -> AsyncIterator[tuple[FakeUpstream, SQLiteAccountStore]]:
    async with open_fake_upstream() as fake, open_store(tmp_path / "home") as store:
        yield fake, store


def write_auth_file(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# --- parse_auth_json ----------------------------------------------------------------------


async def test_parse_auth_json_reads_identity_and_expiry() -> None:
    fake = FakeUpstream()
    acct = fake.add_account(
        email="ann@example.com",
        chatgpt_account_id="acct-ann",
        plan="pro",
        chatgpt_user_id="user-ann",
    )
    data = fake.auth_json(acct)
    data["last_refresh"] = "2027-01-15T08:00:00.123456789Z"
    account = parse_auth_json(data, now=NOW)
    assert account.email == "ann@example.com"
    assert account.chatgpt_account_id == "acct-ann"
    assert account.chatgpt_user_id == "user-ann"
    assert account.plan == "pro"
    assert account.status is AccountStatus.ACTIVE
    assert account.tokens == TokenSet(
        access_token=acct.access_token, refresh_token=acct.refresh_token, id_token=acct.id_token
    )
    assert account.access_expires_at == acct.latest.access_expires_at
    assert account.last_refresh == pytest.approx(1_800_000_000.123456, abs=1e-3)
    assert account.created_at == NOW
    assert account.id.startswith("acc_")
    assert acct.refresh_token not in repr(account)


async def test_parse_auth_json_falls_back_to_now_and_to_the_file_account_id() -> None:
    id_token = mint_jwt({"email": "bo@example.com"})  # no auth namespace claim
    data = {
        "tokens": {
            "id_token": id_token,
            "access_token": "opaque-access",
            "refresh_token": "rt_x",
            "account_id": "acct-from-file",
        },
        "last_refresh": "not a time",
    }
    account = parse_auth_json(data, now=NOW)
    assert account.chatgpt_account_id == "acct-from-file"
    assert account.email == "bo@example.com"
    assert account.plan == "unknown"
    assert account.last_refresh == NOW
    assert account.access_expires_at is None


def _good_tokens() -> dict[str, Any]:
    claims = {"email": "c@example.com", AUTH_NS: {"chatgpt_account_id": "acct-c"}}
    return {
        "id_token": mint_jwt(claims),
        "access_token": mint_jwt({"exp": NOW + 3600, "secretish": "ACCESS-VALUE-1234567890"}),
        "refresh_token": "rt_REFRESH-VALUE-1234567890",
        "account_id": "acct-c",
    }


def _without(key: str) -> dict[str, Any]:
    tokens = _good_tokens()
    del tokens[key]
    return {"OPENAI_API_KEY": None, "tokens": tokens}


def _with(**changes: Any) -> dict[str, Any]:
    return {"OPENAI_API_KEY": None, "tokens": {**_good_tokens(), **changes}}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(["not", "an", "object"], "not a JSON object", id="list"),
        pytest.param("auth", "not a JSON object", id="string"),
        pytest.param({"OPENAI_API_KEY": None}, 'no "tokens" object', id="no-tokens"),
        pytest.param({"OPENAI_API_KEY": "sk-KEY-VALUE-123456"}, "holds an API key", id="api-key"),
        pytest.param(_without("refresh_token"), "no refresh_token", id="no-refresh"),
        pytest.param(_with(refresh_token=""), "no refresh_token", id="empty-refresh"),
        pytest.param(_with(refresh_token=None), "no refresh_token", id="null-refresh"),
        pytest.param(_without("access_token"), "no access_token", id="no-access"),
        pytest.param(_without("id_token"), "no id_token", id="no-id-token"),
        pytest.param(
            _with(id_token=mint_jwt({"email": "c@example.com"}), account_id=None),
            "carries no ChatGPT account id",
            id="id-token-without-account",
        ),
        pytest.param(_with(id_token="garbage"), "not a readable JWT", id="id-token-garbage"),
    ],
)
async def test_parse_auth_json_rejects_unusable_data(data: Any, expected: str) -> None:
    with pytest.raises(LoginError) as info:
        parse_auth_json(data, now=NOW)
    message = str(info.value)
    assert expected in message
    tokens = _good_tokens()
    assert_one_clean_line(
        message,
        [tokens["access_token"], tokens["refresh_token"], tokens["id_token"], "sk-KEY-VALUE"],
    )


async def test_account_from_token_response_needs_all_three_tokens() -> None:
    tokens = _good_tokens()
    del tokens["account_id"]
    account = account_from_token_response(tokens, now=NOW)
    assert account.chatgpt_account_id == "acct-c"
    assert account.last_refresh == NOW
    assert account.access_expires_at == NOW + 3600

    opaque = {**tokens, "access_token": "opaque", "expires_in": 120}
    assert account_from_token_response(opaque, now=NOW).access_expires_at == NOW + 120

    for name in ("access_token", "refresh_token", "id_token"):
        partial = {k: v for k, v in tokens.items() if k != name}
        with pytest.raises(LoginError, match=f"has no {name}") as info:
            account_from_token_response(partial, now=NOW)
        assert_one_clean_line(str(info.value), list(tokens.values()))


# --- importing auth.json ------------------------------------------------------------------


async def test_import_of_a_missing_file_says_run_codex_login(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "auth.json"
    async with open_store(tmp_path / "home") as store:
        with pytest.raises(LoginError) as info:
            await import_auth_file(store, missing)
        assert str(info.value) == (
            f"auth file {missing} not found: run `codex login` first or pass a path"
        )
        assert await store.list_accounts() == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param('{"tokens": {"refresh_token": "rt_SECRET', "is not valid JSON", id="cut"),
        pytest.param("", "is not valid JSON", id="empty"),
        pytest.param(b'{"a": "\xc3\x28"}', "not UTF-8", id="binary"),
        pytest.param(json.dumps(_without("refresh_token")), "no refresh_token", id="no-refresh"),
        pytest.param("[]", "not a JSON object", id="array"),
    ],
)
async def test_import_of_a_bad_file_writes_nothing(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    path = tmp_path / "auth.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    async with open_store(tmp_path / "home") as store:
        with pytest.raises(LoginError) as info:
            await import_auth_file(store, path)
        message = str(info.value)
        assert message.startswith(f"auth file {path}")
        assert expected in message
        assert_one_clean_line(message, ["rt_SECRET", *_good_tokens().values()])
        assert await store.list_accounts() == []
    async with open_store(tmp_path / "home") as reopened:
        assert await reopened.list_accounts() == []


async def test_import_then_reimport_updates_the_same_account(tmp_path: Path) -> None:
    fake = FakeUpstream()
    acct = fake.add_account(email="dee@example.com", chatgpt_account_id="acct-dee", plan="plus")
    path = write_auth_file(tmp_path / "auth.json", fake.auth_json(acct))
    async with open_store(tmp_path / "home") as store:
        first = await import_auth_file(store, path)
        assert first.created
        assert first.account.email == "dee@example.com"
        assert first.account.tokens.refresh_token == acct.refresh_token
        assert str(path) in first.warning
        assert "refresh_token_reused" in first.warning
        assert "accounts login" in first.warning
        assert_one_clean_line(first.warning, secrets_of(acct))

        # The pool gave up on it; Codex CLI refreshed meanwhile; the user imports again.
        await store.set_status(first.account.id, AccountStatus.REAUTH_REQUIRED, "reused")
        fake.rotate_tokens("acct-dee")
        write_auth_file(path, fake.auth_json(acct))
        second = await import_auth_file(store, path)
        assert not second.created
        assert second.account.id == first.account.id
        assert second.account.tokens.refresh_token == acct.refresh_token
        assert second.account.tokens != first.account.tokens
        assert second.account.status is AccountStatus.ACTIVE
        assert len(await store.list_accounts()) == 1


async def test_import_auth_data_for_the_admin_api() -> None:
    fake = FakeUpstream()
    acct = fake.add_account(email="eve@example.com", chatgpt_account_id="acct-eve")
    store = InMemoryAccountStore()
    result = await import_auth_data(store, fake.auth_json(acct))
    assert isinstance(result, ImportResult)
    assert result.created
    assert "refresh_token_reused" in result.warning
    assert [a.email for a in await store.list_accounts()] == ["eve@example.com"]
    with pytest.raises(LoginError, match="no refresh_token"):
        await import_auth_data(store, {"tokens": {"access_token": "x", "id_token": "y"}})
    assert len(await store.list_accounts()) == 1


# --- browser login (PKCE) against the fake ------------------------------------------------


async def _browser_login(
    fake: FakeUpstream,
    store: SQLiteAccountStore,
    play_browser: Callable[[str, httpx.AsyncClient], Any],
    *,
    port: int = 0,
    login_timeout: float = 30,
) -> tuple[ImportResult | LoginError, Announcements, Any]:
    """Run login_browser while ``play_browser(authorize_url, browser)`` acts the user."""
    said = Announcements()
    outcome: list[ImportResult | LoginError] = []
    seen: list[Any] = []
    async with httpx.AsyncClient() as client, httpx.AsyncClient() as browser:

        async def login() -> None:
            try:
                outcome.append(
                    await login_browser(
                        store,
                        auth_base_url=fake.auth_base_url,
                        client=client,
                        port=port,
                        announce=said,
                        timeout=login_timeout,
                    )
                )
            except LoginError as exc:
                outcome.append(exc)
            said.said.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(login)
            await said.said.wait()
            if not outcome:
                seen.append(await play_browser(said.url("/oauth/authorize"), browser))
    return outcome[0], said, seen[0] if seen else None


async def follow_login(url: str, browser: httpx.AsyncClient) -> httpx.Response:
    """What a browser does: open the authorize URL, follow its redirect to the callback."""
    authorize = await browser.get(url, follow_redirects=False)
    assert authorize.status_code == 302, authorize.text
    return await browser.get(authorize.headers["location"], follow_redirects=False)


async def test_browser_login_adds_the_account(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            fake.add_account(email="other@example.com", chatgpt_account_id="acct-other")
            acct = fake.add_account(
                email="fay@example.com", chatgpt_account_id="acct-fay", plan="pro"
            )
            fake.next_login = acct
            result, said, page = await _browser_login(fake, store, follow_login)

            assert isinstance(result, ImportResult), result
            assert result.created
            assert result.warning == ""
            assert result.account.email == "fay@example.com"
            assert result.account.chatgpt_account_id == "acct-fay"
            assert result.account.plan == "pro"
            # A login starts a token family of its own: the fake's newest session.
            assert len(acct.sessions) == 2
            assert result.account.tokens.refresh_token == acct.refresh_token
            assert result.account.access_expires_at == acct.latest.access_expires_at
            assert await store.list_accounts() == [result.account]

            assert page.status_code == 200
            assert "login complete, you can close this tab" in page.text.lower()

            (authorize,) = fake.requests_for("authorize")
            args = authorize.body
            redirect_uri = args["redirect_uri"]
            assert re.fullmatch(r"http://localhost:\d+/auth/callback", redirect_uri)
            assert args["response_type"] == "code"
            assert args["client_id"] == CLIENT_ID
            assert args["scope"] == AUTHORIZE_SCOPE == "openid profile email offline_access"
            assert args["code_challenge_method"] == "S256"
            assert args["id_token_add_organizations"] == "true"
            assert args["codex_cli_simplified_flow"] == "true"
            assert args["state"]
            assert "%20" in said.url("/oauth/authorize")  # scope spaces as %20, as Codex CLI

            (exchange,) = fake.requests_for("token")
            assert exchange.headers["content-type"].startswith("application/x-www-form-urlencoded")
            form = exchange.body
            assert form["grant_type"] == "authorization_code"
            assert form["client_id"] == CLIENT_ID
            assert form["redirect_uri"] == redirect_uri
            assert pkce_challenge(form["code_verifier"]) == args["code_challenge"]

            for text in (said.text, page.text):
                for secret in [*secrets_of(acct), form["code_verifier"], form["code"]]:
                    assert secret not in text


async def test_browser_login_of_a_known_account_updates_it(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            acct = fake.add_account(email="gus@example.com", chatgpt_account_id="acct-gus")
            imported = await import_auth_data(store, fake.auth_json(acct))
            await store.set_status(imported.account.id, AccountStatus.REAUTH_REQUIRED, "x")
            result, _, _ = await _browser_login(fake, store, follow_login)
            assert isinstance(result, ImportResult)
            assert not result.created
            assert result.account.id == imported.account.id
            assert result.account.status is AccountStatus.ACTIVE
            assert result.account.tokens.refresh_token == acct.refresh_token
            assert result.account.tokens != imported.account.tokens


async def test_browser_login_on_a_taken_port_points_to_device_login(tmp_path: Path) -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with taken, httpx.AsyncClient() as client:
        port = taken.socket.getsockname()[1]
        said = Announcements()
        with pytest.raises(LoginError) as info:
            await login_browser(
                InMemoryAccountStore(),
                auth_base_url="http://127.0.0.1:9",
                client=client,
                port=port,
                announce=said,
            )
    assert str(info.value) == (
        f"port {port} is in use (another login or Codex CLI?); "
        "try `codex-lb-trio accounts login --device`"
    )
    assert said.messages == []


def _callback_url(authorize_url: str, **params: str) -> str:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize_url).query)
    redirect_uri = query["redirect_uri"][0]
    return f"{redirect_uri}?{urllib.parse.urlencode(params)}"


async def test_browser_login_ignores_a_foreign_state_and_keeps_waiting(tmp_path: Path) -> None:
    # Anything local can reach the callback port: a wrong state (a stale tab, a hostile page,
    # even one claiming an error) is answered 400 and the real callback still completes.
    forged_pages: list[httpx.Response] = []

    async def forged_then_real(url: str, browser: httpx.AsyncClient) -> httpx.Response:
        for params in ({"code": "ac_forged", "state": "not-the-state"},
                       {"error": "access_denied", "state": "not-the-state"},
                       {"code": "ac_forged"}):
            forged_pages.append(await browser.get(_callback_url(url, **params)))
        return await follow_login(url, browser)

    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            fake.add_account()
            result, _, page = await _browser_login(fake, store, forged_then_real)
            assert [p.status_code for p in forged_pages] == [400, 400, 400]
            assert all("Wrong login state" in p.text for p in forged_pages)
            assert all("ac_forged" not in p.text for p in forged_pages)
            assert isinstance(result, ImportResult), result
            assert page.status_code == 200
            (exchange,) = fake.requests_for("token")  # only the real code was exchanged
            assert exchange.body["code"] != "ac_forged"
            assert len(await store.list_accounts()) == 1


async def test_browser_login_reports_a_refusal_from_the_auth_server(tmp_path: Path) -> None:
    async def refused(url: str, browser: httpx.AsyncClient) -> httpx.Response:
        state = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["state"][0]
        callback = _callback_url(
            url, error="access_denied", error_description="The user said\nno", state=state
        )
        return await browser.get(callback)

    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            result, _, page = await _browser_login(fake, store, refused)
            assert isinstance(result, LoginError)
            assert str(result) == (
                "the auth server refused the login: access_denied (The user said no)"
            )
            assert page.status_code == 400
            assert await store.list_accounts() == []


async def test_browser_login_reports_a_token_endpoint_error(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            acct = fake.add_account()
            fake.fault(ANY_ACCOUNT, "token", Fault.token_error("invalid_grant", 400, "oauth"))
            result, said, page = await _browser_login(fake, store, follow_login)
            assert isinstance(result, LoginError)
            assert str(result) == (
                "the auth server refused the authorization code: invalid_grant (HTTP 400)"
            )
            assert page.status_code == 400
            assert await store.list_accounts() == []
            assert_one_clean_line(str(result), secrets_of(acct))


async def test_browser_login_rejects_a_token_answer_without_tokens(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            fake.add_account()
            fake.fault(ANY_ACCOUNT, "token", Fault.invalid_payload())
            result, _, _ = await _browser_login(fake, store, follow_login)
            assert isinstance(result, LoginError)
            assert "token answer has no access_token" in str(result)
            assert await store.list_accounts() == []


async def test_browser_login_ignores_stray_requests_and_times_out(tmp_path: Path) -> None:
    async def wander(url: str, browser: httpx.AsyncClient) -> list[int]:
        base = _callback_url(url).split("/auth/callback")[0]
        statuses = [(await browser.get(f"{base}/favicon.ico")).status_code]
        # An idle preconnect that never sends a request must not block anything.
        port = int(urllib.parse.urlsplit(base).port or 0)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        async with idle:
            statuses.append((await browser.get(f"{base}/")).status_code)
            # Hold the idle connection until the login gives up and its listener closes
            # (a condition, not a sleep: a loaded machine may take longer than the timeout).
            while True:
                try:
                    await browser.get(f"{base}/", headers={"connection": "close"})
                except httpx.TransportError:
                    break
                await trio.sleep(0.05)
        return statuses

    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store):
            fake.add_account()
            # 2 s for the two stray requests before the timeout (they are answered first).
            result, _, statuses = await _browser_login(fake, store, wander, login_timeout=2.0)
            assert statuses == [404, 404]
            assert isinstance(result, LoginError)
            assert str(result).startswith("login timed out after 2 s: no browser callback")
            assert await store.list_accounts() == []


# --- device-code login ----------------------------------------------------------------------


async def test_device_login_adds_the_account(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fake_and_store(tmp_path) as (fake, store), httpx.AsyncClient() as client:
            acct = fake.add_account(
                email="hal@example.com", chatgpt_account_id="acct-hal", plan="team"
            )
            fake.device_auto_approve_after = 3
            fake.device_poll_interval = 0.01  # type: ignore[assignment]
            said = Announcements()
            result = await login_device(
                store, auth_base_url=fake.auth_base_url, client=client, announce=said
            )
            assert result.created
            assert result.warning == ""
            assert result.account.email == "hal@example.com"
            assert result.account.plan == "team"
            assert result.account.tokens.refresh_token == acct.refresh_token
            assert await store.list_accounts() == [result.account]

            (usercode,) = fake.requests_for("device_usercode")
            assert usercode.body == {"client_id": CLIENT_ID}
            polls = fake.requests_for("device_token")
            assert len(polls) == 4  # three pending (403), then the grant
            user_code = polls[0].body["user_code"]
            assert f"{fake.auth_base_url}/codex/device" in said.text
            assert user_code in said.text

            (exchange,) = fake.requests_for("token")
            assert exchange.headers["content-type"].startswith("application/x-www-form-urlencoded")
            assert exchange.body["grant_type"] == "authorization_code"
            assert exchange.body["redirect_uri"] == f"{fake.auth_base_url}/deviceauth/callback"
            for secret in [
                *secrets_of(acct),
                exchange.body["code"],
                exchange.body["code_verifier"],
                polls[0].body["device_auth_id"],
            ]:
                assert secret not in said.text


def _token_answer() -> dict[str, Any]:
    claims = {"email": "ivy@example.com", AUTH_NS: {"chatgpt_account_id": "acct-ivy"}}
    return {
        "access_token": mint_jwt({"exp": 2_000_000_000}),
        "refresh_token": "rt_ivy",
        "id_token": mint_jwt(claims),
    }


def mock_auth(
    polls: list[tuple[int, dict[str, Any]]], *, interval: Any = 1
) -> tuple[httpx.AsyncClient, list[tuple[float, str]]]:
    """An auth server in memory: the device poll answers come from ``polls`` in turn."""
    calls: list[tuple[float, str]] = []
    answers = iter(polls)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((trio.current_time(), request.url.path))
        if request.url.path == "/api/accounts/deviceauth/usercode":
            return httpx.Response(
                200,
                json={
                    "device_auth_id": "da_1",
                    "usercode": "ABCD-1234",
                    "interval": interval,
                    "expires_in": 900,
                },
            )
        if request.url.path == "/api/accounts/deviceauth/token":
            status, body = next(answers, (403, {"error": "authorization_pending"}))
            return httpx.Response(status, json=body)
        if request.url.path == "/oauth/token":
            form = urllib.parse.parse_qs(request.content.decode())
            assert form["code"] == ["ac_1"]
            assert form["code_verifier"] == ["cv_1"]
            return httpx.Response(200, json=_token_answer())
        return httpx.Response(404)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), calls


async def test_device_login_slows_down_when_told(autojump_clock: trio.testing.MockClock) -> None:
    client, calls = mock_auth(
        [
            (400, {"error": "slow_down"}),
            (400, {"error": {"code": "authorization_pending"}}),
            (404, {}),
            (200, {"authorization_code": "ac_1", "code_verifier": "cv_1"}),
        ],
        interval="2",  # the real server has sent numbers as strings
    )
    start = trio.current_time()
    async with client:
        said = Announcements()
        result = await login_device(
            InMemoryAccountStore(), auth_base_url="http://auth.test", client=client, announce=said
        )
    assert result.account.email == "ivy@example.com"
    assert "ABCD-1234" in said.text  # the "usercode" spelling is accepted too
    poll_times = [t - start for t, path in calls if path.endswith("/deviceauth/token")]
    assert poll_times == [2, 2 + 7, 2 + 7 + 7, 2 + 7 + 7 + 7]


async def test_device_login_stops_on_a_final_error(autojump_clock: trio.testing.MockClock) -> None:
    client, _ = mock_auth([(400, {"error": "expired_token", "error_description": "x"})])
    store = InMemoryAccountStore()
    async with client:
        with pytest.raises(LoginError) as info:
            await login_device(
                store, auth_base_url="http://auth.test", client=client, announce=Announcements()
            )
    assert str(info.value) == "device login failed: expired_token (HTTP 400)"
    assert await store.list_accounts() == []


async def test_device_login_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, calls = mock_auth([])
    start = trio.current_time()
    async with client:
        with pytest.raises(LoginError, match="device login timed out") as info:
            await login_device(
                InMemoryAccountStore(),
                auth_base_url="http://auth.test",
                client=client,
                announce=Announcements(),
                timeout=60,
            )
    assert "\n" not in str(info.value)
    assert trio.current_time() - start == pytest.approx(60)
    assert len(calls) > 10


async def test_device_login_against_an_unreachable_server_is_one_line() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(LoginError) as info:
            await login_device(
                InMemoryAccountStore(),
                auth_base_url="http://127.0.0.1:9",
                client=client,
                announce=Announcements(),
            )
    message = str(info.value)
    assert message.startswith("the device code request failed: cannot reach ")
    assert "\n" not in message


# --- accounts list ------------------------------------------------------------------------


def _listed(**changes: Any) -> Account:
    fields: dict[str, Any] = {
        "id": "acc_0001",
        "email": "jo@example.com",
        "chatgpt_account_id": "acct-jo",
        "plan": "plus",
        "tokens": TokenSet(
            access_token="ACCESS-SHOULD-NOT-SHOW",
            refresh_token="REFRESH-SHOULD-NOT-SHOW",
            id_token="ID-SHOULD-NOT-SHOW",
        ),
        "access_expires_at": NOW + 52 * 60 + 10,
    }
    fields.update(changes)
    return Account(**fields)


def test_accounts_table() -> None:
    accounts = [
        _listed(
            usage=Usage(
                primary=UsageWindow(used_percent=12.4), secondary=UsageWindow(used_percent=40.0)
            )
        ),
        _listed(
            id="acc_0002",
            email="kim@example.com",
            plan="pro",
            access_expires_at=NOW - 5,
            cooldown_until=NOW + 600,
        ),
        _listed(
            id="acc_0003",
            email="lee@example.com",
            status=AccountStatus.REAUTH_REQUIRED,
            access_expires_at=NOW + 3 * 86400 + 7200,
        ),
    ]
    table = format_accounts_table(accounts, NOW)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == [
        "ID",
        "EMAIL",
        "PLAN",
        "STATUS",
        "TOKEN",
        "EXPIRES",
        "USAGE",
        "5H",
        "/",
        "WEEK",
    ]
    assert lines[1].split() == [
        "acc_0001",
        "jo@example.com",
        "plus",
        "active",
        "in",
        "52m",
        "12%",
        "/",
        "40%",
    ]
    assert lines[2].split() == [
        "acc_0002",
        "kim@example.com",
        "pro",
        "cooling_down",
        "(10m)",
        "expired",
        "-",
        "/",
        "-",
    ]
    assert lines[3].split() == [
        "acc_0003",
        "lee@example.com",
        "plus",
        "reauth_required",
        "in",
        "3d",
        "2h",
        "-",
        "/",
        "-",
    ]
    # Columns line up.
    assert lines[1].index("plus") == lines[2].index("pro")
    assert "SHOULD-NOT-SHOW" not in table


def test_accounts_table_when_empty() -> None:
    assert "accounts import" in format_accounts_table([], NOW)
