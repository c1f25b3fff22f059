"""Real vendors' chat templates through `model.chat_template`, against the real daemon.

Two templates that used to fail on every request: Command-R7B's (Jinja's `break`) on the
bundled SmolLM2, and Gemma 2's (it refuses the system role: the system prompt is folded into
the first user turn) on Gemma 3 270M, whose vocabulary has Gemma's turn tokens. And a
template that cannot render at all, reported when the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from tests.chat_templates import TEMPLATES
from tests.integration.daemon import (
    REPO,
    DaemonProcess,
    control_status,
    start_daemon,
    wait_for,
    write_config,
)

GEMMA = REPO / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
COMMAND_R7B = TEMPLATES / "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja"
GEMMA2 = TEMPLATES / "google-gemma-2-2b-it.jinja"
SYSTEM = "You are a terse assistant. Answer in one short sentence."

LIST_FILES: ToolParam = {
    "name": "list_files",
    "description": "List the files in a directory.",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
    },
}
ROUND_TRIP: list[MessageParam] = [
    {"role": "user", "content": "Which files are in /tmp?"},
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "list_files", "input": {"path": "/tmp"}}
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "notes.txt\nplan.md"},
            {"type": "text", "text": "Name one of them."},
        ],
    },
]

pytestmark = pytest.mark.skipif(
    not TEMPLATES.is_dir(), reason=f"the chat templates ({TEMPLATES}) are absent"
)


def answers_a_question(d: DaemonProcess, model: str) -> None:
    reply = d.client(timeout=300).messages.create(
        model=model,
        max_tokens=12,
        extra_body={"temperature": 0},
        system=SYSTEM,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert reply.usage.output_tokens > 0
    assert reply.content and reply.content[0].type == "text" and reply.content[0].text.strip()


def answers(d: DaemonProcess, model: str) -> None:
    """A plain question and a tool round trip both get an answer; the system prompt counts."""
    answers_a_question(d, model)
    client = d.client(timeout=300)

    reply = client.messages.create(
        model=model,
        max_tokens=12,
        extra_body={"temperature": 0},
        system=SYSTEM,
        tools=[LIST_FILES],
        messages=ROUND_TRIP,
    )
    assert reply.usage.output_tokens > 0 and reply.content

    # The system prompt reaches the prompt (a template that refuses it has it folded in).
    question: list[MessageParam] = [{"role": "user", "content": "Hi"}]
    with_system = client.messages.count_tokens(model=model, system=SYSTEM, messages=question)
    without = client.messages.count_tokens(model=model, messages=question)
    assert with_system.input_tokens > without.input_tokens + 10


def test_gemma_2s_template_answers_with_the_system_prompt_folded_in(tmp_path: Path) -> None:
    assert GEMMA.is_file(), f"{GEMMA} is missing: `make install` assembles it"
    d = start_daemon(tmp_path, {"model": {"model_path": str(GEMMA), "chat_template": str(GEMMA2)}})
    try:
        answers(d, "claude-sonnet-4-6")
        status = control_status(d.socket_path)
        assert status["state"] == "ready" and not status["error"]
    finally:
        assert d.stop() == 0


def test_a_template_that_cannot_render_is_reported_at_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}")
    d = start_daemon(tmp_path, {"model": {"chat_template": str(broken)}}, want_status="error")
    try:
        with d.http() as http:
            health = http.get("/health")
        assert health.status_code == 503
        error = health.json()["error"]
        assert str(broken) in error and "no_such_filter" in error and "will fail" in error
        assert control_status(d.socket_path)["error"] == error
        with pytest.raises(anthropic.APIStatusError) as refused:
            d.client().messages.create(
                model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
            )
        assert refused.value.status_code == 503 and "no_such_filter" in str(refused.value)
        # Logged once, at load (the refused request's access line names it as well).
        errors = [line for line in d.log_text().splitlines() if " ERROR " in line]
        assert sum("no_such_filter" in line for line in errors) == 1

        data = json.loads(d.config_path.read_text())
        data["model"]["chat_template"] = str(COMMAND_R7B)  # one that needs `break`
        write_config(d.config_path, data)
        wait_for(lambda: control_status(d.socket_path)["state"] == "ready", 30)
        answers_a_question(d, "m")
        assert not control_status(d.socket_path)["error"]
    finally:
        assert d.stop() == 0
