"""Adding accounts to the pool: import Codex CLI's auth.json, or log in (browser or device code).

Each way ends in ``store.upsert``: an account already in the pool (same ChatGPT account id
and email) gets the new tokens and keeps its id. Wire facts are in PROTOCOL.md ("Tokens").

Every failure is a ``LoginError`` whose message is one line a user can act on. No message,
log line or page ever carries a token, code or verifier.

Errors::

    LoginError     the login or import failed; nothing was written
    StoreError     (from service.store) the store could not take the account
"""

from __future__ import annotations

import base64
import errno
import hashlib
import html
import json
import math
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

from actors.accounts import (
    Account,
    AccountStore,
    TokenSet,
    identity_from_id_token,
    jwt_claims,
    new_account_id,
)

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTHORIZE_SCOPE = "openid profile email offline_access"
DEFAULT_LOGIN_PORT = 1455  # fixed by the registered OAuth client's redirect URI
CALLBACK_PATH = "/auth/callback"
# How long one browser connection to the callback listener may take to send its request.
CALLBACK_REQUEST_TIMEOUT = 30.0
SLOW_DOWN_SECONDS = 5.0
# Opening a browser can block (it may start one); past this the user has the printed URL.
BROWSER_OPEN_TIMEOUT = 10.0
_MAX_DETAIL = 160


class LoginError(Exception):
    """A login or import failed; the message is one line and names no secret."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """The account as stored, whether it is new to the pool, and a warning to show (or "")."""

    account: Account
    created: bool
    warning: str = ""


def default_auth_file() -> Path:
    """Codex CLI's auth.json: ``$CODEX_HOME/auth.json``, else ``~/.codex/auth.json``."""
    codex_home = os.environ.get("CODEX_HOME") or "~/.codex"
    return Path(codex_home).expanduser() / "auth.json"


def shared_token_warning(path: Path | None = None) -> str:
    """What to tell a user after importing tokens that Codex CLI also holds."""
    where = f"in {path}" if path is not None else "in the auth.json these tokens came from"
    return (
        f"Codex CLI's own copy of this login {where} now shares its refresh token with the "
        "pool: whichever refreshes first invalidates the other's (refresh_token_reused). "
        "Give Codex CLI a login of its own: move that auth.json aside and run `codex login` "
        "again (not `codex logout`, which revokes the shared token upstream), or add "
        "accounts with `codex-lb-trio accounts login` instead of importing."
    )


# --- checks at the door ----------------------------------------------------------------------
# Whatever an import or a login brings is checked before it is stored: a value that could break
# an upstream header (non-latin-1, CR/LF), a JSON document (NaN, infinity) or a terminal
# (escape codes) is refused with a LoginError naming the field.

_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# An access token goes into "Authorization: Bearer …": RFC 6750's b64token (a JWT is one).
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_REFRESH_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII: no space, CR, LF or controls
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:|@-]*")
_PLAN = re.compile(r"[A-Za-z0-9_.-]+")
MAX_TOKEN_CHARS = 64 * 1024
MAX_ID_CHARS = 128
MAX_EMAIL_CHARS = 254
# Timestamps must be real dates: after 2000-01-01 and before 2200-01-01.
MIN_EPOCH, MAX_EPOCH = 946_684_800.0, 7_258_118_400.0


def _field_error(field: str, expected: str) -> LoginError:
    return LoginError(f"{field} is not usable: expected {expected}")


def check_jwt(field: str, value: str) -> None:
    """An id or access token: three base64url segments, of a sane length."""
    if len(value) > MAX_TOKEN_CHARS or _JWT.fullmatch(value) is None:
        raise LoginError(f"the {field} is not a readable JWT: expected three base64url "
                         f"segments, at most {MAX_TOKEN_CHARS} characters")


def check_access_token(value: str) -> None:
    if len(value) > MAX_TOKEN_CHARS or _BEARER_TOKEN.fullmatch(value) is None:
        raise _field_error("access_token", "a bearer token (a JWT: base64url segments joined by "
                                           f"dots), at most {MAX_TOKEN_CHARS} characters")


