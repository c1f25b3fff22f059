"""Hot reload against a real daemon: file edits apply live, bad ones change nothing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from pensieve.paths import bundled_model_path
from tests.integration.daemon import (
    control_status,
    free_port,
    run_ctl,
    sse_events,
    start_daemon,
    wait_for,
    write_config,
)


def _last_reload(socket_path: str) -> dict[str, Any]:
    return control_status(socket_path).get("last_reload") or {}


def test_live_settings_invalid_file_delete_and_port_rebind(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        data = json.loads(d.config_path.read_text())
        bundled = str(bundled_model_path())

        # log level and an alias (to a model already loaded): live within 2 s
        data["logging"] = {"level": "debug"}
        data["model"]["aliases"] = {"claude-opus-*": bundled}
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["aliases"] == {"claude-opus-*": bundled}, 2)
        last = _last_reload(d.socket_path)
        assert last["ok"] is True and last["trigger"] == "watch"
        assert {c["key"] for c in last["changes"]} == {"logging.level", "model.aliases"}
        assert last["model_loading"] is False, "an alias to a loaded model needs no load"
        with d.http() as http:
            models = http.get("/v1/models").json()
        assert "claude-opus-*" in [m["id"] for m in models["data"]]
        wait_for(lambda: "DEBUG" in d.log_text() and "GET /v1/models" in d.log_text(), 2)

        # an invalid file changes nothing; the error shows in status
        bad = json.loads(json.dumps(data))
        bad["server"]["port"] = 70000
        bad["logging"]["level"] = "info"
        write_config(d.config_path, bad)
        wait_for(lambda: control_status(d.socket_path)["config_error"] is not None, 2)
        status = control_status(d.socket_path)
        assert "server.port" in status["config_error"]
        assert status["last_reload"]["ok"] is False
        assert "server.port" in status["last_reload"]["error"]
        assert status["http"]["port"] == d.port and status["state"] == "ready"
        assert status["aliases"] == {"claude-opus-*": bundled}
        human = run_ctl("status", config=d.config_path)
        assert human.returncode == 0 and "INVALID" in human.stdout
        with d.http() as http:
            assert http.get("/health").status_code == 200
            reply = http.post(
                "/v1/messages",
                json={
                    "model": "claude-opus-4",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=300,
            )
            assert reply.status_code == 200, reply.text

        # fixed again: the error clears
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["config_error"] is None, 2)

        # deleted: the running config stays; recreated: applied
        d.config_path.unlink()
        wait_for(lambda: "was removed" in d.log_text(), 3)
        assert control_status(d.socket_path)["state"] == "ready"
        data["logging"]["level"] = "info"
        d.config_path.write_text(json.dumps(data))
        wait_for(
            lambda: any(
                c["key"] == "logging.level" and c["new"] == "info"
                for c in _last_reload(d.socket_path).get("changes", [])
            ),
            2,
        )

        # a new port: the new listener answers, then the old one is closed
        old_port, new_port = d.port, free_port()
        data["server"]["port"] = new_port
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["http"]["port"] == new_port, 2)
        assert httpx.get(f"http://127.0.0.1:{new_port}/health", timeout=10).status_code == 200

        def old_closed() -> bool:
            try:
                httpx.get(f"http://127.0.0.1:{old_port}/health", timeout=2)
            except httpx.ConnectError:
                return True
            return False

        wait_for(old_closed, 2)
        d.port = new_port

        # `pensievectl reload`: re-reads now, reports nothing changed
        result = run_ctl("reload", config=d.config_path)
        assert result.returncode == 0, result.stderr
        assert "nothing changed" in result.stdout
    finally:
        assert d.stop() == 0, d.log_text()


def test_model_switch_while_a_stream_is_in_flight(tmp_path: Path) -> None:
    bundled = bundled_model_path()
    assert bundled is not None
    other = tmp_path / "other-model.gguf"
    shutil.copyfile(bundled, other)
    d = start_daemon(tmp_path / "daemon")
    events: list[dict[str, Any]] = []
    stop_seen_at: list[float] = []
    first_delta = threading.Event()

    def stream() -> None:
        body = {
            "model": "m",
            "max_tokens": 120,
            "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        }
        with httpx.stream("POST", d.base_url + "/v1/messages", json=body, timeout=900) as r:
            for event in sse_events(r.iter_lines()):
                events.append(event)
                if event["type"] == "content_block_delta":
                    first_delta.set()
                if event["type"] == "message_stop":
                    stop_seen_at.append(time.monotonic())

    thread = threading.Thread(target=stream)
    try:
        thread.start()
        assert first_delta.wait(600), "the stream never started"
        data = json.loads(d.config_path.read_text())
        data["model"]["model_path"] = str(other)
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["model"]["path"] == str(other), 300)
        switched_at = time.monotonic()
        thread.join(900)
        assert not thread.is_alive()
        types = [e["type"] for e in events]
        assert "error" not in types, events[-3:]
        assert types[-1] == "message_stop"
        assert stop_seen_at and stop_seen_at[0] > switched_at, (
            "the stream should still have been running when the new model took over"
        )
        with d.http() as http:
            health = http.get("/health").json()
            assert health["model_path"] == str(other)
            assert http.get("/v1/models").json()["data"][0]["id"] == "other-model"
            reply = http.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=300,
            )
            assert reply.status_code == 200, reply.text
        last = _last_reload(d.socket_path)
        assert last["ok"] is True and last["model_loading"] is False
        assert [c["action"] for c in last["changes"]] == ["model"]
        wait_for(lambda: "released model" in d.log_text(), 60)
    finally:
        assert d.stop() == 0, d.log_text()
        thread.join(60)
