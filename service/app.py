"""The Quart routes: a thin layer over the actor handles.

Every error a client can see is JSON in OpenAI's shape; no traceback ever leaves.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from quart import Quart, Response, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.accounts import AccountNotFound, AccountStatus
from actors.errors import ActorUnavailable, ClientError, CodexLBError, openai_error_body
from actors.messages import ClientStats, RotationReason
from actors.proxy_handler import PassThrough
from actors.supervisor import Engine
from service.config import Config, hash_api_key
from service.dashboard import is_public_page, register_dashboard
from service.login import LoginError, import_auth_data
from service.surfaces import json_body, register_surfaces

log = logging.getLogger("codex_lb_trio.app")

OPEN_PATHS = frozenset({"/health"})


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def error_response(err: CodexLBError) -> Response:
    return json_response(openai_error_body(err), err.http_status)


def create_app(
    engine: Engine, config: Config, *, store: Any = None, request_log: Any = None,
    dashboard: Any = None,
) -> Quart:
    app = QuartTrio("codex_lb_trio")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.config["BODY_TIMEOUT"] = None
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["PROPAGATE_EXCEPTIONS"] = False
    key_digests = config.api_key_digests
    started_at = time.time()

    @app.before_request
    async def check_api_key() -> Response | None:
        if not key_digests or request.path in OPEN_PATHS or is_public_page(request.path):
            return None
        return _refuse_without_key(request.headers.get("authorization", ""), key_digests)

    @app.before_websocket
    async def check_ws_api_key() -> Response | None:
        if not key_digests:
            return None
        refused = _refuse_without_key(websocket.headers.get("authorization", ""), key_digests)
        return upgrade_refusal(refused) if refused is not None else None

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if has_websocket_context():
            method, path = "websocket", websocket.path
        else:
            method, path = request.method, request.path
        messages = {
            404: f"no route for {method} {path}",
            405: f"{method} is not allowed on {path}",
            413: f"request body larger than {config.server.max_body_bytes} bytes "
            "(raise server.max_body_bytes to allow it)",
        }
        err = ClientError(messages.get(status, exc.description or exc.name), status=status)
        err.code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            status, "invalid_request_error"
        )
        response = upgrade_refusal(error_response(err))
        if status == 413:
            # The rest of the body is still on the wire: this connection cannot be reused.
            response.headers["connection"] = "close"
        return response

    @app.errorhandler(CodexLBError)
    async def engine_error(exc: CodexLBError) -> Response:
        return error_response(exc)

    @app.errorhandler(PassThrough)
    async def upstream_rejected(exc: PassThrough) -> Response:
        return Response(exc.body, status=exc.http_status, content_type=exc.content_type)

    @app.errorhandler(AccountNotFound)
    async def no_such_account(exc: AccountNotFound) -> Response:
        err = ClientError(str(exc), status=404)
        err.code = "account_not_found"
        return error_response(err)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        where = websocket.path if has_websocket_context() else f"{request.method} {request.path}"
        log.error("unexpected error on %s", where, exc_info=exc)
        return json_response(
            {"error": {"message": "internal error (see the server log)", "type": "server_error",
                       "code": "internal_error"}},
            500,
        )

    @app.get("/health")
    async def health() -> Response:
        try:
            stats = await engine.clients.stats()
        except ActorUnavailable as exc:
            return json_response({"status": "unavailable", "reason": str(exc)}, 503)
        return json_response(
            {"status": "ok", "generation": stats.generation, "uptime_seconds": round(time.time() - started_at, 1)}
        )

    @app.get("/api/clients")
    async def clients_stats() -> Response:
        return json_response((await engine.clients.stats()).to_json())

    @app.post("/api/clients/rotate")
    async def clients_rotate() -> Response:
        raw = await request.get_data()
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ClientError("body must be empty or a JSON object like "
                                  '{"seen_generation": 3}') from None
            if not isinstance(body, dict):
                raise ClientError('body must be a JSON object like {"seen_generation": 3}')
        seen = body.get("seen_generation") if isinstance(body, dict) else None
        if seen is not None and (not isinstance(seen, int) or isinstance(seen, bool)):
            raise ClientError("seen_generation must be an integer", param="seen_generation")
        before = (await engine.clients.stats()).generation
        generation = await engine.clients.rotate(seen_generation=seen, reason=RotationReason.ADMIN)
        return json_response({"previous_generation": before, "generation": generation,
                              "rotated": generation != before})

    @app.get("/api/accounts")
    async def accounts_list() -> Response:
        now = time.time()
        accounts = await engine.store.list_accounts()
        return json_response({"accounts": [a.public_json(now) for a in accounts]})

    @app.post("/api/accounts/import")
    async def accounts_import() -> Response:
        data = await json_body()
        try:
            result = await import_auth_data(engine.store, data)
        except LoginError as exc:
            raise ClientError(str(exc)) from None
        return json_response({"account": result.account.public_json(), "created": result.created,
                              "warning": result.warning}, 201 if result.created else 200)

    @app.post("/api/accounts/<account_id>/refresh")
    async def accounts_refresh(account_id: str) -> Response:
        fresh = await engine.tokens.ensure_fresh(account_id, force=True)
        return json_response({"account": fresh.account.public_json()})

    @app.post("/api/accounts/<account_id>/<action>")
    async def accounts_action(account_id: str, action: str) -> Response:
        if action == "pause":
            account = await engine.store.set_status(account_id, AccountStatus.PAUSED)
        elif action == "resume":
            account = await engine.store.set_status(account_id, AccountStatus.ACTIVE)
        else:
            raise ClientError(f"unknown account action {action!r}: use pause, resume or refresh",
                              status=404)
        return json_response({"account": account.public_json()})

    @app.delete("/api/accounts/<account_id>")
    async def accounts_remove(account_id: str) -> Response:
        await engine.store.remove(account_id)
        return json_response({"removed": account_id})

    @app.post("/api/refresh")
    async def refresh_now() -> Response:
        return json_response(await engine.scheduler.refresh_now())

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await engine.clients.stats()
        text = render_metrics(stats)
        try:
            text += render_request_faults((await engine.proxy.stats()).get("request_faults", {}))
        except ActorUnavailable:
            pass  # the proxy handler is restarting: its lines come back with it
        if request_log is not None:
            text += request_log.metrics.render(request_log.pending)
        return Response(text, content_type="text/plain; version=0.0.4")

    register_surfaces(app, engine, config)
    register_dashboard(app, engine, config, request_log=request_log, services=dashboard)
    return app


def upgrade_refusal(response: Response) -> Response:
    """An HTTP answer to a websocket upgrade must end its connection.

    hypercorn 0.18 fails a keep-alive connection reused after a refused upgrade.
    """
    if has_websocket_context():
        response.headers["connection"] = "close"
    return response


def _refuse_without_key(authorization: str, key_digests: frozenset[str]) -> Response | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token:
        digest = hash_api_key(token.strip())
        if any(hmac.compare_digest(digest, known) for known in key_digests):
            return None
    err = ClientError("missing or wrong proxy API key: send Authorization: Bearer <key>", status=401)
    err.code = "invalid_api_key"
    return error_response(err)


def render_request_faults(faults: dict[str, int]) -> str:
    """Faults that request tasks caught at their boundary, by kind (Prometheus text)."""
    lines = [
        "# HELP codex_lb_request_faults_total Request faults answered at the request's own "
        "boundary, by kind.",
        "# TYPE codex_lb_request_faults_total counter",
    ]
    lines += [f'codex_lb_request_faults_total{{kind="{k}"}} {n}' for k, n in sorted(faults.items())]
    return "\n".join(lines) + "\n"


def render_metrics(stats: ClientStats) -> str:
    """Prometheus text exposition of the client stats."""
    lines = [
        "# HELP codex_lb_client_generation Current upstream client generation.",
        "# TYPE codex_lb_client_generation gauge",
        f"codex_lb_client_generation {stats.generation}",
        "# HELP codex_lb_client_leases Leases held per live client generation.",
        "# TYPE codex_lb_client_leases gauge",
    ]
    lines += [f'codex_lb_client_leases{{generation="{g}"}} {n}' for g, n in stats.leases.items()]
    lines += [
        "# HELP codex_lb_client_rotations_total Client rotations by reason.",
        "# TYPE codex_lb_client_rotations_total counter",
    ]
    reasons = {r.value: 0 for r in RotationReason} | stats.rotations
    lines += [f'codex_lb_client_rotations_total{{reason="{r}"}} {n}' for r, n in reasons.items()]
    lines += [
        "# HELP codex_lb_client_force_closes_total Retired generations closed under a holder.",
        "# TYPE codex_lb_client_force_closes_total counter",
        f"codex_lb_client_force_closes_total {stats.force_closes}",
        "# HELP codex_lb_client_rotation_failures_total Rotations that could not build a client.",
        "# TYPE codex_lb_client_rotation_failures_total counter",
        f"codex_lb_client_rotation_failures_total {stats.rotation_failures}",
    ]
    return "\n".join(lines) + "\n"
