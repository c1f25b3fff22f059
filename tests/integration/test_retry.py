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
    with (
        httpx.Client(base_url=daemon.base_url, headers=HEADERS, timeout=60) as http,
        http.stream("POST", "/v1/messages", json=body) as response,
    ):
        assert response.status_code == 200
        for event in sse_events(response.iter_lines()):
            assert event["type"] == "message_start", event
            total = event["message"]["usage"]["input_tokens"]
            break
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


def test_a_request_preempts_a_background_prefill_that_holds_the_last_slot(
    daemon: DaemonProcess,
) -> None:
    """Both slots: one holds a background prefill, one a new request; a third request must not
    wait for the background prefill to finish."""
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": long_text(600, "preempted")}],
    }
    with (
        httpx.Client(base_url=daemon.base_url, headers=HEADERS, timeout=60) as http,
        http.stream("POST", "/v1/messages", json=body) as response,
    ):
        next(sse_events(response.iter_lines()))
    wait_for(lambda: bool(_model(daemon)["background_prefills"]), timeout=30, interval=0.05)
    small = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=daemon.base_url, headers=HEADERS, timeout=120) as http:
        for text in ("one", "two"):
            reply = http.post(
                "/v1/messages", json={**small, "messages": [{"role": "user", "content": text}]}
            )
            assert reply.status_code == 200, reply.text
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
