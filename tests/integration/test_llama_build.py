"""A llama.cpp that dies on this CPU: the daemon stays up, says so and what to do.

The real pensieved and pensievectl, with the self-test's switch that makes its child die with
SIGILL as a native AMX build does on its first batch (SIGILL or SIGSEGV, by machine), so that
this runs on any CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pensieved.engine.selftest import FAKE_SIGNAL_ENV
from tests.integration.daemon import free_port, run_ctl, short_socket_path, start_daemon


def test_daemon_comes_up_degraded_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAKE_SIGNAL_ENV, "ILL")
    d = start_daemon(tmp_path, want_status="error")
    try:
        with d.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            error = health.json()["error"]
            assert "cannot run on this CPU" in error and "SIGILL" in error
            assert "make clean install" in error
            r = http.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        assert r.status_code == 503
        assert "cannot run on this CPU" in r.json()["error"]["message"]
        status = run_ctl("status", "--json", socket_path=d.socket_path)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["state"] == "error" and "SIGILL" in data["error"]
        assert d.proc.poll() is None  # up, not dead
        assert "cannot run on this CPU" in d.log_text()
    finally:
        assert d.stop() == 0


def test_pensievectl_start_reports_it_and_exits_1(tmp_path: Path) -> None:
    sock = short_socket_path(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "server": {"port": free_port(), "socket_path": sock},
                "model": {"context_size": 2048, "slots": 1},
            }
        )
    )
    env = {**os.environ, FAKE_SIGNAL_ENV: "ILL"}
    log = tmp_path / "daemon.log"
    started = run_ctl("start", "--log-file", str(log), config=config, env=env)
    try:
        assert started.returncode == 1, started.stdout + started.stderr
        assert "cannot serve" in started.stderr
        assert "cannot run on this CPU" in started.stderr and "SIGILL" in started.stderr
        assert "make clean install" in started.stderr
    finally:
        stopped = run_ctl("stop", config=config, env=env)
        assert stopped.returncode == 0, stopped.stderr
