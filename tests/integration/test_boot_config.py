"""A config file that is invalid when pensieved starts: the sections that validate are used,
so the degraded daemon answers (503, saying why) where its clients look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from pensieve.runrecord import last_good_path
from tests.integration.daemon import (
    DaemonProcess,
    control_request,
    control_status,
    free_port,
    raw_http,
    run_ctl,
    short_socket_path,
    start_daemon,
    write_config,
)

MESSAGE = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def _sources(d: DaemonProcess) -> dict[str, str]:
    status = control_status(d.socket_path)
    return {c["section"]: c["source"] for c in status["config_sources"]}


def _listening_ips(d: DaemonProcess, port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process(d.proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def _message(port: int, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    reply = raw_http(
        port,
        "POST",
        "/v1/messages",
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(MESSAGE).encode(),
        timeout=300,
    )
    return reply.status, reply.json()


def _save_last_good(tmp_path: Path, server: dict[str, Any]) -> None:
    """Start on a valid file (which saves it as the last good config), then stop."""
    d = start_daemon(tmp_path, {"server": server})
    assert d.stop() == 0, d.log_text()
    saved = json.loads(last_good_path(d.config_path).read_text())
    assert saved["server"] == server


def test_typo_in_model_at_boot_keeps_the_configured_port_then_the_fix_loads_it(
    tmp_path: Path,
) -> None:
    d = start_daemon(tmp_path, {"model": {"swa_fulll": False}}, want_status="error")
    try:
        with d.http() as http:  # the configured port, not 8080
            health = http.get("/health")
        assert health.status_code == 503
        assert "model.swa_fulll: unknown key" in health.json()["error"]
        assert f"HTTP on 127.0.0.1:{d.port}" in health.json()["error"]
        status, body = _message(d.port)
        assert status == 503 and "model.swa_fulll" in body["error"]["message"]
        assert "model: defaults (invalid: model.swa_fulll" in body["error"]["message"]
        status_reply = control_status(d.socket_path)
        assert status_reply["http"]["port"] == d.port
        assert _sources(d) == {"server": "file", "logging": "file", "model": "defaults"}
        human = run_ctl("status", config=d.config_path)
        assert human.returncode == 0, human.stderr
        assert f"http://127.0.0.1:{d.port} (server section: from the file)" in human.stdout
        assert "model: defaults (invalid: model.swa_fulll: unknown key)" in human.stdout

        data = json.loads(d.config_path.read_text())
        del data["model"]["swa_fulll"]
        write_config(d.config_path, data)
        d.wait_ready(timeout=120)  # on the same port
        status, body = _message(d.port)
        assert status == 200, body
        after = control_status(d.socket_path)
        assert after["config_error"] is None and after["config_sources"] == []
        assert last_good_path(d.config_path).exists()
    finally:
        assert d.stop() == 0, d.log_text()


def test_invalid_server_section_falls_back_to_the_last_good_one_then_to_defaults(
    tmp_path: Path,
) -> None:
    port, sock = free_port(), short_socket_path(tmp_path)
    good = {"port": port, "socket_path": sock, "max_concurrent_requests": 3}
    _save_last_good(tmp_path, good)

    # The port spelt as a string: the whole server section is the last good one.
    broken = {"server": {**good, "port": str(port)}, "logging": {"level": "debug"}}
    d = start_daemon(tmp_path, broken, wait=False)
    d.port = port
    try:
        d.wait_ready(want_status="error")
        with d.http() as http:
            error = http.get("/health").json()["error"]
        assert "server.port" in error and "server: last good config" in error
        assert _sources(d) == {"server": "last_good", "logging": "file", "model": "defaults"}
        values = control_request(sock, "GET", "/v1/config")["values"]
        assert values["server"]["max_concurrent_requests"] == 3
        assert values["logging"]["level"] == "debug"
        human = run_ctl("status", config=d.config_path).stdout
        assert "(server section: last good config)" in human

        # Fixed with another port: the listener moves there and the model loads.
        fixed = json.loads(d.config_path.read_text())
        fixed["server"]["port"] = d.port = free_port()
        write_config(d.config_path, fixed)
        d.wait_ready(timeout=120)
        assert control_status(sock)["http"]["port"] == d.port
        assert _message(d.port)[0] == 200
    finally:
        assert d.stop() == 0, d.log_text()

    # No last good config: the defaults (the flags keep the test off port 8080).
    last_good_path(d.config_path).unlink()
    other_port, other_sock = free_port(), short_socket_path(tmp_path)
    d = start_daemon(
        tmp_path,
        broken,
        wait=False,
        extra_args=["--port", str(other_port), "--socket", other_sock],
    )
    d.port, d.socket_path = other_port, other_sock
    try:
        d.wait_ready(want_status="error")
        assert _sources(d)["server"] == "defaults"
        values = control_request(other_sock, "GET", "/v1/config")["values"]
        assert values["server"]["max_concurrent_requests"] == 8
        assert not last_good_path(d.config_path).exists(), "an invalid file is never saved"
    finally:
        assert d.stop() == 0, d.log_text()


def test_invalid_public_host_binds_loopback_only_and_keeps_the_last_good_key(
    tmp_path: Path,
) -> None:
    port, sock = free_port(), short_socket_path(tmp_path)
    _save_last_good(
        tmp_path, {"host": "0.0.0.0", "port": port, "socket_path": sock, "api_key": "old-key"}
    )
    # 0.0.0.0 without a key: invalid, so the last good section stands in, on loopback only.
    d = start_daemon(
        tmp_path, {"server": {"host": "0.0.0.0", "port": port, "socket_path": sock}}, wait=False
    )
    try:
        d.wait_ready(want_status="error")
        listening = _listening_ips(d, port)
        assert listening and listening <= {"127.0.0.1", "::1"}, listening
        assert control_status(sock)["http"]["host"] == "127.0.0.1"
        assert _message(port)[0] == 401, "the last good config's key is still required"
        status, body = _message(port, {"x-api-key": "old-key"})
        assert status == 503 and "server.host" in body["error"]["message"]
        assert "limited to 127.0.0.1" in body["error"]["message"]
    finally:
        assert d.stop() == 0, d.log_text()

    # Without a last good config: the defaults, on loopback too.
    last_good_path(d.config_path).unlink()
    d = start_daemon(
        tmp_path,
        {"server": {"host": "0.0.0.0", "port": port, "socket_path": sock}},
        wait=False,
        extra_args=["--port", str(port)],
    )
    try:
        d.wait_ready(want_status="error")
        listening = _listening_ips(d, port)
        assert listening and listening <= {"127.0.0.1", "::1"}, listening
        assert _sources(d)["server"] == "defaults"
    finally:
        assert d.stop() == 0, d.log_text()
