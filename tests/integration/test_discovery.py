"""pensievectl finds the daemon for a config file even when the file is broken, never starts a
second one, and stops it even in the middle of a long model load (real daemon, real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pensieve.runrecord import activity_path, read_record, record_path
from tests.integration.daemon import (
    REPO,
    control_status,
    free_port,
    run_ctl,
    short_socket_path,
    wait_for,
)

SLOWLOAD = REPO / "tests" / "integration" / "slowload"


def _write(path: Path, text: str) -> None:
    """Replace the file the way editors do (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _config(tmp_path: Path, **server: Any) -> tuple[Path, dict[str, Any]]:
    data: dict[str, Any] = {
        "server": {"port": free_port(), "socket_path": short_socket_path(tmp_path), **server},
        "model": {"context_size": 2048, "slots": 2, "prefix_cache_dir": str(tmp_path / "kv")},
    }
    path = tmp_path / "config.json"
    _write(path, json.dumps(data, indent=2))
    return path, data


def daemons_for(config: Path) -> list[psutil.Process]:
    """Every live pensieved process started with this config file."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "pensieved" in cmdline and str(config) in cmdline:
            found.append(proc)
    return found


def _kill_all(config: Path) -> None:
    for proc in daemons_for(config):
        proc.kill()


def test_a_broken_config_file_does_not_lose_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A runtime directory of its own, created by this daemon: the very first start.
    runtime = Path(tempfile.mkdtemp(prefix="pvr-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    config, data = _config(tmp_path)
    sock = data["server"]["socket_path"]
    started = run_ctl("start", "--log-file", str(tmp_path / "d.log"), config=config)
    assert started.returncode == 0, started.stderr
    try:
        pid = control_status(sock)["pid"]
        record = read_record(config)
        assert record is not None and record.pid == pid and record.socket_path == sock
        assert record_path(config).parent == runtime / "pensieve" / "run"
        assert activity_path(config).exists()
        # a missing brace: the file's socket_path cannot be read any more
        good = json.dumps(data, indent=2)
        _write(config, good[:-2])
        wait_for(lambda: control_status(sock)["config_error"] is not None, 15)

        status = run_ctl("status", config=config)
        assert status.returncode == 0, status.stderr
        assert f"pid {pid}" in status.stdout
        assert "INVALID, running on the previous" in status.stdout
        assert "(json): Expecting" in status.stdout and "line " in status.stdout
        assert "found through its run record" in status.stderr
        as_json = json.loads(run_ctl("status", "--json", config=config).stdout)
        assert as_json["running"] is True and as_json["pid"] == pid
        assert as_json["found_by"] == "record"
        assert as_json["state"] == "ready" and "(json)" in as_json["config_error"]
        assert as_json["config_file_problem"].startswith("(json): ")

        again = run_ctl("start", config=config)
        assert again.returncode == 0, again.stderr
        assert f"already running (pid {pid})" in again.stdout
        assert [p.pid for p in daemons_for(config)] == [pid]

        validate = run_ctl("validate", config=config)
        assert validate.returncode == 1
        assert "(json): Expecting" in validate.stderr
        assert f"pensieved (pid {pid}) keeps serving on its last good config" in validate.stderr

        reload = run_ctl("reload", config=config)
        assert reload.returncode == 1
        assert "reload failed; pensieved keeps its running config" in reload.stderr
        assert "(json)" in reload.stderr

        show = run_ctl("config", "show", config=config)
        assert show.returncode == 1
        assert "is invalid, so its effective config cannot be shown" in show.stdout
        assert f"server.port = {data['server']['port']}  [running]" in show.stdout
        assert "model.context_size = 2048  [running]" in show.stdout
        assert "(json): Expecting" in show.stderr
        shown = json.loads(run_ctl("config", "show", "--json", config=config).stdout)
        assert shown["running"]["values"]["server"]["socket_path"] == sock
        assert "(json)" in shown["file_error"]

        # fixed: picked up by itself, with a live change to prove it was re-read
        data["logging"] = {"level": "debug"}
        _write(config, json.dumps(data, indent=2))
        wait_for(lambda: control_status(sock)["config_error"] is None, 15)
        fixed = run_ctl("status", "--json", config=config)
        assert fixed.returncode == 0
        fixed_status = json.loads(fixed.stdout)
        assert fixed_status["found_by"] == "config" and fixed_status["pid"] == pid
        assert fixed_status["last_reload"]["ok"] is True
        assert [c["key"] for c in fixed_status["last_reload"]["changes"]] == ["logging.level"]

        # broken again, and stopped: nothing of it remains
        _write(config, "{")
        wait_for(lambda: control_status(sock)["config_error"] is not None, 15)
        stopped = run_ctl("stop", config=config)
        assert stopped.returncode == 0, stopped.stderr
        assert f"pensieved stopped (pid {pid})" in stopped.stdout
        assert daemons_for(config) == []
        assert not os.path.exists(sock)
        assert read_record(config) is None
        after = run_ctl("status", config=config)
        assert after.returncode == 3
        assert "cannot be read, so neither can its server.socket_path: (json)" in after.stderr
    finally:
        _kill_all(config)


def test_two_starts_at_the_same_instant_make_one_daemon(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    argv = [sys.executable, "-m", "pensievectl", "--config", str(config), "start"]
    log = ["--log-file", str(tmp_path / "d.log")]
    try:
        starts = [
            subprocess.Popen(
                [*argv, *log], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=300) for p in starts]
        for proc, (_, err) in zip(starts, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
        texts = [out.decode() for out, _ in outputs]
        assert sum("already running" in t for t in texts) == 1, texts
        daemons = daemons_for(config)
        assert len(daemons) == 1, daemons
        assert control_status(data["server"]["socket_path"])["pid"] == daemons[0].pid
        assert run_ctl("stop", config=config).returncode == 0
        assert daemons_for(config) == []
    finally:
        _kill_all(config)


def test_two_daemons_at_the_same_instant_never_unlink_the_winners_socket(
    tmp_path: Path,
) -> None:
    # The daemons themselves serialise probing and binding the socket: without that, the
    # loser could find the winner's socket bound but not listening yet, and remove it.
    config, data = _config(tmp_path)
    sock = data["server"]["socket_path"]
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    argv = [sys.executable, "-m", "pensieved", "--config", str(config), "--port", "0"]
    procs = [
        subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        wait_for(lambda: sum(p.poll() is not None for p in procs) == 2, 120)
        losers = [p for p in procs if p.poll() is not None]
        for loser in losers:
            assert loser.returncode == 3, loser.stderr.read() if loser.stderr else ""
        winner = next(p for p in procs if p.poll() is None)
        assert control_status(sock)["pid"] == winner.pid
        assert read_record(config) is not None and read_record(config).pid == winner.pid  # type: ignore[union-attr]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
    assert not os.path.exists(sock)


def test_stop_during_a_long_model_load_does_not_wait_for_it(tmp_path: Path) -> None:
    drain_ms = 3000
    config, data = _config(tmp_path, drain_timeout_ms=drain_ms)
    sock = data["server"]["socket_path"]
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    # Each of llama.cpp's progress calls (one per tensor, ~270 for the bundled model) takes
    # 0.25 s: the load would last over a minute.
    env["PYTHONPATH"] = str(SLOWLOAD)
    env["PENSIEVE_TEST_LOAD_DELAY_S"] = "0.25"
    log_path = tmp_path / "d.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pensieved", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: os.path.exists(sock), 60)
        wait_for(lambda: control_status(sock)["state"] == "loading", 30)
        time.sleep(2)  # well inside the load
        status = control_status(sock)
        assert status["state"] == "loading" and status["model"] is None
        assert [w["phase"] for w in status["activity"]] == ["loading the model"]

        began = time.monotonic()
        stopped = run_ctl("stop", config=config, timeout=60)
        took = time.monotonic() - began
        assert stopped.returncode == 0, stopped.stderr
        assert took < drain_ms / 1000 + 2, f"stop took {took:.1f} s"
        assert proc.wait(5) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "was abandoned" in text, text
        assert "Traceback" not in text and "Fatal Python error" not in text
        assert not os.path.exists(sock)
        assert read_record(config) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
