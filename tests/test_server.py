"""The standalone program as a subprocess: start, admin endpoints, SIGTERM, bad config."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.proc import ServerProcess


def test_server_serves_admin_endpoints_and_stops_on_sigterm(tmp_path):
    with ServerProcess(tmp_path / "home") as server:
        url = server.wait_listening()
        with httpx.Client(base_url=url, timeout=10) as http:
            health = http.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert health.json()["generation"] == 1

            rotated = http.post("/api/clients/rotate")
            assert rotated.status_code == 200
            assert rotated.json() == {"previous_generation": 1, "generation": 2, "rotated": True}

            stats = http.get("/api/clients").json()
            assert stats["generation"] == 2
            assert stats["rotations"] == {"admin": 1}

            metrics = http.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "codex_lb_client_generation 2" in metrics.text
            assert 'codex_lb_client_rotations_total{reason="admin"} 1' in metrics.text
            assert "codex_lb_client_force_closes_total 0" in metrics.text

            missing = http.get("/no/such/route")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
        assert server.terminate() == 0
    assert "SIGTERM received" in server.log
    assert "client manager shutting down" in server.log
    assert "stopped" in server.log.splitlines()[-1]
    assert "Traceback" not in server.log


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True, text=True, timeout=60,
        env={"CODEX_LB_TRIO_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )


def test_bad_config_gives_one_line_and_exit_code_2(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[upstream]\nheader_timeout = "soon"\n')
    result = run_cli(tmp_path, "--config", str(config), "serve")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "codex-lb-trio: config key upstream.header_timeout: expected a number, got 'soon'"
    ]

    config.write_text("[client]\ndrain_timout = 5\n")
    result = run_cli(tmp_path, "--config", str(config), "serve")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "client.drain_timout: unknown key" in result.stderr

    config.write_text("[server\n")
    result = run_cli(tmp_path, "--config", str(config), "serve")
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file_and_exposed_host_are_config_errors(tmp_path):
    result = run_cli(tmp_path, "--config", str(tmp_path / "nope.toml"), "serve")
    assert result.returncode == 2
    assert "not found" in result.stderr

    result = run_cli(tmp_path, "serve", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "api_keys" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
