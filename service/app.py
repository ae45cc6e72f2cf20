"""The Quart routes: a thin layer over the actor handles.

Every error a client can see is JSON in OpenAI's shape; no traceback ever leaves.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quart import Quart, Response, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.accounts import AccountNotFound, AccountStatus
from actors.errors import ActorUnavailable, ClientError, CodexLBError, openai_error_body
from actors.messages import ClientStats, RotationReason
from actors.proxy_handler import PassThrough
from actors.supervisor import Engine
from service.body import BodyReader, FinishBodyFirst
from service.config import Config, is_loopback, presented_key_digest
from service.dashboard import is_public_page, register_dashboard
from service.login import LoginError, import_auth_data
from service.surfaces import json_body, register_surfaces

log = logging.getLogger("codex_lb_trio.app")

OPEN_PATHS = frozenset({"/health"})
# Browser pages served by us send this header with state-changing /api/* calls; its value is
# app.config["CSRF_TOKEN"] (random per process), which the page embeds. See README "Security".
CSRF_HEADER = "x-csrf-token"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
    # Odd paths ("..//pause") are answered 404 JSON by the route table, never a 308 to HTML.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    policy = RequestPolicy.from_config(config)
    app.config["CSRF_TOKEN"] = policy.csrf_token
    app.asgi_app = FinishBodyFirst(app.asgi_app)  # type: ignore[method-assign]
    app.config["BODY_READER"] = body_reader = BodyReader(
        max_bytes=config.server.max_body_bytes,
        large_bytes=config.server.large_body_bytes,
        large_slots=config.server.large_body_slots,
        idle_seconds=config.server.body_idle_timeout,
    )
    started_at = time.time()

    @app.before_request
    async def check_request_policy() -> Response | None:
        refused = policy.refusal(method=request.method, path=request.path, headers=request.headers)
        return error_response(refused) if refused is not None else None

    @app.before_websocket
    async def check_websocket_policy() -> Response | None:
        refused = policy.refusal(method="GET", path=websocket.path, headers=websocket.headers)
        return upgrade_refusal(error_response(refused)) if refused is not None else None

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if 300 <= status < 400:
            status = 404  # a routing redirect (odd slashes): no such resource, said in JSON
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

    @app.get("/api/csrf-token")
    async def csrf_token() -> Response:
        # Readable only by same-origin pages (the Origin check refuses others, and we send no
        # CORS headers); clients without an Origin need no token at all.
        return json_response({"csrf_token": policy.csrf_token, "header": CSRF_HEADER})

    @app.get("/api/clients")
    async def clients_stats() -> Response:
        body = (await engine.clients.stats()).to_json()
        if engine.auth_clients is not None:  # the auth server's own pool and path state
            body["auth"] = (await engine.auth_clients.stats()).to_json()
        return json_response(body)

    @app.post("/api/clients/rotate")
    async def clients_rotate() -> Response:
        try:
            body = await json_body(optional=True)
        except ClientError as exc:
            if exc.http_status != 400:
                raise
            raise ClientError("body must be empty or a JSON object like "
                              f'{{"seen_generation": 3}} ({exc})') from None
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
        auth = await engine.auth_clients.stats() if engine.auth_clients is not None else None
        text = render_metrics(stats, auth)
        try:
            text += render_request_faults((await engine.proxy.stats()).get("request_faults", {}))
        except ActorUnavailable:
            pass  # the proxy handler is restarting: its lines come back with it
        if request_log is not None:
            text += request_log.metrics.render(request_log.pending)
        text += body_reader.render_metrics()
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


def _policy_error(message: str, code: str, status: int = 403) -> ClientError:
    err = ClientError(message, status=status)
    err.code = code
    return err


def _host_part(authority: str) -> str:
    """The host of a Host header or URL authority, lowercase, without the port."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] if "]" in authority else authority
    return authority.partition(":")[0] if authority.count(":") == 1 else authority


