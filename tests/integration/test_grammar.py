"""Schemas with bounds no grammar can enforce safely, against the real daemon.

Claude Code's `Workflow` tool has `"maxLength": 524288`; written out as a grammar that bound
nested 524,288 levels deep and llama.cpp's parser overflowed its stack (the daemon died with
SIGSEGV on every Claude Code request). The bound is now dropped and logged.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.daemon import DaemonProcess

MODEL = "claude-sonnet-4-6"

WORKFLOW: dict[str, Any] = {
    "name": "Workflow",
    "description": "Run a workflow script.",
    "input_schema": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "script": {"type": "string", "maxLength": 524288},
            "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 1_000_000},
            "timeout": {"type": "integer", "minimum": 1, "maximum": 10**30},
            "id": {"type": "string", "pattern": "^wf_[a-z0-9]{1,100000}$"},
        },
        "required": ["script"],
    },
}


@pytest.mark.parametrize(
    "tool_choice", [{"type": "tool", "name": "Workflow"}, {"type": "auto"}], ids=["tool", "auto"]
)
def test_huge_bounds_are_served_and_the_daemon_lives(
    daemon: DaemonProcess, tool_choice: dict[str, Any]
) -> None:
    message = daemon.client().messages.create(
        model=MODEL,
        max_tokens=48,
        tools=[WORKFLOW],
        tool_choice=tool_choice,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Run a workflow script that prints hello."}],
        extra_body={"temperature": 0},
    )
    if tool_choice["type"] == "tool":
        calls = [block for block in message.content if block.type == "tool_use"]
        assert [call.name for call in calls] == ["Workflow"], message.content
    assert daemon.proc.poll() is None
    assert daemon.http().get("/health").status_code == 200
    log = daemon.log_text()
    assert "Workflow: maxLength 524288 (over 256)" in log
    assert "pattern quantifier {1,100000}" in log
