"""pensievectl against real pensieved processes over a real control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest

from tests.integration.daemon import (
    REPO,
    free_port,
    run_ctl,
    short_socket_path,
    start_daemon,
)


def _config(tmp_path: Path, **server: Any) -> tuple[Path, str, int]:
    port = free_port()
    sock = short_socket_path(tmp_path)
    data = {
        "server": {"port": port, "socket_path": sock, **server},
        "model": {"context_size": 2048, "slots": 2},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path, sock, port


def test_start_status_second_daemon_stop(tmp_path: Path) -> None:
    config, sock, port = _config(tmp_path)
    log = tmp_path / "daemon.log"
    started = run_ctl("start", "--log-file", str(log), config=config)
    assert started.returncode == 0, started.stderr + started.stdout
    assert "is running" in started.stdout and sock in started.stdout
    pid = None
    try:
        # status: human and JSON
        human = run_ctl("status", config=config)
        assert human.returncode == 0, human.stderr
        for label in ("listening:", "socket:", "config:", "model:", "resources:", "requests:"):
            assert label in human.stdout
        result = run_ctl("status", "--json", config=config)
        assert result.returncode == 0
        status = json.loads(result.stdout)
        pid = status["pid"]
        assert status["running"] is True
        assert status["state"] == "ready"
        assert status["version"]
        assert status["uptime_s"] >= 0
        assert status["http"]["url"] == f"http://127.0.0.1:{port}"
        assert status["config_file"] == str(config)
        assert status["socket_path"] == sock
        model = status["model"]
        assert model["path"].endswith(".gguf") and model["size_bytes"] > 1_000_000
        assert model["context_size"] == 2048 and model["gpu_layers"] == -1
        # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, K and V in f16, 2,048 tokens.
        assert model["kv_bytes_per_slot"] == 2048 * 30 * 2 * 3 * 64 * 2
        assert model["cached_tokens"] == [0, 0]
        assert status["process"]["rss_bytes"] > 10_000_000
        assert "cpu_percent" in status["process"]
        for key in ("served", "in_flight", "queued", "tokens_generated"):
            assert key in status["requests"]
        assert status["last_reload"] is None

        # a request shows up in the counters
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        after = json.loads(run_ctl("status", "--json", config=config).stdout)
        assert after["requests"]["served"] == 1
        assert after["requests"]["tokens_generated"] >= 1
        assert sorted(after["model"]["cached_tokens"])[0] == 0  # the other slot is untouched
        assert max(after["model"]["cached_tokens"]) >= after["requests"]["prompt_tokens"]
        decode = after["model"]["decode"]
        assert decode["steps"] >= after["requests"]["tokens_generated"]
        assert decode["llama_s"] > 0 and decode["python_s"] > 0
        human = run_ctl("status", config=config).stdout
        assert "kv cache:" in human and "decoding:" in human

        # permissions: 0700 directory, 0600 socket
        assert stat.S_IMODE(os.stat(Path(sock).parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)

        # a second daemon on the same socket refuses, and deletes nothing
        inode = os.lstat(sock).st_ino
        second = subprocess.run(
            [sys.executable, "-m", "pensieved", "--config", str(config), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert second.returncode == 3, second.stderr
        assert "already running" in second.stderr and sock in second.stderr
        assert os.lstat(sock).st_ino == inode
        assert run_ctl("status", config=config).returncode == 0

        # start again: already running, exit 0
        again = run_ctl("start", config=config)
        assert again.returncode == 0
        assert "already running" in again.stdout

        # validate with a running daemon shows what would change
        candidate = tmp_path / "candidate.json"
        candidate.write_text(
            json.dumps(
                {
                    "server": {"port": port, "socket_path": sock},
                    "logging": {"level": "debug"},
                    "model": {"context_size": 4096, "slots": 2},
                }
            )
        )
        shown = run_ctl("validate", str(candidate), config=config)
        assert shown.returncode == 0, shown.stderr
        assert "logging.level" in shown.stdout and "model.context_size" in shown.stdout
        assert "background" in shown.stdout

        # stop: process gone, socket removed, status 3
        stopped = run_ctl("stop", config=config)
        assert stopped.returncode == 0, stopped.stderr
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert not os.path.exists(sock)
        after_stop = run_ctl("status", config=config)
        assert after_stop.returncode == 3
        assert f"no socket at {sock}" in after_stop.stderr
        assert "pensievectl start" in after_stop.stderr
        not_running = json.loads(run_ctl("status", "--json", config=config).stdout)
        assert not_running["running"] is False
        stop_again = run_ctl("stop", config=config)
        assert stop_again.returncode == 0
        assert "not running" in stop_again.stdout
        assert "exited" not in log.read_text()
    finally:
        if pid is not None and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_stale_socket_from_killed_daemon_is_cleaned_by_start(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "first")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert os.path.exists(d.socket_path), "SIGKILL leaves the socket file behind"
    status = run_ctl("status", config=d.config_path)
    assert status.returncode == 3
    assert f"stale socket at {d.socket_path}" in status.stderr
    stop = run_ctl("stop", config=d.config_path)
    assert stop.returncode == 0 and "stale socket" in stop.stdout

    started = run_ctl("start", "--log-file", str(tmp_path / "second.log"), config=d.config_path)
    assert started.returncode == 0, started.stderr
    try:
        status = run_ctl("status", "--json", config=d.config_path)
        assert status.returncode == 0
        assert json.loads(status.stdout)["state"] == "ready"
    finally:
        assert run_ctl("stop", config=d.config_path).returncode == 0
    assert not os.path.exists(d.socket_path)


def test_validate_offline(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"server": {"port": 9000}, "logging": {"level": "debug"}}))
    ok = run_ctl("validate", str(good), socket_path=short_socket_path(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "is valid" in ok.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"server": {"port": 70000, "prot": 1}, "model": {"context_size": "big"}},
        )
    )
    result = run_ctl("validate", str(bad), socket_path=short_socket_path(tmp_path))
    assert result.returncode == 1
    assert "server.port" in result.stderr and "65535" in result.stderr
    assert "server.prot: unknown key" in result.stderr
    assert "model.context_size" in result.stderr

    broken = tmp_path / "broken.json"
    broken.write_text('{"server": {"port": 1,}}')
    result = run_ctl("validate", str(broken), socket_path=short_socket_path(tmp_path))
    assert result.returncode == 1
    assert "(json)" in result.stderr and "line 1" in result.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="creating another user's socket needs root")
def test_socket_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        os.chown(path, 65534, 65534)
        result = run_ctl("status", socket_path=path, timeout=30)
        assert result.returncode == 4
        assert "refusing" in result.stderr and path in result.stderr
        result = run_ctl("stop", socket_path=path, timeout=30)
        assert result.returncode == 4


def test_daemon_refuses_a_socket_path_that_is_too_long(tmp_path: Path) -> None:
    long_path = "/tmp/" + "d" * 90 + "/pensieved.sock"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"server": {"port": 0}}))
    result = subprocess.run(
        [sys.executable, "-m", "pensieved", "--config", str(config), "--socket", long_path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode != 0
    assert "server.socket_path" in result.stderr and "104 bytes" in result.stderr