def check_refresh_token(value: str) -> None:
    if len(value) > MAX_TOKEN_CHARS or _REFRESH_TOKEN.fullmatch(value) is None:
        raise _field_error("refresh_token", "printable ASCII without spaces or line breaks, "
                                            f"at most {MAX_TOKEN_CHARS} characters")


def check_identifier(field: str, value: str, *, optional: bool = False) -> None:
    if optional and not value:
        return
    if len(value) > MAX_ID_CHARS or _ACCOUNT_ID.fullmatch(value) is None:
        raise _field_error(field, f"letters, digits and . _ : | @ - only, at most {MAX_ID_CHARS} "
                                  "characters")


def check_email(value: str) -> None:
    if not value:
        return
    if (len(value) > MAX_EMAIL_CHARS or not value.isprintable() or "@" not in value
            or any(c.isspace() for c in value)):
        raise _field_error("email", f"an address like name@example.com without spaces or "
                                    f"control characters, at most {MAX_EMAIL_CHARS} characters")


def check_timestamp(field: str, value: Any) -> float:
    """A finite epoch time between 2000 and 2200 (a JSON number), as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _field_error(field, "a number of seconds since 1970")
    if isinstance(value, int) and not MIN_EPOCH <= value <= MAX_EPOCH:
        raise _field_error(field, "a date between the years 2000 and 2200")
    number = float(value)
    if not math.isfinite(number) or not MIN_EPOCH <= number <= MAX_EPOCH:
        raise _field_error(field, "a date between the years 2000 and 2200")
    return number


def check_account(account: Account) -> None:
    """Everything of a new account that will reach a header, a JSON answer or a terminal."""
    check_jwt("id_token", account.tokens.id_token)
    check_access_token(account.tokens.access_token)
    check_refresh_token(account.tokens.refresh_token)
    check_identifier("chatgpt_account_id", account.chatgpt_account_id)
    check_identifier("chatgpt_user_id", account.chatgpt_user_id, optional=True)
    check_email(account.email)
    if len(account.plan) > 64 or _PLAN.fullmatch(account.plan) is None:
        raise _field_error("chatgpt_plan_type", "a plan name like plus or pro")
    for field, value in (("access token exp", account.access_expires_at),
                         ("last_refresh", account.last_refresh)):
        if value is not None:
            check_timestamp(field, value)


# --- tokens → Account ---------------------------------------------------------------------


def _one_line(text: str) -> str:
    """Server-supplied detail squeezed into one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _MAX_DETAIL else flat[: _MAX_DETAIL - 1] + "…"


def _account_from_tokens(
    tokens: TokenSet,
    *,
    fallback_account_id: str,
    last_refresh: float,
    now: float,
    expires_in: Any = None,
) -> Account:
    check_jwt("id_token", tokens.id_token)
    check_access_token(tokens.access_token)
    check_refresh_token(tokens.refresh_token)
    if not jwt_claims(tokens.id_token):
        raise LoginError("the id_token is not a readable JWT")
    identity = identity_from_id_token(tokens.id_token, fallback_account_id=fallback_account_id)
    if not identity.chatgpt_account_id:
        raise LoginError(
            "the id_token carries no ChatGPT account id (chatgpt_account_id): "
            "log in with a ChatGPT account"
        )
    exp = jwt_claims(tokens.access_token).get("exp")
    expires_at = check_timestamp("access token exp", exp) if exp is not None else None
    if (
        expires_at is None
        and isinstance(expires_in, int | float)
        and not isinstance(expires_in, bool)
    ):
        if not 0 < expires_in <= 10 * 365 * 86400:
            raise _field_error("expires_in", "a number of seconds up to ten years")
        expires_at = now + float(expires_in)
    account = Account(
        id=new_account_id(),
        email=identity.email,
        chatgpt_account_id=identity.chatgpt_account_id,
        chatgpt_user_id=identity.chatgpt_user_id,
        plan=identity.plan,
        tokens=tokens,
        access_expires_at=expires_at,
        last_refresh=last_refresh,
        created_at=now,
    )
    check_account(account)
    return account


