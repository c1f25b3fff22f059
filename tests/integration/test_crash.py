"""A native crash is never silent: faulthandler's report lands in the log, and `status` and
`start` say which signal ended the daemon, show the log's last lines and name the request
that was running (real daemon killed with a real SIGSEGV, real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests.integration.daemon import (
    REPO,
    control_status,
    free_port,
    run_ctl,
    short_socket_path,
    sse_events,
    wait_for,
)
from tests.integration.test_discovery import SLOWLOAD, daemons_for

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


def _config(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    data: dict[str, Any] = {
        "server": {"port": free_port(), "socket_path": short_socket_path(tmp_path)},
        "model": {"context_size": 2048, "slots": 2, "prefix_cache_dir": str(tmp_path / "kv")},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data, indent=2))
    return path, data


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_sigsegv_during_a_request_is_reported_by_status_and_start(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    port, sock = data["server"]["port"], data["server"]["socket_path"]
    log = tmp_path / "d.log"
    started = run_ctl("start", "--log-file", str(log), config=config)
    assert started.returncode == 0, started.stderr
    try:
        pid = control_status(sock)["pid"]
        request_id: list[str] = []
        first_delta = threading.Event()

        def stream() -> None:
            body = {"model": "m", "max_tokens": 1500, "stream": True, "messages": STORY}
            try:
                with httpx.stream(
                    "POST", f"http://127.0.0.1:{port}/v1/messages", json=body, timeout=300
                ) as r:
                    request_id.append(r.headers["request-id"])
                    for event in sse_events(r.iter_lines()):
                        if event["type"] == "content_block_delta":
                            first_delta.set()
            except httpx.HTTPError:
                pass  # the daemon dies under it

        thread = threading.Thread(target=stream)
        thread.start()
        assert first_delta.wait(300)
        live = json.loads(run_ctl("status", "--json", config=config).stdout)
        assert [w["id"] for w in live["activity"]] == request_id
        assert live["activity"][0]["phase"] == "generating"

        os.kill(pid, signal.SIGSEGV)
        wait_for(lambda: _dead(pid), 30)
        thread.join(30)
        text = log.read_text()
        assert "Fatal Python error: Segmentation fault" in text
        assert "most recent call first" in text  # a traceback of every thread

        status = run_ctl("status", config=config)
        assert status.returncode == 3
        assert f"pensieved (pid {pid}, started " in status.stderr
        assert "died by signal 11 (SIGSEGV)" in status.stderr
        assert f"{request_id[0]}: POST /v1/messages model=m stream=true max_tokens=1500" in (
            status.stderr
        )
        assert ": generating (since " in status.stderr
        assert f"Last lines of its log ({log}):" in status.stderr
        died = json.loads(run_ctl("status", "--json", config=config).stdout)["died"]
        assert died["signal"] == 11 and died["signal_name"] == "SIGSEGV"
        assert [w["id"] for w in died["work"]] == request_id
        assert any("most recent call first" in line for line in died["log_tail"])

        # start says so too, then brings up a new daemon that remembers it
        again = run_ctl("start", "--log-file", str(log), config=config)
        assert again.returncode == 0, again.stderr
        assert "died by signal 11 (SIGSEGV)" in again.stderr
        assert request_id[0] in again.stderr
        new = json.loads(run_ctl("status", "--json", config=config).stdout)
        assert new["pid"] != pid and new["state"] == "ready"
        previous = new["previous_exit"]
        assert previous["pid"] == pid and previous["signal"] == 11
        assert [w["id"] for w in previous["work"]] == request_id
        # only the dead daemon's own lines, ending with faulthandler's report, not the new one's
        tail = "\n".join(previous["log_tail"])
        assert "most recent call first" in tail and "did not exit cleanly" not in tail
        # the new daemon's log says so in one line, without a copy of the report
        assert f"pid {pid} died by signal 11 (SIGSEGV), running {request_id[0]}" in log.read_text()
        assert log.read_text().count("Fatal Python error") == 1
        assert previous["log_tail"][-1].startswith(("Extension modules: ", "... ("))
        human = run_ctl("status", config=config).stdout
        assert f"previous run: pid {pid}" in human and "died by signal 11 (SIGSEGV)" in human
        assert run_ctl("stop", config=config).returncode == 0
        assert daemons_for(config) == []
    finally:
        for proc in daemons_for(config):
            proc.kill()


def test_start_reports_a_daemon_that_dies_by_a_signal_while_loading(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    sock = data["server"]["socket_path"]
    log = tmp_path / "d.log"
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    env["PYTHONPATH"] = str(SLOWLOAD)
    env["PENSIEVE_TEST_LOAD_DELAY_S"] = "0.25"
    argv = [sys.executable, "-m", "pensievectl", "--config", str(config), "start"]
    start = subprocess.Popen(
        [*argv, "--log-file", str(log)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.path.exists(sock), 60)
        wait_for(lambda: control_status(sock)["state"] == "loading", 30)
        time.sleep(1)
        pid = control_status(sock)["pid"]
        os.kill(pid, signal.SIGSEGV)
        out, err = start.communicate(timeout=60)
        assert start.returncode == 1, out + err
        assert "pensieved did not come up" in err
        assert f"pensieved (pid {pid}, started " in err
        assert "died by signal 11 (SIGSEGV)" in err
        assert "load-1: model " in err and ": loading the model (since " in err
        assert "Fatal Python error: Segmentation fault" in err
    finally:
        start.kill()
        for proc in daemons_for(config):
            proc.kill()