def _authority(authority: str, scheme: str) -> str:
    """``host:port`` with the scheme's default port made explicit, for comparing origins."""
    authority = authority.strip().lower()
    host = _host_part(authority)
    port = authority[len(host):].removeprefix(":") or ("443" if scheme == "https" else "80")
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestPolicy:
    """Who may use this server: the one check every HTTP request and WebSocket upgrade passes.

    Loopback is not a trust boundary: any page the user's browser opens can send requests to
    127.0.0.1, and DNS rebinding gives a page a name of its own that resolves to it. So:
    the Host must be loopback or listed (unless ``trust_any_host`` with keys, behind a reverse
    proxy); a browser's Origin must be our own page's origin or listed; a browser's
    state-changing /api/* call must carry the CSRF token (or the key); with keys configured,
    every route but /health needs one. Keys are compared as SHA-256 digests.
    """

    key_digests: frozenset[bytes]
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    trust_any_host: bool
    csrf_token: str

    @classmethod
    def from_config(cls, config: Config) -> RequestPolicy:
        return cls(
            key_digests=config.api_key_digests,
            # The address we are bound to is a name clients use (unless it is a wildcard).
            allowed_hosts=frozenset(h.lower() for h in config.server.allowed_hosts)
            | ({config.server.host.lower()} - {"0.0.0.0", "::", "[::]", ""}),
            allowed_origins=frozenset(o.lower().rstrip("/") for o in config.server.allowed_origins),
            trust_any_host=config.server.trust_any_host,
            csrf_token=secrets.token_urlsafe(32),
        )

    def host_allowed(self, host_header: str) -> bool:
        host = _host_part(host_header)
        # No Host at all (HTTP/1.0) cannot be a rebinding page: browsers always send one.
        return not host or is_loopback(host) or host.strip("[]") in {
            h.strip("[]") for h in self.allowed_hosts
        }

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or not host_header:
            return False  # includes "null" (sandboxed frames, file:// pages)
        # Same origin: a page we served, under the Host this request came to.
        return _authority(parts.netloc, parts.scheme) == _authority(host_header, parts.scheme)

    def key_ok(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        digest = presented_key_digest(token)
        # Every digest is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(digest, known) for known in self.key_digests]
        return any(matches)

    def refusal(self, *, method: str, path: str, headers: Mapping[str, str]) -> ClientError | None:
        host = headers.get("host", "")
        if not self.trust_any_host and not self.host_allowed(host):
            return _policy_error(
                f"Host {_shown(_host_part(host))} is not served here: use 127.0.0.1 or localhost, "
                "or list the name in server.allowed_hosts", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return _policy_error(
                f"requests from web pages at {_shown(origin)} are refused; list the origin in "
                "server.allowed_origins to allow it", "origin_not_allowed")
        authorized = bool(self.key_digests) and self.key_ok(headers.get("authorization", ""))
        if (self.key_digests and path not in OPEN_PATHS and not is_public_page(path)
                and not authorized):
            return _policy_error("missing or wrong proxy API key: send Authorization: Bearer <key>",
                                 "invalid_api_key", 401)
        from_browser = origin is not None or "sec-fetch-site" in headers
        if (from_browser and not authorized and method in STATE_CHANGING_METHODS
                and path.startswith("/api/")):
            sent = headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode("utf-8", "replace"), self.csrf_token.encode()):
                return _policy_error(
                    f"a browser's {method} to {_shown(path)} needs the {CSRF_HEADER} header of "
                    "the page this server served (or the proxy API key)", "csrf_token_invalid")
        return None


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_request_faults(faults: dict[str, int]) -> str:
    """Faults that request tasks caught at their boundary, by kind (Prometheus text)."""
    lines = [
        "# HELP codex_lb_request_faults_total Request faults answered at the request's own "
        "boundary, by kind.",
        "# TYPE codex_lb_request_faults_total counter",
    ]
    lines += [f'codex_lb_request_faults_total{{kind="{k}"}} {n}' for k, n in sorted(faults.items())]
    return "\n".join(lines) + "\n"


def render_metrics(stats: ClientStats, auth: ClientStats | None = None) -> str:
    """Prometheus text exposition of the client stats (backend, and auth server if given)."""
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
    lines += _path_health_metrics([s for s in (stats, auth) if s is not None])
    return "\n".join(lines) + "\n"


def _path_health_metrics(per_host: list[ClientStats]) -> list[str]:
    """Hedges, evidence by kind and sockets closed by reason, labelled by host."""
    lines: list[str] = []
    families = (
        ("codex_lb_path_generation", "gauge", "Current client generation per host.",
         lambda s: {"": s.generation}, ""),
        ("codex_lb_path_hedges_total", "counter", "Hedges by outcome.", lambda s: s.hedges, "outcome"),
        ("codex_lb_path_evidence_total", "counter", "Path evidence acted on, by kind.",
         lambda s: s.evidence, "kind"),
        ("codex_lb_path_sockets_closed_total", "counter", "Upstream sockets ended by evidence, by reason.",
         lambda s: s.sockets_closed, "reason"),
        ("codex_lb_path_hedge_after_seconds", "gauge", "Current wait before a hedge.",
         lambda s: {"": s.hedge_after}, ""),
    )
    for name, kind, help_text, values, label in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for host_stats in per_host:
            for key, value in values(host_stats).items():
                extra = f',{label}="{key}"' if label else ""
                shown = "+Inf" if value == float("inf") else f"{value:g}"  # Prometheus spelling
                lines.append(f'{name}{{host="{host_stats.host}"{extra}}} {shown}')
    return lines
