"""``codex-lb-trio status`` against a tiny http.server on 127.0.0.1:0, and with no server."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from service.status import run_status, usage_bar


def make_accounts() -> list[dict[str, Any]]:
    """Accounts whose reset times are relative to now (the run may take a while)."""
    NOW = time.time() + 30  # noqa: N806 - slack: durations are printed rounded down
    return [
        {"id": "acc_1", "email": "a@example.com", "plan": "plus", "status": "active",
         "usage": {"primary": {"used_percent": 52.0, "reset_at": NOW + 2 * 3600 + 600},
                   "secondary": {"used_percent": 7.0, "reset_at": NOW + 3 * 86400 + 7200}}},
        {"id": "acc_2", "email": "b@example.com", "plan": "pro", "status": "cooling_down",
         "cooldown_until": NOW + 1800,
         "usage": {"primary": {"used_percent": 100.0, "reset_at": NOW + 1800}, "secondary": None}},
        {"id": "acc_3", "email": "c@example.com", "plan": "plus", "status": "reauth_required",
         "status_reason": "refresh_token_reused", "usage": {"primary": None, "secondary": None}},
    ]


CLIENTS = {"generation": 3, "leases": {"2": 1, "3": 4}, "retired": [2],
           "rotations": {"transport": 1, "network-change": 1}, "force_closes": 0}


@contextmanager
def admin_server(
    accounts_body: Any, *, api_key: str | None = None, clients_status: int = 200
) -> Iterator[str]:
    """Serve /api/accounts and /api/clients on 127.0.0.1 port 0; yields the base URL."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.path)
            if api_key and self.headers.get("authorization") != f"Bearer {api_key}":
                self._answer(401, {"error": {"message": "missing or wrong proxy API key"}})
            elif self.path == "/api/accounts":
                self._answer(200, accounts_body)
            elif self.path == "/api/clients":
                self._answer(clients_status, CLIENTS if clients_status == 200 else
                             {"error": {"message": "the upstream client is shut down"}})
            else:
                self._answer(404, {"error": {"message": "no route"}})

        def _answer(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def status(base_url: str, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_status(base_url, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("shape", ["object", "list"])
def test_status_prints_accounts_usage_bars_and_generations(shape: str) -> None:
    accounts = make_accounts()
    body = {"accounts": accounts} if shape == "object" else accounts
    with admin_server(body) as base_url:
        code, out, err = status(base_url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"codex-lb-trio at {base_url}"
    assert "accounts (3)" in lines
    assert "  acc_1  a@example.com  plus  active" in lines
    assert "    primary   [#####-----]  52%  resets in 2h 10m" in lines
    assert "    secondary [#---------]   7%  resets in 3d 2h" in lines
    assert any(line.startswith("  acc_2  b@example.com  pro  cooling_down until ")
               and line.endswith("(in 30m)") for line in lines)
    assert "    primary   [##########] 100%  resets in 30m" in lines
    assert "  acc_3  c@example.com  plus  reauth_required (refresh_token_reused)" in lines
    assert "    usage not known yet" in lines
    assert "upstream clients: generation 3" in lines
    assert "  generation 2  retired, draining  leases=1" in lines
    assert "  generation 3  current  leases=4" in lines
    assert "  rotations: network-change=1, transport=1; force-closes: 0" in lines


def test_status_with_no_server_prints_one_line_and_fails() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = status(f"http://127.0.0.1:{port}")
    assert code == 1
    assert out == ""
    assert err == (f"codex-lb-trio: no server answering at http://127.0.0.1:{port} "
                   "(start it with codex-lb-trio serve)\n")


def test_status_sends_the_api_key_and_explains_a_refusal() -> None:
    with admin_server({"accounts": []}, api_key="sk-proxy") as base_url:
        ok = status(base_url, api_key="sk-proxy")
        refused = status(base_url)
    assert ok[0] == 0
    assert "accounts (0)" in ok[1]
    assert "none yet" in ok[1]
    assert refused[0] == 1
    assert refused[1] == ""
    assert refused[2].startswith(f"codex-lb-trio: the server at {base_url} wants a proxy API key")
    assert "sk-proxy" not in refused[2]


def test_status_reports_a_server_error_in_one_line() -> None:
    with admin_server({"accounts": make_accounts()}, clients_status=503) as base_url:
        code, out, err = status(base_url + "/")
    assert code == 1
    assert out == ""
    assert err == ("codex-lb-trio: GET /api/clients answered HTTP 503: "
                   "the upstream client is shut down\n")


def test_usage_bar_rounds_to_cells_and_clamps() -> None:
    assert usage_bar(52) == "[#####-----]  52%"
    assert usage_bar(0) == "[----------]   0%"
    assert usage_bar(96) == "[##########]  96%"
    assert usage_bar(130) == "[##########] 130%"
