"""The real Claude Code against the real daemon: its captured requests, and its CLI.

Every captured request of every version (tests/claude_code_captures.py says where they live) is
replayed as Claude Code sent it, so a capture dropped into that folder is tested too. The CLI
is the pinned npm package that `make test` installs (PENSIEVE_TEST_CLAUDE names its binary).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.claude_code_captures import FIXTURES, Capture, capture_files, load
from tests.integration.daemon import DaemonProcess, control_status, sse_events, start_daemon

CAPTURES = capture_files()
# Headers the capture removed or that belong to the original connection.
HOP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
# What Claude Code needs: its system prompt and tools alone are about 20,000 tokens.
CONTEXT = 32768
# Claude Code asks for up to 64,000 tokens; the daemon's ceiling keeps a CPU run short
# without touching the requests themselves.
MAX_OUTPUT = 24
# A CPU evaluates the full tool set's prompt in minutes.
PREFILL_S = 900
# Streams with at most this many prompt tokens to evaluate are read to the end; longer ones
# (a cold ~20k-token Claude Code prefix takes about 6 minutes on 2 CPU cores) only up to their
# message_start, unless PENSIEVE_CORPUS_FULL=1 asks for every stream in full.
FULL_READ_TOKENS = 6000
FULL_RUN = os.environ.get("PENSIEVE_CORPUS_FULL") == "1"


@pytest.fixture(scope="module")
def claude_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(
        Path(tmp_path_factory.mktemp("claude-code")),
        {"model": {"context_size": CONTEXT, "slots": 2, "max_output_tokens": MAX_OUTPUT}},
    )
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


def _request_args(capture: Capture) -> dict[str, Any]:
    headers = {
        name: value for name, value in capture.headers.items() if name.lower() not in HOP_HEADERS
    }
    return {"method": capture.method, "url": capture.url, "headers": headers, "json": capture.body}


def _check_stream(events: list[dict[str, Any]]) -> None:
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert kinds[-2] == "message_delta", kinds
    stop = events[-2]["delta"]["stop_reason"]
    assert stop in {"end_turn", "max_tokens", "tool_use", "stop_sequence"}, events[-2]
    for event in events:
        if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
            assert event["content_block"]["name"], event


def _replay_stream(http: httpx.Client, capture: Capture) -> None:
    """Replay a streamed request: 200, a well-formed message_start, then the whole stream when
    its new prompt tokens are few enough to evaluate on a CPU in CI (or when asked to)."""
    with http.stream(**_request_args(capture)) as response:
        if response.status_code != 200:
            response.read()
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events: list[dict[str, Any]] = []
        for event in sse_events(response.iter_lines()):
            events.append(event)
            if event["type"] != "message_start":
                continue
            usage = event["message"]["usage"]
            assert usage["input_tokens"] + usage["cache_read_input_tokens"] > 0, event
            if usage["input_tokens"] > FULL_READ_TOKENS and not FULL_RUN:
                # The prompt is parsed, rendered, tokenized and fits, its grammar is built and
                # accepted by llama.cpp, and a slot holds it: hanging up now cancels the rest.
                return
    _check_stream(events)


@pytest.mark.skipif(
    not CAPTURES,
    reason=f"no captured Claude Code requests at {FIXTURES} (they are not in the "
    "repository; the test with the real CLI below covers a machine without them)",
)
@pytest.mark.timeout(PREFILL_S)
@pytest.mark.parametrize("path", CAPTURES, ids=[load(p).id for p in CAPTURES])
def test_every_captured_claude_code_request_is_answered(
    claude_daemon: DaemonProcess, path: Path
) -> None:
    capture = load(path)
    with httpx.Client(base_url=claude_daemon.base_url, timeout=PREFILL_S) as http:
        if capture.body.get("stream"):
            _replay_stream(http, capture)
        else:
            response = http.request(**_request_args(capture))
            assert response.status_code == 200, response.text
            if capture.count_tokens:
                assert response.json()["input_tokens"] > 0
            else:
                assert response.json()["type"] == "message"
    claude_daemon.check_alive()


MESSAGES = [p for p in CAPTURES if not load(p).count_tokens]
# Fields of a Messages request that count_tokens does not take.
NOT_COUNTED = {"max_tokens", "stream", "metadata", "temperature", "top_p", "top_k"}


@pytest.mark.skipif(not MESSAGES, reason=f"no captured Claude Code requests at {FIXTURES}")
@pytest.mark.parametrize("path", MESSAGES, ids=[load(p).id for p in MESSAGES])
def test_every_captured_conversation_is_counted(claude_daemon: DaemonProcess, path: Path) -> None:
    """count_tokens takes what /v1/messages takes: tool search's round trip among them."""
    capture = load(path)
    body = {k: v for k, v in capture.body.items() if k not in NOT_COUNTED}
    args = {**_request_args(capture), "url": "/v1/messages/count_tokens", "json": body}
    with httpx.Client(base_url=claude_daemon.base_url, timeout=PREFILL_S) as http:
        response = http.request(**args)
    assert response.status_code == 200, response.text
    assert response.json()["input_tokens"] > 0


def _claude_binary() -> Path:
    named = os.environ.get("PENSIEVE_TEST_CLAUDE")
    if not named:
        pytest.skip("PENSIEVE_TEST_CLAUDE is not set: `make test` installs the CLI and sets it")
    binary = Path(named)
    assert binary.exists(), f"{binary} is missing: `make claude-code` installs it"
    return binary


@pytest.mark.timeout(2 * PREFILL_S)
def test_the_real_claude_code_cli_gets_an_answer_with_its_workflow_tool(
    claude_daemon: DaemonProcess, tmp_path: Path
) -> None:
    claude = _claude_binary()
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": claude_daemon.base_url,
        "ANTHROPIC_API_KEY": "sk-ant-unused",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        # A CPU prefill of the tools takes minutes; the CLI's defaults give up sooner: the
        # request after 10 minutes, a stream with no content for 5 (pings do not count).
        "API_TIMEOUT_MS": str(PREFILL_S * 1000),
        "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(PREFILL_S * 1000),
    }
    before = control_status(claude_daemon.socket_path)["requests"]
    result = subprocess.run(
        [
            str(claude),
            "-p",
            "Say hello.",
            # Workflow is the tool whose real schema (maxLength 524288) once crashed the daemon.
            "--tools",
            "Bash,Read,Workflow",
            # Explicit: a resumed -p session would otherwise rewrite the system prompt's model.
            "--model",
            "claude-sonnet-4-5",
            "--max-turns",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * PREFILL_S - 30,
        check=False,
    )
    claude_daemon.check_alive()
    requests = control_status(claude_daemon.socket_path)["requests"]
    assert requests["served"] > before["served"], f"no request was served:\n{result}"
    assert requests["tokens_generated"] > before["tokens_generated"], result
    assert "Unable to connect" not in result.stdout + result.stderr, result
    if result.returncode != 0:
        # Two ends the CLI reports as its own errors, each only after a complete reply: the
        # daemon's MAX_OUTPUT ceiling ended a rambling reply (stop_reason max_tokens), or the
        # model called a tool, which would need a second turn (--max-turns 1).
        said = result.stdout + result.stderr
        assert (
            "exceeded the 32000 output token maximum" in said or "Reached max turns (1)" in said
        ), result
    else:
        assert result.stdout.strip(), result
