"""The KV cache on the real daemon: sharing, eviction, persistence, types, sizes and layout.

Each test starts its own pensieved with small explicit sizes (the bundled model is small), and
reads what the cache holds from `pensievectl status --json`. The tests of sharing ask for the
shared cache (`kv_unified: true`); on this CPU machine `auto` gives each slot its own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.integration.daemon import (
    DaemonProcess,
    ctl_status,
    prompt_tokens,
    sse_events,
    start_daemon,
)

MODEL = "claude-sonnet-4-5"
# A system prompt of several hundred tokens, as an agent's tools and instructions are.
PREFIX = " ".join(
    f"Rule {i}: keep the project's files tidy and explain every change you make." for i in range(40)
)
ENDLESS = "Write a very long story about a dragon."


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def stopped(daemon: DaemonProcess) -> None:
    code = daemon.stop()
    assert code == 0, f"pensieved exited {code}:\n{daemon.log_text()}"


def patient(daemon: DaemonProcess) -> httpx.Client:
    return httpx.Client(base_url=daemon.base_url, timeout=600)


def ask(
    http: httpx.Client, question: str, *, system: str = PREFIX, max_tokens: int = 8
) -> dict[str, Any]:
    r = http.post(
        "/v1/messages",
        json={
            "model": MODEL,
            "max_tokens": max_tokens,
            "temperature": 0,
            "system": system,
            "messages": [{"role": "user", "content": question}],
        },
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def kv_of(daemon: DaemonProcess) -> dict[str, Any]:
    kv: dict[str, Any] = ctl_status(daemon.config_path)["model"]["kv"]
    return kv


def test_four_sessions_on_one_prefix_share_its_cells(tmp: Path) -> None:
    daemon = start_daemon(tmp, {"model": {"slots": 4, "context_size": 2048, "kv_unified": True}})
    try:
        with patient(daemon) as http:
            first = ask(http, "Which file should I edit first?")
            replies: list[dict[str, Any]] = []
            questions = ["How do I run the tests?", "Where is the config?", "What is a slot?"]
            threads = [
                threading.Thread(target=lambda q=q: replies.append(ask(http, q))) for q in questions
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            status = ctl_status(daemon.config_path)
    finally:
        stopped(daemon)
    assert len(replies) == 3
    one = prompt_tokens(first["usage"])
    prefix = min(r["usage"]["cache_read_input_tokens"] for r in replies)
    # Each new session read the common prefix from the first session's cells.
    assert prefix >= one - 30, (prefix, one)
    model, kv = status["model"], status["model"]["kv"]
    assert kv["cells_shared"] >= prefix
    sessions = [s for s in kv["slots"] if s["tokens"]]
    assert len(sessions) == 4
    # Memory grows with distinct tokens: four sessions in little more than one's cells...
    assert kv["cells_used"] <= 1.3 * (one + 8), kv
    # ...and the cache allocated for all four is within 1.3x of one slot's full context.
    assert kv["allocated_bytes"] <= 1.3 * model["kv_bytes_per_slot"]
    # A session's real cost counts its part of the shared prefix, not all of it.
    assert all(s["cost_bytes"] < s["tokens"] * kv["bytes_per_token"] for s in sessions)


def test_eviction_under_pressure_keeps_a_running_sessions_prefix(tmp: Path) -> None:
    # Pool: 1152 * 1.25 rounded up to 1536 cells. A (idle: the ~700-token prefix and ~300
    # tokens of its own), B (running, sharing the prefix), then C (unrelated, ~640 tokens)
    # fits beside the prefix and B, not beside all of A as well.
    daemon = start_daemon(tmp, {"model": {"slots": 3, "context_size": 1152, "kv_unified": True}})
    own_question = "Please read this carefully. " + "The build is slow. " * 60
    unrelated = "You are a poet. " + "Roses are red and violets are blue. " * 55
    try:
        with patient(daemon) as http:
            a = ask(http, own_question)
            a_tokens = prompt_tokens(a["usage"])
            body = {
                "model": MODEL,
                "max_tokens": 60,
                "temperature": 0,
                "stream": True,
                "system": PREFIX,
                "messages": [{"role": "user", "content": ENDLESS}],
            }
            with http.stream("POST", "/v1/messages", json=body) as stream:
                events = sse_events(stream.iter_lines())
                for event in events:
                    if event.get("type") == "content_block_delta":
                        break  # B is generating: it holds the prefix
                c = ask(http, "Write a poem.", system=unrelated)
                during = kv_of(daemon)
                for _ in events:
                    pass
            again = ask(http, "Which file should I edit first?")
    finally:
        stopped(daemon)
    log = daemon.log_text()
    assert "KV cache full: slot" in log, log[-3000:]
    assert prompt_tokens(c["usage"]) > 600
    a_slot = min(during["slots"], key=lambda s: abs(s["tokens"] - a_tokens))
    shared_prefix = again["usage"]["cache_read_input_tokens"]
    # The prefix survived the eviction: a new session on it starts warm.
    assert shared_prefix >= 0.9 * (prompt_tokens(again["usage"]) - 20), again["usage"]
    assert during["cells_used"] <= during["pool_cells"]
    assert a_slot["tokens"] < a_tokens + 8  # A gave up cells of its own tail


def test_q8_0_cache_answers_like_f16(tmp: Path) -> None:
    # Greedy decoding over a few hundred cached tokens: a q8_0 cache that stored K or V wrong
    # (or without flash attention) would change the answer; a correct one does not.
    answers = {}
    for cache_type in ("f16", "q8_0"):
        daemon = start_daemon(
            tmp / cache_type, {"model": {"kv_cache_type": cache_type, "slots": 1}}
        )
        try:
            with patient(daemon) as http:
                reply = ask(http, "Which file should I edit first?", max_tokens=12)
                kv = kv_of(daemon)
        finally:
            stopped(daemon)
        answers[cache_type] = (reply["content"][0]["text"], kv)
    f16_text, f16_kv = answers["f16"]
    q8_text, q8_kv = answers["q8_0"]
    assert f16_text.strip() and q8_text == f16_text, (f16_text, q8_text)
    assert q8_kv["cache_type"] == "q8_0" and q8_kv["flash_attention"].startswith("on")
    assert q8_kv["bytes_per_token"] <= 0.55 * f16_kv["bytes_per_token"]
    assert q8_kv["allocated_bytes"] <= 0.55 * f16_kv["allocated_bytes"]
    # Both contexts are below Claude Code's 32k; only the f16 one is told to try q8_0.
    assert "kv_cache_type q8_0" in f16_kv["warning"]
    assert q8_kv["warning"] and "kv_cache_type q8_0" not in q8_kv["warning"]


def test_auto_sizes_fit_a_memory_budget(tmp: Path) -> None:
    budget_mb = 200
    daemon = start_daemon(
        tmp, {"model": {"context_size": "auto", "slots": "auto", "memory_budget_mb": budget_mb}}
    )
    try:
        status = ctl_status(daemon.config_path)
        text = daemon.log_text()
    finally:
        stopped(daemon)
    model, kv = status["model"], status["model"]["kv"]
    assert model["slots"] == 4
    # The bundled model's training context (8192) does not fit beside its weights in 200 MB.
    assert 1024 <= model["context_size"] < 8192
    assert model["size_bytes"] + kv["allocated_bytes"] <= budget_mb * 1024 * 1024
    assert "capped by model.memory_budget_mb 200" in kv["sizing"]
    assert "capped by model.memory_budget_mb 200" in text  # the startup log says it too
    assert kv["warning"] and "Claude Code" in kv["warning"]


def test_saved_caches_restore_with_their_prefix_shared(tmp: Path) -> None:
    config = {"model": {"slots": 3, "context_size": 2048, "kv_unified": True}}
    daemon = start_daemon(tmp, config)
    try:
        with patient(daemon) as http:
            first = ask(http, "Which file should I edit first?")
            for question in ("How do I run the tests?", "Where is the config?"):
                ask(http, question)
            before = kv_of(daemon)
    finally:
        stopped(daemon)
    files = sorted((tmp / "kv").glob("*/slot-*.kv"))
    assert len(files) == 3, files
    sizes = [f.stat().st_size for f in files]
    # The prefix is on disk once: the two later sessions saved only their own tails.
    assert max(sizes[1:]) < 0.2 * sizes[0], sizes

    daemon = start_daemon(tmp, config)
    try:
        after = kv_of(daemon)
        with patient(daemon) as http:
            again = ask(http, "What is a slot?")
    finally:
        stopped(daemon)
    assert "restored 3 KV cache(s)" in daemon.log_text()
    assert after["cells_used"] == before["cells_used"]
    assert after["cells_shared"] == before["cells_shared"] >= prompt_tokens(first["usage"]) - 30
    assert again["usage"]["cache_read_input_tokens"] >= prompt_tokens(first["usage"]) - 30


def test_on_a_cpu_auto_gives_each_slot_a_cache_and_copies_a_common_prefix(tmp: Path) -> None:
    config = {"model": {"slots": 3, "context_size": 2048}}
    daemon = start_daemon(tmp, config)
    try:
        with patient(daemon) as http:
            first = ask(http, "Which file should I edit first?")
            second = ask(http, "How do I run the tests?")
            again = ask(http, "Which file should I edit first?")
            status = ctl_status(daemon.config_path)
    finally:
        stopped(daemon)
    model, kv = status["model"], status["model"]["kv"]
    assert kv["unified"] is False and "per slot" in kv["sizing"], kv
    assert kv["pool_cells"] == 3 * model["context_size"] == 3 * 2048
    assert kv["allocated_bytes"] == 3 * model["kv_bytes_per_slot"]
    one = prompt_tokens(first["usage"])
    # The second session copied the first one's prefix; the first kept its own cache.
    assert second["usage"]["cache_read_input_tokens"] >= one - 30, second["usage"]
    assert again["usage"]["cache_read_input_tokens"] >= one - 1, again["usage"]
    assert kv["cells_shared"] == 0
    assert kv["cells_used"] >= 2 * (one - 30)

    daemon = start_daemon(tmp, config)
    try:
        with patient(daemon) as http:
            warm = ask(http, "How do I run the tests?")
    finally:
        stopped(daemon)
    assert "restored 3 KV cache(s)" in daemon.log_text()
    assert warm["usage"]["cache_read_input_tokens"] >= prompt_tokens(second["usage"]) - 1
