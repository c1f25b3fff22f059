"""Signals, draining and degraded mode with a real pensieved process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from pensieve.paths import bundled_model_path
from tests.integration.daemon import (
    REPO,
    DaemonProcess,
    control_status,
    free_port,
    run_ctl,
    short_socket_path,
    sse_events,
    start_daemon,
    wait_for,
)

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


def _stream_in_thread(d: DaemonProcess, max_tokens: int) -> tuple[threading.Thread, list[Any], Any]:
    events: list[dict[str, Any]] = []
    first_delta = threading.Event()

    def run() -> None:
        body = {"model": "m", "max_tokens": max_tokens, "stream": True, "messages": STORY}
        with httpx.stream("POST", d.base_url + "/v1/messages", json=body, timeout=900) as r:
            for event in sse_events(r.iter_lines()):
                events.append(event)
                if event["type"] == "content_block_delta":
                    first_delta.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, events, first_delta


def _exit_within(proc: subprocess.Popen[bytes], seconds: float) -> float:
    started = time.monotonic()
    proc.wait(seconds)
    return time.monotonic() - started


def test_sigterm_lets_a_stream_finish_then_exits_0(tmp_path: Path) -> None:
    drain_s = 120
    d = start_daemon(tmp_path, {"server": {"drain_timeout_ms": drain_s * 1000}})
    try:
        thread, events, first_delta = _stream_in_thread(d, max_tokens=12)
        assert first_delta.wait(600)
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in d.log_text(), 5)
        took = _exit_within(d.proc, drain_s)
        thread.join(30)
        assert d.proc.returncode == 0, d.log_text()
        assert took < drain_s
        types = [e["type"] for e in events]
        assert types[-1] == "message_stop", events[-3:]
        assert "error" not in types
        assert not os.path.exists(d.socket_path), "the socket is removed on exit"
    finally:
        d.stop()


def test_sigterm_past_the_drain_timeout_ends_the_stream_with_an_error_event(
    tmp_path: Path,
) -> None:
    d = start_daemon(tmp_path, {"server": {"drain_timeout_ms": 500}})
    try:
        thread, events, first_delta = _stream_in_thread(d, max_tokens=1500)
        assert first_delta.wait(600)
        d.proc.send_signal(signal.SIGTERM)
        # drain timeout, up to 5 s for the ended requests to unwind, and freeing the model
        took = _exit_within(d.proc, 30)
        thread.join(30)
        assert d.proc.returncode == 0, d.log_text()
        assert took < 10, took
        last = events[-1]
        assert last["type"] == "error", events[-3:]
        assert last["error"]["type"] == "api_error"
        assert "shutting down" in last["error"]["message"]
        assert "drain timeout" in d.log_text()
    finally:
        d.stop()


def test_broken_config_at_boot_degrades_then_recovers_and_sighup_reloads(
    tmp_path: Path,
) -> None:
    port, sock = free_port(), short_socket_path(tmp_path)
    config = tmp_path / "config.json"
    config.write_text('{"server": {"port": "eighty"}, "model": {"context_size": 2048, "slots": 2}}')
    d = _spawn(tmp_path, config, ["--port", str(port), "--socket", sock], port, sock)
    try:
        d.wait_ready(want_status="error")
        status = control_status(sock)
        assert status["state"] == "error"
        assert "server.port" in status["config_error"]
        assert "server.port" in status["error"]
        ctl = run_ctl("status", socket_path=sock)
        assert ctl.returncode == 0 and "INVALID" in ctl.stdout
        with d.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert "server.port" in health.json()["error"]
            reply = http.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert reply.status_code == 503
            assert "server.port" in reply.json()["error"]["message"]

        config.write_text(json.dumps({"model": {"context_size": 2048, "slots": 2}}))
        d.wait_ready(timeout=120)
        status = control_status(sock)
        assert status["config_error"] is None and status["model"] is not None
        assert d.proc.poll() is None

        # SIGHUP re-reads the file (unchanged here) and records it
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (control_status(sock)["last_reload"] or {}).get("trigger") == "sighup", 5)
        assert control_status(sock)["last_reload"]["ok"] is True
    finally:
        assert d.stop() == 0, d.log_text()


def test_missing_model_at_boot_recovers_when_the_file_appears(tmp_path: Path) -> None:
    model = tmp_path / "later.gguf"
    d = start_daemon(tmp_path, {"model": {"model_path": str(model)}}, want_status="error")
    try:
        status = control_status(d.socket_path)
        assert status["state"] == "error" and str(model) in status["error"]
        bundled = bundled_model_path()
        assert bundled is not None
        shutil.copyfile(bundled, model)
        d.wait_ready(timeout=120)
        assert control_status(d.socket_path)["model"]["path"] == str(model)
    finally:
        assert d.stop() == 0, d.log_text()


def _spawn(tmp_path: Path, config: Path, args: list[str], port: int, sock: str) -> DaemonProcess:
    """pensieved on a config file written by the test (start_daemon writes a valid one)."""
    log_path = tmp_path / "degraded.log"
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pensieved", "--config", str(config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    return DaemonProcess(proc, port, config, log_path, sock, env)