def _parse_timestamp(value: Any) -> float | None:
    """auth.json's ``last_refresh`` (RFC 3339 or epoch seconds), or None; LoginError if absurd."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError, OSError):
            return None  # unreadable: the import time stands in (it only schedules a refresh)
        return check_timestamp("last_refresh", parsed)
    return check_timestamp("last_refresh", value)


def parse_auth_json(data: Any, *, now: float) -> Account:
    """Turn Codex CLI's auth.json (already parsed) into a new Account; LoginError if unusable."""
    if not isinstance(data, dict):
        raise LoginError("auth data is not a JSON object (expected Codex CLI's auth.json)")
    tokens = data.get("tokens")
    if not isinstance(tokens, dict):
        if data.get("OPENAI_API_KEY"):
            raise LoginError(
                "auth data holds an API key (OPENAI_API_KEY), not a ChatGPT login: "
                "run `codex login` with a ChatGPT account first"
            )
        raise LoginError(
            'auth data has no "tokens" object: run `codex login` with a ChatGPT account first'
        )
    refresh_token = tokens.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise LoginError(
            "auth data has no refresh_token, so the pool could not keep the account logged "
            "in: run `codex login` again, then import"
        )
    for name in ("access_token", "id_token"):
        value = tokens.get(name)
        if not isinstance(value, str) or not value:
            raise LoginError(f"auth data has no {name}: run `codex login` again, then import")
    account_id = tokens.get("account_id")
    if account_id is not None and not isinstance(account_id, str):
        raise _field_error("account_id", "a string")
    if account_id:
        check_identifier("account_id", account_id)
    return _account_from_tokens(
        TokenSet(
            access_token=tokens["access_token"],
            refresh_token=refresh_token,
            id_token=tokens["id_token"],
        ),
        fallback_account_id=account_id if isinstance(account_id, str) else "",
        last_refresh=_parse_timestamp(data.get("last_refresh")) or now,
        now=now,
    )


def account_from_token_response(payload: dict[str, Any], *, now: float) -> Account:
    """A new Account from the token endpoint's answer; LoginError when a token is missing."""
    if not isinstance(payload, dict):
        raise LoginError("the auth server's token answer is not a JSON object")
    values: dict[str, str] = {}
    for name in ("access_token", "refresh_token", "id_token"):
        value = payload.get(name)
        if not isinstance(value, str) or not value:
            raise LoginError(f"the auth server's token answer has no {name}")
        values[name] = value
    return _account_from_tokens(
        TokenSet(**values),
        fallback_account_id="",
        last_refresh=now,
        now=now,
        expires_in=payload.get("expires_in"),
    )


# --- importing auth.json -------------------------------------------------------------------


async def import_auth_data(store: AccountStore, data: Any) -> ImportResult:
    """Add (or update) the account of an already-parsed auth.json, e.g. from the admin API.

    Cancel-safe: cancelled before the store write starts, nothing is written.
    """
    account = parse_auth_json(data, now=time.time())
    stored, created = await store.upsert(account)
    return ImportResult(account=stored, created=created, warning=shared_token_warning())


