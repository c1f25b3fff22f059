"""A client that hangs up mid-prefill, then retries (as Claude Code does after its idle
timeout): the prompt is evaluated to its end meanwhile, and the retry reads all of it.
Also the divergence report a user reads with `pensievectl cache`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.integration.daemon import (
    DaemonProcess,
    control_status,
    run_ctl,
    sse_events,
    start_daemon,
    wait_for,
)

MODEL = "claude-sonnet-4-5"
HEADERS = {"anthropic-version": "2023-06-01"}
# Long enough that its prefill outlasts noticing the hang-up (SmolLM2 135M reads a few thousand
# tokens a second on 2 cores).
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
]


def long_text(lines: int, tag: str) -> str:
    return "\n".join(
        f"{tag} {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(9))
        for i in range(lines)
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(
        Path(tmp_path_factory.mktemp("retry")), {"model": {"context_size": 16384, "slots": 2}}
    )
    yield d
    assert d.stop() == 0, d.log_text()


def _model(daemon: DaemonProcess) -> dict[str, Any]:
    model = control_status(daemon.socket_path)["model"]
    assert model is not None
    return dict(model)


def _hang_up_after_message_start(daemon: DaemonProcess, body: dict[str, Any]) -> int:
    """Stream `body`, hang up at message_start; the prompt's size."""
    with (
        httpx.Client(base_url=daemon.base_url, headers=HEADERS, timeout=60) as http,
        http.stream("POST", "/v1/messages", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        event = next(sse_events(response.iter_lines()))
        assert event["type"] == "message_start", event
        return int(event["message"]["usage"]["input_tokens"])


def test_a_retry_after_a_hang_up_mid_prefill_reads_every_prompt_token_but_the_last(
    daemon: DaemonProcess,
) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": long_text(600, "hang-up")}],
    }
    seen: list[dict[str, Any]] = []
    total = _hang_up_after_message_start(daemon, body)
    # The connection is closed: the daemon notices, and evaluates the rest on its own.
    assert total > 8000

    def settled() -> bool:
        prefills = _model(daemon)["background_prefills"]
        seen.extend(prefills)
        return bool(seen) and not prefills

    wait_for(settled, timeout=240, interval=0.1)
    assert seen[0]["prompt_tokens"] == total and seen[0]["evaluated"] < total
    assert "evaluated in the background for a retry" in daemon.log_text()

    retry = httpx.post(
        f"{daemon.base_url}/v1/messages",
        json={**body, "stream": False},
        headers=HEADERS,
        timeout=120,
    )
    assert retry.status_code == 200, retry.text
    usage = retry.json()["usage"]
    assert usage["cache_read_input_tokens"] == total - 1
    assert usage["input_tokens"] == 1


def test_a_request_that_finds_no_free_slot_preempts_a_background_prefill(
    daemon: DaemonProcess,
) -> None:
    """One slot holds a background prefill, the other a request still reading its prompt: a
    third request takes the background prefill's slot instead of waiting for it to finish."""
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "messages": [{"role": "user", "content": long_text(600, "preempted")}],
    }
    _hang_up_after_message_start(daemon, body)
    wait_for(lambda: bool(_model(daemon)["background_prefills"]), timeout=30, interval=0.05)
    busy = {**body, "messages": [{"role": "user", "content": long_text(150, "busy")}]}
    # Its own system prompt: without one it would start with the template's default, the same
    # tokens the background prefill may hold from the cache and nothing more, and a request
    # that extends a background prefill carries it on instead of preempting it.
    small = {
        "model": MODEL,
        "max_tokens": 2,
        "system": "Answer in one word.",
        "messages": [{"role": "user", "content": "hi"}],
    }
    with (
        httpx.Client(base_url=daemon.base_url, headers=HEADERS, timeout=120) as http,
        http.stream("POST", "/v1/messages", json={**busy, "stream": True}) as reading,
    ):
        next(sse_events(reading.iter_lines()))  # the second slot is taken, its prompt read
        reply = http.post("/v1/messages", json=small)
        assert reply.status_code == 200, reply.text
        assert "gives way to a new request (which needs its slot)" in daemon.log_text()
    wait_for(lambda: not _model(daemon)["background_prefills"], timeout=240, interval=0.1)


def test_pensievectl_cache_shows_where_a_prompt_left_the_cache(
    daemon: DaemonProcess,
) -> None:
    system = "You are a careful assistant. " * 40
    first = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "system": system + "Today's date is 2026-12-01.",
        "messages": [{"role": "user", "content": long_text(40, "turn")}],
    }
    second = {**first, "system": system + "Today's date is 2026-12-02."}
    for body in (first, second):
        reply = httpx.post(
            f"{daemon.base_url}/v1/messages", json=body, headers=HEADERS, timeout=120
        )
        assert reply.status_code == 200, reply.text
    report = _model(daemon)["recent_requests"][-1]
    assert report["diverged_at"] is not None
    assert report["cache_read_tokens"] == report["diverged_at"]
    assert "2026-12-0" in report["common"] + report["prompt_next"]
    assert report["prompt_next"] != report["cached_next"]
    assert "2" in report["prompt_next"] and "1" in report["cached_next"]
    shown = run_ctl("cache", socket_path=daemon.socket_path)
    assert shown.returncode == 0, shown.stderr
    assert f"diverged at token {report['diverged_at']}" in shown.stdout
    assert "prompt:" in shown.stdout and "cached:" in shown.stdout
    as_json = json.loads(run_ctl("cache", "--json", socket_path=daemon.socket_path).stdout)
    assert as_json["models"][0]["recent_requests"][-1] == report
