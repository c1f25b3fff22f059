"""Continuous batching, shared prefixes between slots, and KV caches saved across restarts.

Against the real daemon and model: several streams decoded in one batch must say exactly what
each says alone; a second session with the same long system prompt starts warm without taking
the first session's slot; a restarted daemon answers its first request from the saved cache.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests.integration.daemon import DaemonProcess, prompt_tokens, start_daemon

MODEL = "claude-sonnet-4-5"
# About 700 tokens with the bundled tokenizer: more than a saved or shared prefix needs.
SYSTEM = "You are a careful assistant for a team that builds compilers. " * 60


def ask(
    daemon: DaemonProcess, messages: list[dict[str, Any]], max_tokens: int, **extra: Any
) -> Any:
    with httpx.Client(base_url=daemon.base_url, timeout=600) as http:
        r = http.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": messages,
                **extra,
            },
        )
    assert r.status_code == 200, r.text
    return r.json()


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def stop(daemon: DaemonProcess) -> None:
    code = daemon.stop()
    assert code == 0, f"pensieved exited {code}:\n{daemon.log_text()}"


def test_streams_decoded_together_say_what_each_says_alone(tmp_path: Path) -> None:
    prompts = [
        "Write a story about a lighthouse keeper.",
        "List some facts about the moon.",
        "Explain how bread rises.",
    ]
    together: dict[int, str] = {}
    daemon = start_daemon(tmp_path / "together", {"model": {"slots": 3}})
    try:

        def run(i: int) -> None:
            together[i] = ask(daemon, user(prompts[i]), 40)["content"][0]["text"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop(daemon)
    # A fresh daemon, so every prompt is evaluated from scratch here too, one at a time.
    daemon = start_daemon(tmp_path / "alone", {"model": {"slots": 3}})
    try:
        alone = [ask(daemon, user(p), 40)["content"][0]["text"] for p in prompts]
    finally:
        stop(daemon)
    assert all(alone), alone
    assert [together.get(i) for i in range(len(prompts))] == alone


def test_a_second_session_with_the_same_system_prompt_starts_warm(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, {"model": {"slots": 2, "context_size": 4096}})
    try:
        # Session A grows a long history, so its slot holds much more than the shared system
        # prompt: the router gives session B the empty slot, which must still start warm.
        history = user("Tell me about parsers. " * 80)
        first = ask(daemon, history, 8, system=SYSTEM)
        history += [
            {"role": "assistant", "content": first["content"][0]["text"]},
            {"role": "user", "content": "Now tell me about type checkers. " * 60},
        ]
        a2 = ask(daemon, history, 8, system=SYSTEM)
        b1 = ask(daemon, user("What is a lexer?"), 8, system=SYSTEM)
        history += [
            {"role": "assistant", "content": a2["content"][0]["text"]},
            {"role": "user", "content": "And code generation?"},
        ]
        a3 = ask(daemon, history, 8, system=SYSTEM)
    finally:
        stop(daemon)
    system_tokens = 600  # well under SYSTEM's length in tokens
    assert b1["usage"]["cache_read_input_tokens"] >= system_tokens, b1["usage"]
    # A kept its whole conversation: B copied the prefix instead of taking A's slot.
    assert a3["usage"]["cache_read_input_tokens"] >= prompt_tokens(a2["usage"]), a3["usage"]


def test_kv_caches_saved_at_stop_make_the_first_request_after_a_restart_warm(
    tmp_path: Path,
) -> None:
    question = user("Summarise the rules for naming variables.")
    # llama.cpp does not promise the same logits for a prompt evaluated in one batch and for a
    # last token evaluated on top of cached state, so greedy text is compared between two runs
    # of the second kind: one on the cache still in memory, one on the cache read from disk.
    daemon = start_daemon(tmp_path)
    try:
        cold = ask(daemon, question, 8, system=SYSTEM)
        warm = ask(daemon, question, 8, system=SYSTEM)
    finally:
        stop(daemon)
    saved = list((tmp_path / "kv").glob("*/slot-*.kv"))
    assert saved, "no KV cache was written at stop"

    daemon = start_daemon(tmp_path)
    try:
        after = ask(daemon, question, 8, system=SYSTEM)
    finally:
        stop(daemon)
    whole = prompt_tokens(after["usage"])
    assert cold["usage"]["cache_read_input_tokens"] == 0
    assert warm["usage"]["cache_read_input_tokens"] == whole - 1
    assert after["usage"]["cache_read_input_tokens"] == whole - 1
    assert after["content"] == warm["content"]

    # Another context size makes other KV states: the saved ones must not be used.
    daemon = start_daemon(tmp_path, {"model": {"context_size": 4096}})
    try:
        resized = ask(daemon, question, 8, system=SYSTEM)
    finally:
        stop(daemon)
    assert resized["usage"]["cache_read_input_tokens"] == 0