async def import_auth_file(store: AccountStore, path: Path) -> ImportResult:
    """Add (or update) the account in a Codex CLI auth.json file. Nothing is written on error.

    Cancel-safe: cancelled before the store write starts, nothing is written.
    """
    path = Path(await trio.Path(path).expanduser())
    try:
        raw = await trio.Path(path).read_bytes()
    except FileNotFoundError:
        raise LoginError(
            f"auth file {path} not found: run `codex login` first or pass a path"
        ) from None
    except OSError as exc:
        raise LoginError(f"auth file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoginError(
            f"auth file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise LoginError(f"auth file {path} is not UTF-8 text") from None
    try:
        account = parse_auth_json(data, now=time.time())
    except LoginError as exc:
        raise LoginError(f"auth file {path}: {exc}") from None
    stored, created = await store.upsert(account)
    return ImportResult(account=stored, created=created, warning=shared_token_warning(path))


# --- talking to the auth server --------------------------------------------------------------


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def error_code(payload: Any, status: int) -> str:
    """The error code of an auth-server answer, in PROTOCOL.md's order of places."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            for key in ("code", "error"):
                value = error.get(key)
                if isinstance(value, str) and value:
                    return _one_line(value)
        if isinstance(error, str) and error:
            return _one_line(error)
        for key in ("error_code", "code"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return _one_line(value)
    return f"http_{status}"


def _describe_transport_error(exc: httpx.HTTPError) -> str:
    detail = _one_line(str(exc))
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


async def _post(client: httpx.AsyncClient, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.post(url, headers={"Accept": "application/json"}, **kwargs)
    except httpx.HTTPError as exc:
        raise LoginError(
            f"{what} failed: cannot reach {url}: {_describe_transport_error(exc)}"
        ) from None


async def exchange_code(
    client: httpx.AsyncClient,
    auth_base_url: str,
    *,
    code: str,
    code_verifier: str,
    redirect_uri: str,
) -> dict[str, Any]:
    """Trade an authorization code for the token triple (form-urlencoded, as Codex CLI does)."""
    url = f"{auth_base_url.rstrip('/')}/oauth/token"
    response = await _post(
        client,
        url,
        what="the token exchange",
        data={
            "grant_type": "authorization_code",
            "client_id": CLIENT_ID,
            "code": code,
            "code_verifier": code_verifier,
            "redirect_uri": redirect_uri,
        },
    )
    payload = _json_or_none(response)
    if response.status_code != 200:
        raise LoginError(
            f"the auth server refused the authorization code: "
            f"{error_code(payload, response.status_code)} (HTTP {response.status_code})"
        )
    if not isinstance(payload, dict):
        raise LoginError("the auth server's token answer is not a JSON object")
    return payload


async def _save_login(store: AccountStore, payload: dict[str, Any]) -> ImportResult:
    account = account_from_token_response(payload, now=time.time())
    stored, created = await store.upsert(account)
    return ImportResult(account=stored, created=created)


# --- browser login (authorization code + PKCE) ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(<redacted>)"

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(64)  # 86 characters, inside RFC 7636's 43..128
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        return cls(verifier=verifier, challenge=challenge)


def authorize_url(auth_base_url: str, *, redirect_uri: str, code_challenge: str, state: str) -> str:
    """The URL the user opens to log in (PROTOCOL.md, "Login, browser PKCE")."""
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": AUTHORIZE_SCOPE,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
        "state": state,
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
    }
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    return f"{auth_base_url.rstrip('/')}/oauth/authorize?{query}"


def _page(title: str, text: str) -> str:
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>codex-lb-trio: {html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )


class _CallbackServer:
    """Serves ``GET /auth/callback`` once on a bound listener, then stops.

    The first callback is claimed; its code is exchanged and saved by ``finish`` before the
    browser gets its page, so the page tells the truth. Other paths (favicon, preconnects)
    get a 404 and do not end the wait.
    """

    def __init__(
        self,
        listener: trio.SocketListener,
        *,
        expected_state: str,
        finish: Callable[[str], Awaitable[ImportResult]],
    ) -> None:
        self._listener = listener
        self._expected_state = expected_state
        self._finish = finish
        self._claimed = False
        self._result: ImportResult | None = None
        self._error: Exception | None = None
        self._done = trio.CancelScope()
        self._wait = trio.CancelScope()

    async def run(self, wait_seconds: float) -> ImportResult:
        """Wait up to ``wait_seconds`` for the callback; the exchange after it is not cut short."""
        self._wait.deadline = trio.current_time() + wait_seconds
        with self._done:
            async with trio.open_nursery() as nursery:
                with self._wait:
                    while True:
                        stream = await self._listener.accept()
                        nursery.start_soon(self._handle, stream)
                if not self._claimed:
                    nursery.cancel_scope.cancel()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise LoginError(
                f"login timed out after {wait_seconds:g} s: no browser callback arrived; "
                "run the login again"
            )
        return self._result

    def _state_matches(self, query: str) -> bool:
        state = urllib.parse.parse_qs(query).get("state", [""])[0]
        return secrets.compare_digest(state.encode("utf-8", "replace"),
                                      self._expected_state.encode())

    def _check(self, query: str) -> str:
        params = urllib.parse.parse_qs(query)

        def first(name: str) -> str:
            return params.get(name, [""])[0]

        if first("error"):
            description = first("error_description")
            detail = f" ({_one_line(description)})" if description else ""
            reason = _one_line(first("error"))
            raise LoginError(f"the auth server refused the login: {reason}{detail}")
        code = first("code")
        if not code:
            raise LoginError("the login callback carries no authorization code")
        return code

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(CALLBACK_REQUEST_TIMEOUT):
                request = await _read_request(stream)
            if request is None:
                return
            connection, target = request
            path, _, query = target.partition("?")
            if path != CALLBACK_PATH:
                await _respond(stream, connection, 404, _page("Not found", "Nothing here."))
                return
            if not self._state_matches(query):
                # A stale tab or a foreign page (anything local can reach this port) must not
                # end the login in progress: refuse it and keep waiting for the real callback.
                await _respond(stream, connection, 400, _page(
                    "Wrong login state",
                    "This callback does not belong to the login in progress; it was ignored.",
                ))
                return
            if self._claimed:
                await _respond(
                    stream,
                    connection,
                    409,
                    _page("Already handled", "This login was already handled; close this tab."),
                )
                return
            self._claimed = True
            self._wait.cancel()  # stop accepting; the exchange below has its own timeouts
            try:
                code = self._check(query)
                result = await self._finish(code)
            except Exception as exc:  # reported to the caller of run(), not lost in a group
                self._error = exc
                text = str(exc) if isinstance(exc, LoginError) else "The account was not saved."
                await _respond(stream, connection, 400, _page("Login failed", text))
            else:
                self._result = result
                await _respond(
                    stream,
                    connection,
                    200,
                    _page("Login complete", "Login complete, you can close this tab."),
                )
            finally:
                self._done.cancel()


async def _read_request(stream: trio.SocketStream) -> tuple[h11.Connection, str] | None:
    """The request target of the first request on ``stream``, or None if there is none."""
    connection = h11.Connection(h11.SERVER)
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(16384))
            elif isinstance(event, h11.Request):
                return connection, event.target.decode("ascii", "replace")
            else:
                return None
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None


async def _respond(
    stream: trio.SocketStream, connection: h11.Connection, status: int, page: str
) -> None:
    body = page.encode("utf-8")
    headers = [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        ("connection", "close"),
    ]
    try:
        data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
        data += connection.send(h11.Data(data=body)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(CALLBACK_REQUEST_TIMEOUT):
            await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the browser went away; the login result does not depend on the page


async def _open_browser_quietly(open_browser: Callable[[str], None], url: str) -> None:
    try:
        await trio.to_thread.run_sync(open_browser, url, abandon_on_cancel=True)
    except Exception:  # noqa: BLE001 - the URL was announced; the user can open it by hand
        pass


async def login_browser(
    store: AccountStore,
    *,
    auth_base_url: str,
    client: httpx.AsyncClient,
    port: int = DEFAULT_LOGIN_PORT,
    open_browser: Callable[[str], None] | None = None,
    announce: Callable[[str], None] = print,
    # Bounds only the wait for the user, not the exchange after it: not a fail_after.
    timeout: float = 600,  # noqa: ASYNC109
) -> ImportResult:
    """Log in through the browser (authorization code + PKCE) and add the account.

    Listens on 127.0.0.1:``port`` (0 picks a free port) for the redirect, announces the
    authorize URL (and opens it with ``open_browser`` if given), waits up to ``timeout`` s for
    the callback, exchanges the code and saves the account. If cancelled, the listener is
    closed and nothing is saved unless the exchange had already completed.
    """
    auth = auth_base_url.rstrip("/")
    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LoginError(
                f"port {port} is in use (another login or Codex CLI?); "
                "try `codex-lb-trio accounts login --device`"
            ) from None
        raise LoginError(
            f"cannot listen on 127.0.0.1:{port} for the login callback: {exc.strerror or exc}"
        ) from None
    listener = listeners[0]
    async with listener:
        bound_port = listener.socket.getsockname()[1]
        redirect_uri = f"http://localhost:{bound_port}{CALLBACK_PATH}"
        pkce = Pkce.new()
        state = secrets.token_urlsafe(32)
        url = authorize_url(
            auth, redirect_uri=redirect_uri, code_challenge=pkce.challenge, state=state
        )

        async def finish(code: str) -> ImportResult:
            payload = await exchange_code(
                client, auth, code=code, code_verifier=pkce.verifier, redirect_uri=redirect_uri
            )
            return await _save_login(store, payload)

        server = _CallbackServer(listener, expected_state=state, finish=finish)
        announce(f"Open this URL in a browser to log in:\n\n    {url}\n")
        if open_browser is not None:
            # The listener is bound, so a callback arriving meanwhile waits in the backlog.
            with trio.move_on_after(BROWSER_OPEN_TIMEOUT):
                await _open_browser_quietly(open_browser, url)
        return await server.run(timeout)


# --- device-code login ---------------------------------------------------------------------


def _seconds(value: Any, default: float) -> float:
    """A positive number of seconds from a JSON number or numeric string, else ``default``."""
    if isinstance(value, bool):
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if seconds > 0 and math.isfinite(seconds) else default


async def _poll_device_grant(
    client: httpx.AsyncClient,
    auth: str,
    *,
    device_auth_id: str,
    user_code: str,
    interval: float,
) -> tuple[str, str]:
    """Poll until the user approves; returns (authorization_code, code_verifier)."""
    url = f"{auth}/api/accounts/deviceauth/token"
    while True:
        await trio.sleep(interval)
        try:
            response = await client.post(
                url,
                json={"device_auth_id": device_auth_id, "user_code": user_code},
                headers={"Accept": "application/json"},
            )
        except httpx.TransportError:
            continue  # a blip during a long wait; the caller's deadline still bounds it
        if response.status_code in (403, 404):
            continue  # not approved yet
        payload = _json_or_none(response)
        if response.status_code == 200 and isinstance(payload, dict):
            code = payload.get("authorization_code")
            verifier = payload.get("code_verifier")
            if isinstance(code, str) and code and isinstance(verifier, str) and verifier:
                return code, verifier
        reason = error_code(payload, response.status_code)
        if reason == "authorization_pending":
            continue
        if reason == "slow_down":
            interval += SLOW_DOWN_SECONDS
            continue
        if response.status_code == 200:
            raise LoginError(
                "the auth server's device answer lacks authorization_code or code_verifier"
            )
        raise LoginError(f"device login failed: {reason} (HTTP {response.status_code})")


async def login_device(
    store: AccountStore,
    *,
    auth_base_url: str,
    client: httpx.AsyncClient,
    announce: Callable[[str], None] = print,
    # Bounds only the wait for the user, not the exchange after it: not a fail_after.
    timeout: float = 900,  # noqa: ASYNC109
) -> ImportResult:
    """Log in with a device code (for machines without a browser) and add the account.

    Announces the verification URL and the user code, polls until the user approves (or
    ``timeout`` s, or the code's own expiry, pass), exchanges the code and saves the account.
    Cancelling it abandons the login; nothing is saved unless the exchange had completed.
    """
    auth = auth_base_url.rstrip("/")
    usercode_url = f"{auth}/api/accounts/deviceauth/usercode"
    response = await _post(
        client, usercode_url, what="the device code request", json={"client_id": CLIENT_ID}
    )
    payload = _json_or_none(response)
    if response.status_code != 200:
        raise LoginError(
            f"the auth server refused a device code: {error_code(payload, response.status_code)} "
            f"(HTTP {response.status_code}); try `codex-lb-trio accounts login` without --device"
        )
    if not isinstance(payload, dict):
        raise LoginError("the auth server's device code answer is not a JSON object")
    device_auth_id = payload.get("device_auth_id")
    user_code = payload.get("user_code") or payload.get("usercode")
    if not isinstance(device_auth_id, str) or not device_auth_id:
        raise LoginError("the auth server's device code answer has no device_auth_id")
    if not isinstance(user_code, str) or not user_code:
        raise LoginError("the auth server's device code answer has no user_code")
    interval = _seconds(payload.get("interval"), 5.0)
    wait = min(timeout, _seconds(payload.get("expires_in"), math.inf))

    announce(
        f"Open {auth}/codex/device in a browser and enter this code:\n\n    {user_code}\n\n"
        f"(the code expires in {max(1, round(wait / 60))} min)"
    )
    grant: tuple[str, str] | None = None
    with trio.move_on_after(wait):
        grant = await _poll_device_grant(
            client, auth, device_auth_id=device_auth_id, user_code=user_code, interval=interval
        )
    if grant is None:
        raise LoginError(
            f"device login timed out: the code was not approved within {wait:g} s; "
            "run the login again"
        )
    code, verifier = grant
    token_payload = await exchange_code(
        client,
        auth,
        code=code,
        code_verifier=verifier,
        redirect_uri=f"{auth}/deviceauth/callback",
    )
    return await _save_login(store, token_payload)


# --- `accounts list` --------------------------------------------------------------------------


def _relative(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def _expiry_text(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "unknown"
    if expires_at <= now:
        return "expired"
    return f"in {_relative(expires_at - now)}"


def _usage_text(account: Account) -> str:
    def percent(window: Any) -> str:
        return "-" if window is None else f"{window.used_percent:.0f}%"

    return f"{percent(account.usage.primary)} / {percent(account.usage.secondary)}"


def format_accounts_table(accounts: list[Account], now: float) -> str:
    """The `accounts list` table: id, email, plan, status, token expiry, usage. No tokens.

    Every cell is escaped for the terminal (``service.status.printable``).
    """
    from service.status import printable

    if not accounts:
        return (
            "no accounts yet: add one with `codex-lb-trio accounts import` "
            "or `codex-lb-trio accounts login`"
        )
    header = ("ID", "EMAIL", "PLAN", "STATUS", "TOKEN EXPIRES", "USAGE 5H / WEEK")
    rows = [header]
    for account in accounts:
        status = account.effective_status(now).value
        if account.cooldown_until is not None and status == "cooling_down":
            status += f" ({_relative(account.cooldown_until - now)})"
        rows.append(
            (
                printable(account.id),
                printable(account.email or "-"),
                printable(account.plan),
                printable(status),
                _expiry_text(account.access_expires_at, now),
                _usage_text(account),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


__all__ = [
    "AUTHORIZE_SCOPE",
    "CLIENT_ID",
    "DEFAULT_LOGIN_PORT",
    "ImportResult",
    "LoginError",
    "Pkce",
    "account_from_token_response",
    "authorize_url",
    "default_auth_file",
    "error_code",
    "exchange_code",
    "format_accounts_table",
    "import_auth_data",
    "import_auth_file",
    "login_browser",
    "login_device",
    "parse_auth_json",
    "shared_token_warning",
]
