"""The fake upstream's HTTP and WebSocket routes (a quart-trio app over a FakeUpstream).

Every handler records the request first, then authenticates, then applies a queued fault,
then does the work. Error-status faults answer instead of the work (nothing is processed,
a refresh token stays valid); delivery faults (slow_headers, stop_midway) spoil an answer
whose work is done (a refresh has rotated the tokens even if the client never hears of it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
import zstandard
from quart import Response, request, websocket
from quart_trio import QuartTrio

from .faults import ERROR_STATUS_KINDS, HANDSHAKE_KINDS, Fault, FaultKind
from .tokens import CLIENT_ID
from .upstream_control import add_control_routes
from .wire import (
    compacted_output,
    failed_event,
    rate_limit_headers,
    rate_limits_event,
    response_events,
    sse_frame,
    usage_json,
)

if TYPE_CHECKING:
    from .upstream import FakeUpstream


class DropConnection(Exception):
    """Raised mid-body so hypercorn closes the connection without finishing the response."""


def _lower_headers(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = body if isinstance(body, str) else json.dumps(body)
    mimetype = "text/plain" if isinstance(body, str) else "application/json"
    return Response(text, status=status, headers=headers or {}, mimetype=mimetype)


def decode_body(raw: bytes, encoding: str) -> tuple[Any, Response | None]:
    """The JSON body as the backend reads it: decoded per Content-Encoding first.

    Unknown encodings answer 415, corrupt ones 400 (what a strict backend would do).
    """
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            data = raw
        elif encoding in ("gzip", "x-gzip"):
            data = gzip.decompress(raw)
        elif encoding == "deflate":
            try:
                data = zlib.decompress(raw)
            except zlib.error:
                data = zlib.decompress(raw, -zlib.MAX_WBITS)  # raw deflate, as some send it
        elif encoding == "zstd":
            data = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        else:
            return None, _json({"error": {"code": "unsupported_content_encoding",
                                          "message": f"fake: unknown encoding {encoding}"}}, 415)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):
        return None, _json({"error": {"code": "invalid_content_encoding",
                                      "message": f"fake: corrupt {encoding} body"}}, 400)
    try:
        return json.loads(data), None
    except ValueError:
        return None, None


async def _request_body() -> tuple[Any, Response | None]:
    raw = await request.get_data()
    return decode_body(raw, request.headers.get("content-encoding", ""))


def _fault_response(fault: Fault) -> Response:
    return _json(fault.error_body(), fault.http_status, dict(fault.headers))


async def _sleep_unless_closing(fake: FakeUpstream, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await fake.closing.wait()


async def _hang_then_drop(fake: FakeUpstream) -> None:
    """Go silent until the server shuts down, then drop the connection."""
    await fake.closing.wait()
    raise DropConnection("fake upstream shutting down under a silent stream")


def _half_body_then_stop(fake: FakeUpstream, body: Any, fault: Fault) -> Response:
    """Headers and half the JSON body, then silence or a dropped connection."""
    raw = json.dumps(body).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield raw[: len(raw) // 2]
        if fault.mode == "close":
            raise DropConnection("stop_midway close")
        await _hang_then_drop(fake)

    response = Response(chunks(), status=200, mimetype="application/json")
    response.timeout = None
    return response


async def _deliver_json(
    fake: FakeUpstream, fault: Fault | None, status: int, body: Any, headers: dict[str, str]
) -> Response:
    """Send a finished JSON answer, spoiled by a delivery fault if one was taken."""
    if fault is not None and fault.kind is FaultKind.SLOW_HEADERS:
        await _sleep_unless_closing(fake, fault.seconds)
    if fault is not None and fault.kind is FaultKind.STOP_MIDWAY:
        return _half_body_then_stop(fake, body, fault)
    return _json(body, status, headers)


def _refuse_upgrade(response: Response) -> Response:
    # hypercorn 0.18 breaks (and takes the server down) on a request that follows a refused
    # upgrade on the same connection, so refused upgrades close their connection.
    response.headers["connection"] = "close"
    return response


def _auth_error(code: str) -> Response:
    return _json(
        {"error": {"code": code, "message": f"fake: {code}", "type": "invalid_request_error"}},
        401,
    )


def build_app(fake: FakeUpstream) -> QuartTrio:
    app = QuartTrio("fake_upstream")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    add_control_routes(app, fake)

    async def backend_call(
        endpoint: str, body: Any, work: Callable[[str, Fault | None], Awaitable[Response]]
    ) -> Response:
        """Record, authenticate, take a fault, then run ``work(account_id, fault)``."""
        headers = _lower_headers(request.headers.items())
        account_id = headers.get("chatgpt-account-id", "")
        fake.record(endpoint, account_id or None, headers, body)
        problem = fake.vault.authenticate(headers.get("authorization", ""), account_id)
        if problem is not None:
            return _auth_error(problem)
        fault = fake.faults.take(account_id, endpoint)
        if fault is not None and fault.kind in ERROR_STATUS_KINDS:
            return _fault_response(fault)
        if fault is not None and fault.kind is FaultKind.INVALID_PAYLOAD:
            return _json({"detail": "fake: a payload without the expected keys"})
        return await work(account_id, fault)

    # --- backend API ----------------------------------------------------------------

    @app.get("/backend-api/codex/models")
    async def models() -> Response:
        async def work(_account_id: str, fault: Fault | None) -> Response:
            return await _deliver_json(fake, fault, 200, {"models": fake.models}, {})

        return await backend_call("models", dict(request.args), work)

    @app.get("/backend-api/wham/usage")
    async def usage() -> Response:
        async def work(account_id: str, fault: Fault | None) -> Response:
            account = fake.account(account_id)
            body = usage_json(account.usage, plan=account.plan, now=time.time())
            return await _deliver_json(fake, fault, 200, body, {})

        return await backend_call("usage", None, work)

    @app.post("/backend-api/codex/responses/compact")
    async def compact() -> Response:
        body, problem = await _request_body()
        if problem is not None:
            fake.record("compact", None, _lower_headers(request.headers.items()), None)
            return problem

        async def work(_account_id: str, fault: Fault | None) -> Response:
            return await _deliver_json(fake, fault, 200, {"output": compacted_output(body)}, {})

        return await backend_call("compact", body, work)

    @app.post("/backend-api/transcribe")
    async def transcribe() -> Response:
        files = await request.files
        form = await request.form
        upload = files.get("file")
        data = upload.read() if upload is not None else b""
        seen = {"filename": upload.filename if upload is not None else None,
                "content_type": upload.content_type if upload is not None else None,
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "prompt": form.get("prompt"), "fields": sorted(form.keys())}

        async def work(_account_id: str, fault: Fault | None) -> Response:
            if upload is None:
                return _json({"error": {"code": "invalid_request", "message": "fake: no file"}},
                             400)
            text = fake.transcription_text or f"fake transcription of {len(data)} bytes"
            return await _deliver_json(fake, fault, 200, {"text": text}, {})

        return await backend_call("transcribe", seen, work)

    @app.post("/backend-api/codex/responses")
    async def responses() -> Response:
        body, problem = await _request_body()
        if problem is not None:
            fake.record("responses", None, _lower_headers(request.headers.items()), None)
            return problem

        async def work(account_id: str, fault: Fault | None) -> Response:
            if fault is not None and fault.kind is FaultKind.SLOW_HEADERS:
                await _sleep_unless_closing(fake, fault.seconds)
            account = fake.account(account_id)
            now = time.time()
            events = _turn_events(fake, account_id, body, fault)
            stop = fault if fault is not None and fault.kind is FaultKind.STOP_MIDWAY else None

            async def stream() -> AsyncIterator[bytes]:
                for number, event in enumerate(events):
                    if number and fake.event_delay:
                        await trio.sleep(fake.event_delay)
                    yield sse_frame(event)
                if stop is not None:
                    if stop.mode == "close":
                        raise DropConnection("stop_midway close")
                    await _hang_then_drop(fake)

            headers = rate_limit_headers(account.usage, now=now)
            headers["cache-control"] = "no-cache"
            response = Response(stream(), status=200, headers=headers, mimetype="text/event-stream")
            response.timeout = None  # Quart would cut streams after 60 s
            return response

        return await backend_call("responses", body, work)

    @app.websocket("/backend-api/codex/responses")
    async def responses_ws() -> Response | None:
        headers = _lower_headers(websocket.headers.items())
        account_id = headers.get("chatgpt-account-id", "")
        fake.record("ws_connections", account_id or None, headers, None)
        if not fake.websocket_enabled:
            return _refuse_upgrade(_json({"error": {"message": "fake: websockets are off"}}, 426))
        problem = fake.vault.authenticate(headers.get("authorization", ""), account_id)
        if problem is not None:
            return _refuse_upgrade(_auth_error(problem))
        fault = fake.faults.take(account_id, "ws", lambda f: f.kind in HANDSHAKE_KINDS)
        if fault is not None and fault.kind in ERROR_STATUS_KINDS:
            return _refuse_upgrade(_fault_response(fault))
        if fault is not None:  # slow_headers: a slow upgrade
            await _sleep_unless_closing(fake, fault.seconds)
        account = fake.account(account_id)
        accept_headers = rate_limit_headers(account.usage, now=time.time())
        accept_headers.update({
            "x-codex-turn-state": "fake-turn-state-" + secrets.token_hex(6),
            "x-models-etag": fake.models_etag,
            "x-reasoning-included": "true",
            "openai-model": "gpt-5.1-codex",
        })
        await websocket.accept(headers=accept_headers)
        sock = FakeSocket(account_id=account_id, opened_at=trio.current_time())
        fake.sockets.add(sock)
        close_code, close_reason = 1000, ""
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def stop_on_closing() -> None:
                        await fake.closing.wait()
                        scope.cancel()

                    async def stop_on_idle_close() -> None:
                        await sock.close_idle.wait()
                        scope.cancel()

                    nursery.start_soon(stop_on_closing)
                    nursery.start_soon(stop_on_idle_close)
                    close_code, close_reason = await _serve_ws_turns(fake, sock, headers)
                    nursery.cancel_scope.cancel()
        finally:
            fake.sockets.discard(sock)
        if scope.cancelled_caught:
            if fake.closing.is_set():
                close_code, close_reason = 1001, "fake upstream shutting down"
            else:
                close_code, close_reason = 1000, "idle timeout"
                fake.record("ws_idle_closes", account_id, headers, None)
        await websocket.close(close_code, close_reason)
        return None

    # --- auth server ----------------------------------------------------------------

    @app.post("/oauth/token")
    async def token() -> Response:
        headers = _lower_headers(request.headers.items())
        if request.mimetype == "application/x-www-form-urlencoded":
            data: dict[str, Any] = dict((await request.form).items())
        else:
            data = await request.get_json(force=True, silent=True) or {}
        grant_type = data.get("grant_type")
        if grant_type == "refresh_token":
            owner = fake.vault.owner_of_refresh_token(str(data.get("refresh_token", "")))
        elif grant_type == "authorization_code":
            owner = fake.logins.code_owner(str(data.get("code", "")))
        else:
            owner = None
        owner_id = owner.chatgpt_account_id if owner else None
        fake.record("token", owner_id, headers, data)
        fault = fake.faults.take(owner_id, "token")
        if fault is not None and fault.kind in ERROR_STATUS_KINDS:
            return _fault_response(fault)
        if fault is not None and fault.kind is FaultKind.INVALID_PAYLOAD:
            return _json({"token_type": "Bearer", "expires_in": 3600})
        if data.get("client_id") != CLIENT_ID:
            status, body = 401, {"error": "invalid_client", "error_description": "bad client_id"}
        elif grant_type == "refresh_token":
            status, body = fake.vault.refresh(str(data.get("refresh_token", "")))
        elif grant_type == "authorization_code":
            status, body = fake.logins.exchange_code(data)
        else:
            status, body = 400, {"error": "unsupported_grant_type"}
        return await _deliver_json(fake, fault, status, body, {})

    @app.get("/oauth/authorize")
    async def authorize() -> Response:
        args = request.args
        fake.record("authorize", None, _lower_headers(request.headers.items()), dict(args))
        problem = _authorize_problem(fake, args)
        if problem:
            return _json({"error": "invalid_request", "error_description": problem}, 400)
        account = fake.login_account()
        if account is None:
            return _json({"error": "access_denied", "error_description": "no accounts"}, 400)
        code = fake.logins.new_code(
            account=account,
            client_id=args["client_id"],
            redirect_uri=args["redirect_uri"],
            code_challenge=args["code_challenge"],
        )
        location = _with_query(args["redirect_uri"], code=code, state=args.get("state", ""))
        return Response("", status=302, headers={"location": location})

    @app.post("/api/accounts/deviceauth/usercode")
    async def device_usercode() -> Response:
        data = await request.get_json(force=True, silent=True) or {}
        fake.record("device_usercode", None, _lower_headers(request.headers.items()), data)
        if data.get("client_id") != CLIENT_ID:
            return _json({"error": "invalid_client"}, 400)
        device = fake.logins.new_device_auth()
        return _json(
            {
                "device_auth_id": device.device_auth_id,
                "user_code": device.user_code,
                "interval": fake.device_poll_interval,
                "expires_in": 900,
            }
        )

    @app.post("/api/accounts/deviceauth/token")
    async def device_token() -> Response:
        data = await request.get_json(force=True, silent=True) or {}
        device = fake.logins.device_auth(str(data.get("device_auth_id", "")))
        owner = device.account.chatgpt_account_id if device and device.account else None
        fake.record("device_token", owner, _lower_headers(request.headers.items()), data)
        if device is None or device.user_code != data.get("user_code"):
            return _json({"error": "invalid_request", "error_description": "unknown device"}, 400)
        if not fake.logins.poll_device(device):
            return _json({"error": "authorization_pending"}, 403)
        return _json(
            {
                "authorization_code": device.code,
                "code_verifier": device.code_verifier,
                "code_challenge": device.code_challenge,
            }
        )

    @app.get("/codex/device")
    async def device_page() -> Response:
        return Response("<html><body>fake device login page</body></html>", mimetype="text/html")

    return app


def _turn_events(
    fake: FakeUpstream, account_id: str, body: Any, fault: Fault | None
) -> list[dict[str, Any]]:
    """The events of one turn, cut short by a stop_midway or replaced by stream_failed."""
    account = fake.account(account_id)
    now = time.time()
    model = str(body.get("model") or "gpt-5.1-codex") if isinstance(body, dict) else "gpt-5.1-codex"
    failed = None
    if fault is not None and fault.kind is FaultKind.STREAM_FAILED:
        failed = failed_event(code=fault.code, message=fault.message, model=model,
                              created_at=int(now))
        if fault.resets_at is not None:
            failed["response"]["error"]["resets_at"] = fault.resets_at
        if not fault.after_events:
            return [failed]
    events = response_events(
        text=fake.reply_text,
        model=model,
        created_at=int(now),
        input_tokens=max(1, len(json.dumps(body)) // 4),
        rate_limits=rate_limits_event(account.usage, plan=account.plan, now=now),
    )
    if fault is not None and fault.kind is FaultKind.STOP_MIDWAY:
        return events[: fault.after_events]
    if failed is not None:
        return [*events[: fault.after_events], failed]
    return events


class FakeSocket:
    """One open WebSocket of the fake: its age, whether a turn runs, and close requests."""

    def __init__(self, *, account_id: str, opened_at: float) -> None:
        self.account_id = account_id
        self.opened_at = opened_at
        self.in_turn = False
        self.turns = 0
        self.aged = False  # the next turn is refused with websocket_connection_limit_reached
        self.close_idle = trio.Event()


async def _serve_ws_turns(
    fake: FakeUpstream, sock: FakeSocket, headers: dict[str, str]
) -> tuple[int, str]:
    """Answer frames until the client leaves; returns the close code and reason."""
    account_id = sock.account_id
    while True:
        raw = await websocket.receive()
        if isinstance(raw, str):
            fake.ws_raw_frames.append(raw)
        try:
            frame = json.loads(raw)
        except ValueError:
            frame = None
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind in ("response.processed", "response.append"):
            # Acknowledgements and appends of newer Codex: recorded, no answer.
            fake.record("ws_" + kind.removeprefix("response."), account_id, headers, frame)
            continue
        if kind != "response.create":
            await websocket.send(
                json.dumps(
                    {
                        "type": "error",
                        "status": 400,
                        "error": {"code": "invalid_request", "message": "expected response.create"},
                    }
                )
            )
            continue
        fake.record("ws_turns", account_id, headers, frame)
        max_age = fake.websocket_max_age
        if sock.aged or (max_age is not None and trio.current_time() - sock.opened_at >= max_age):
            # The backend's 60-minute cap: the turn is refused, the socket closes.
            fake.record("ws_limit_closes", account_id, headers, None)
            await websocket.send(json.dumps({
                "type": "error", "status": 400,
                "error": {"type": "invalid_request_error",
                          "code": "websocket_connection_limit_reached",
                          "message": "fake: Responses websocket connection limit reached "
                                     "(60 minutes). Create a new websocket connection."},
            }))
            return 1000, "websocket_connection_limit_reached"
        sock.in_turn = True
        try:
            close = await _serve_ws_turn(fake, account_id, frame)
        finally:
            sock.in_turn = False
        if close is not None:
            return close
        sock.turns += 1
        limit = fake.websocket_close_after_turns
        if limit is not None and sock.turns >= limit:
            # The socket dies between turns, right after this one's terminal event.
            fake.record("ws_idle_closes", account_id, headers, None)
            return 1000, "idle timeout"


async def _serve_ws_turn(
    fake: FakeUpstream, account_id: str, frame: dict[str, Any]
) -> tuple[int, str] | None:
    """One response.create; a close code and reason if the socket must close after it."""
    fault = fake.faults.take(account_id, "ws")
    if fault is not None and fault.kind in ERROR_STATUS_KINDS:
        body = fault.error_body()
        error = body.get("error") if isinstance(body, dict) else None
        await websocket.send(
            json.dumps(
                {
                    "type": "error",
                    "status": fault.http_status,
                    "error": error if isinstance(error, dict) else body,
                    "headers": dict(fault.headers),
                }
            )
        )
        return None
    if fault is not None and fault.kind is FaultKind.INVALID_PAYLOAD:
        await websocket.send(json.dumps({"detail": "fake: a frame without a type"}))
        return None
    if fault is not None and fault.kind is FaultKind.SLOW_HEADERS:
        await _sleep_unless_closing(fake, fault.seconds)
    for number, event in enumerate(_turn_events(fake, account_id, frame, fault)):
        if number and fake.event_delay:
            await trio.sleep(fake.event_delay)
        await websocket.send(json.dumps(event))
    if fault is not None and fault.kind is FaultKind.STOP_MIDWAY:
        if fault.mode == "close":
            return 1011, "stop_midway"
        await trio.sleep_forever()  # ended by the client leaving or the fake closing
    return None


def _authorize_problem(fake: FakeUpstream, args: Any) -> str:
    if args.get("response_type") != "code":
        return "response_type must be code"
    if args.get("client_id") != CLIENT_ID:
        return "unknown client_id"
    redirect_uri = args.get("redirect_uri", "")
    if not redirect_uri:
        return "redirect_uri is required"
    if fake.allowed_redirect_uris is not None and redirect_uri not in fake.allowed_redirect_uris:
        return "redirect_uri is not registered"
    if "openid" not in args.get("scope", "").split():
        return "scope must include openid"
    if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
        return "PKCE with code_challenge_method=S256 is required"
    if not args.get("state"):
        return "state is required"
    return ""


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))
