"""Slots, queueing, overload, cancellation and timeouts against the real daemon.

Each test starts its own pensieved because each needs a different slot count or limit. The
machine is shared and slow, so no test asserts a fixed wall-clock figure: times are compared
with a reference measured in the same test.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.integration.daemon import DaemonProcess, prompt_tokens, sse_events, start_daemon

MAIN = "claude-sonnet-4-5"
SIDE = "claude-haiku-4-5"
# At temperature 0 the bundled model writes this story until max_tokens (checked below).
ENDLESS = "Write a very long story about a dragon."


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def stopped(daemon: DaemonProcess) -> None:
    code = daemon.stop()
    assert code == 0, f"pensieved exited {code}:\n{daemon.log_text()}"


def patient(daemon: DaemonProcess) -> httpx.Client:
    # Generation on a loaded 2-core machine can crawl; the tests compare times, never cap them.
    return httpx.Client(base_url=daemon.base_url, timeout=600)


def body(messages: list[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MAIN,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": messages,
        **extra,
    }


def test_interleaved_conversations_stay_warm_with_side_requests(tmp: Path) -> None:
    # Three slots, side requests on another model name served by the same model (no alias):
    # the worst case, where a side request could evict a conversation.
    daemon = start_daemon(tmp, {"model": {"slots": 3, "context_size": 2048}})
    try:
        with patient(daemon) as http:

            def ask(model: str, system: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
                r = http.post(
                    "/v1/messages", json={**body(messages, 12), "model": model, "system": system}
                )
                assert r.status_code == 200, r.text
                return dict(r.json())

            def side(i: int) -> None:
                ask(
                    SIDE, f"Answer with one word. Request {i}.", [{"role": "user", "content": "Hi"}]
                )

            conversations = {
                "a": ("You are a ship's navigator. " * 20, "Which way is north?"),
                "b": ("You are a pastry chef. " * 20, "How do I make bread?"),
            }
            history: dict[str, list[dict[str, Any]]] = {}
            first: dict[str, dict[str, Any]] = {}
            for i, (name, (system, question)) in enumerate(conversations.items()):
                history[name] = [{"role": "user", "content": question}]
                first[name] = ask(MAIN, system, history[name])
                side(i)
            second: dict[str, dict[str, Any]] = {}
            for i, (name, (system, _)) in enumerate(conversations.items()):
                reply = first[name]["content"][0]["text"]
                history[name] += [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": "Tell me more."},
                ]
                second[name] = ask(MAIN, system, history[name])
                side(10 + i)
    finally:
        stopped(daemon)
    for name in conversations:
        usage = second[name]["usage"]
        # The whole first prompt is cached; at least that much must be reused.
        assert usage["cache_read_input_tokens"] >= prompt_tokens(first[name]["usage"]), (
            name,
            usage,
        )
        assert usage["cache_read_input_tokens"] < prompt_tokens(usage)


def test_queueing_beyond_free_slots_and_529_beyond_the_limit(tmp: Path) -> None:
    daemon = start_daemon(
        tmp, {"model": {"slots": 1, "context_size": 2048}, "server": {"max_concurrent_requests": 2}}
    )
    try:
        with patient(daemon) as http, patient(daemon) as other:
            long = body([{"role": "user", "content": ENDLESS}], 100, stream=True)
            queued_result: dict[str, Any] = {}

            def queued() -> None:
                try:
                    r = other.post(
                        "/v1/messages", json=body([{"role": "user", "content": "Hi"}], 4)
                    )
                    queued_result.update(status=r.status_code)
                except httpx.HTTPError as exc:
                    queued_result.update(error=repr(exc))

            with http.stream("POST", "/v1/messages", json=long) as running:
                assert running.status_code == 200
                events = sse_events(running.iter_lines())
                for event in events:
                    if event["type"] == "content_block_delta":
                        break  # the only slot is now generating
                waiter = threading.Thread(target=queued)
                waiter.start()
                deadline = time.monotonic() + 30
                while http.get("/health").json()["in_flight"] < 2:
                    assert time.monotonic() < deadline, "the second request never arrived"
                    time.sleep(0.02)
                assert not queued_result, "the second request should be waiting"
                rejected = httpx.post(
                    daemon.base_url + "/v1/messages",
                    json=body([{"role": "user", "content": "Hi"}], 4),
                    timeout=10,
                )
                assert rejected.status_code == 529, rejected.text
                assert rejected.json()["error"]["type"] == "overloaded_error"
                assert int(rejected.headers["retry-after"]) >= 1
                # Drain the running stream so the queued request gets the slot.
                types = [event["type"] for event in events]
                assert types[-1] == "message_stop"
            waiter.join(600)
            assert queued_result.get("status") == 200, queued_result
            assert http.get("/health").json()["in_flight"] == 0
    finally:
        stopped(daemon)


def time_to_first_text(http: httpx.Client, request: dict[str, Any]) -> tuple[float, int]:
    """Seconds until the first text delta of a streamed request; its output tokens."""
    started = time.monotonic()
    first: float | None = None
    output = 0
    with http.stream("POST", "/v1/messages", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            if event["type"] == "content_block_delta" and first is None:
                first = time.monotonic() - started
            if event["type"] == "message_delta":
                output = event["usage"]["output_tokens"]
    assert first is not None
    return first, output


def test_disconnect_frees_the_slot_for_the_next_request(tmp: Path) -> None:
    # One slot: if the abandoned generation kept running, the next request would queue
    # behind all of its remaining tokens.
    daemon = start_daemon(tmp, {"model": {"slots": 1, "context_size": 4096}})
    endless = body([{"role": "user", "content": ENDLESS}], 2000)
    short = body([{"role": "user", "content": "Say hi."}], 1)
    try:
        with patient(daemon) as http:
            # Reference: the decode rate of the same generation, measured over its first
            # tokens (later tokens attend to a longer context and are slower, so
            # extrapolating from these underestimates what the abandoned request would take).
            probe_tokens = 60
            started = time.monotonic()
            reply = http.post("/v1/messages", json={**endless, "max_tokens": probe_tokens}).json()
            per_token = (time.monotonic() - started) / probe_tokens
            assert reply["stop_reason"] == "max_tokens", "the story should not end this early"
            baseline_first, _ = time_to_first_text(http, short)

            seen = 0
            with http.stream("POST", "/v1/messages", json={**endless, "stream": True}) as r:
                for event in sse_events(r.iter_lines()):
                    if event["type"] == "content_block_delta":
                        seen += 1
                        if seen == 20:
                            break
            # Leaving the block closed the connection mid-generation.
            remaining_s = (2000 - seen) * per_token
            after_first, _ = time_to_first_text(http, short)
            # The abandoned request would still need `remaining_s`; the next one must start
            # after at most a few decode steps (plus its own usual time to first token).
            assert after_first < baseline_first + 0.1 * remaining_s, (
                after_first,
                baseline_first,
                remaining_s,
            )
            assert after_first < 0.25 * remaining_s
        deadline = time.monotonic() + 10
        while "generation cancelled" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "generation cancelled" in daemon.log_text() or "closed the stream" in (
            daemon.log_text()
        )
    finally:
        stopped(daemon)


def test_request_timeout_ends_requests_with_a_clear_error(tmp: Path) -> None:
    daemon = start_daemon(
        tmp,
        {"model": {"slots": 1, "context_size": 4096}, "server": {"request_timeout_ms": 1000}},
    )
    endless = body([{"role": "user", "content": ENDLESS}], 2000)
    try:
        with patient(daemon) as http:
            started = time.monotonic()
            r = http.post("/v1/messages", json=endless)
            elapsed = time.monotonic() - started
            assert r.status_code == 504, r.text
            error = r.json()["error"]
            assert error["type"] == "timeout_error"
            assert "request_timeout_ms" in error["message"]
            assert elapsed < 30, "the deadline must cut the generation short"

            # Streaming: headers are already sent, so the error arrives as an SSE event.
            with http.stream("POST", "/v1/messages", json={**endless, "stream": True}) as s:
                events = list(sse_events(s.iter_lines()))
            assert events[-1]["type"] == "error", events[-3:]
            assert events[-1]["error"]["type"] == "timeout_error"

            # The slot is free again: a short request succeeds within the limit.
            ok = http.post("/v1/messages", json=body([{"role": "user", "content": "Hi"}], 2))
            assert ok.status_code == 200, ok.text
    finally:
        stopped(daemon)
