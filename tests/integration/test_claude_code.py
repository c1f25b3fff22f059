"""Requests shaped like Claude Code's, against the real daemon.

The tools and system prompt are written for this test in the style Claude Code sends them
(draft 2020-12 schemas, `additionalProperties: false`, enums, `anyOf` with `const`,
`propertyNames`, `exclusiveMinimum`, formats, patterns, bounds), at a realistic size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.integration.daemon import DaemonProcess, prompt_tokens, start_daemon

BETAS = (
    "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,"
    "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27"
)
HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": BETAS,
    "x-api-key": "sk-ant-unused",
    "user-agent": "claude-cli/2.0.0 (external, cli)",
    "x-app": "cli",
}
SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": SCHEMA,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def text(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


CORE_TOOLS: list[dict[str, Any]] = [
    {
        "name": "Bash",
        "description": "Executes a given bash command in a persistent shell session with an "
        "optional timeout, ensuring proper handling and security measures. " * 6,
        "input_schema": obj(
            {
                "command": text("The command to execute"),
                "timeout": {"type": "number", "description": "Optional timeout in ms (max 600000)"},
                "description": text("Clear, concise description of what this command does"),
                "run_in_background": {"type": "boolean"},
            },
            ["command"],
        ),
    },
    {
        "name": "Read",
        "description": "Reads a file from the local filesystem. Usage: the file_path parameter "
        "must be an absolute path, not a relative path. " * 8,
        "input_schema": obj(
            {
                "file_path": text("The absolute path to the file to read"),
                "offset": {"type": "integer", "exclusiveMinimum": 0},
                "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 2000},
            },
            ["file_path"],
        ),
    },
    {
        "name": "Edit",
        "description": "Performs exact string replacements in files. " * 10,
        "input_schema": obj(
            {
                "file_path": text("The absolute path to the file to modify"),
                "old_string": text("The text to replace"),
                "new_string": text("The text to replace it with (must differ from old_string)"),
                "replace_all": {"type": "boolean", "default": False},
            },
            ["file_path", "old_string", "new_string"],
        ),
    },
    {
        "name": "Write",
        "description": "Writes a file to the local filesystem, overwriting it. " * 6,
        "input_schema": obj(
            {"file_path": text("Absolute path"), "content": text("The content to write")},
            ["file_path", "content"],
        ),
    },
    {
        "name": "Glob",
        "description": "Fast file pattern matching tool that works with any codebase size. " * 5,
        "input_schema": obj(
            {"pattern": text("The glob pattern"), "path": text("The directory to search in")},
            ["pattern"],
        ),
    },
    {
        "name": "Grep",
        "description": "A powerful search tool built on ripgrep. " * 12,
        "input_schema": obj(
            {
                "pattern": text("The regular expression pattern to search for"),
                "path": text("File or directory to search in"),
                "glob": text("Glob pattern to filter files"),
                "output_mode": {
                    "type": "string",
                    "enum": ["content", "files_with_matches", "count"],
                },
                "-B": {"type": "number"},
                "-A": {"type": "number"},
                "-n": {"type": "boolean"},
                "-i": {"type": "boolean"},
                "type": text("File type to search"),
                "head_limit": {"type": "number"},
                "multiline": {"type": "boolean"},
            },
            ["pattern"],
        ),
    },
    {
        "name": "TodoWrite",
        "description": "Use this tool to create and manage a structured task list. " * 15,
        "input_schema": obj(
            {
                "todos": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "content": {"type": "string", "minLength": 1},
                            "status": {
                                "type": "string",
                                "enum": ["pending", "in_progress", "completed"],
                            },
                            "activeForm": {"type": "string", "minLength": 1},
                        },
                        "required": ["content", "status", "activeForm"],
                        "additionalProperties": False,
                    },
                }
            },
            ["todos"],
        ),
    },
    {
        "name": "WebFetch",
        "description": "Fetches content from a specified URL and processes it. " * 6,
        "input_schema": obj(
            {"url": text("The URL to fetch", format="uri"), "prompt": text("What to extract")},
            ["url", "prompt"],
        ),
    },
    {
        "name": "Task",
        "description": "Launch a new agent to handle complex, multi-step tasks. " * 10,
        "input_schema": obj(
            {
                "description": text("A short (3-5 word) description of the task"),
                "prompt": text("The task for the agent to perform"),
                "subagent_type": {
                    "anyOf": [
                        {"const": "general-purpose"},
                        {"const": "statusline-setup"},
                        {"const": "output-style-setup"},
                    ]
                },
            },
            ["description", "prompt", "subagent_type"],
        ),
    },
    {
        "name": "NotebookEdit",
        "description": "Completely replaces the contents of a specific cell in a notebook. " * 5,
        "input_schema": obj(
            {
                "notebook_path": text("Absolute path", pattern="^/.*\\.ipynb$"),
                "cell_id": text("The ID of the cell to edit"),
                "new_source": text("The new source for the cell"),
                "cell_type": {"type": "string", "enum": ["code", "markdown"]},
                "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]},
            },
            ["notebook_path", "new_source"],
        ),
    },
    {
        "name": "BashOutput",
        "description": "Retrieves output from a running or completed background bash shell. " * 4,
        "input_schema": obj(
            {"bash_id": text("The ID of the background shell"), "filter": text("A regex")},
            ["bash_id"],
        ),
    },
    {
        "name": "AskUserQuestion",
        "description": "Ask the user questions with multiple-choice answers. " * 6,
        "input_schema": obj(
            {
                "questions": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "question": {"type": "string"},
                            "header": {"type": "string", "maxLength": 12},
                            "options": {
                                "type": "array",
                                "minItems": 2,
                                "maxItems": 4,
                                "items": obj(
                                    {
                                        "label": {"type": "string"},
                                        "description": {"type": "string"},
                                    },
                                    ["label", "description"],
                                ),
                            },
                            "multiSelect": {"type": "boolean"},
                        },
                        "required": ["question", "header", "options", "multiSelect"],
                        "additionalProperties": False,
                    },
                },
                "answers": {
                    "type": "object",
                    "propertyNames": {"type": "string"},
                    "additionalProperties": {"type": "string"},
                },
            },
            ["questions"],
        ),
    },
]

# MCP-style tools, as a user with a few MCP servers would have them.
MCP_TOOLS: list[dict[str, Any]] = [
    {
        "name": f"mcp__{server}__{action}",
        "description": f"{action.replace('_', ' ').capitalize()} in {server}. " * 8,
        "input_schema": obj(
            {
                "id": text("Identifier", pattern="^[A-Za-z0-9_-]{1,64}$"),
                "page": {"type": "integer", "minimum": 1, "maximum": 1000},
                "since": text("ISO timestamp", format="date-time"),
                "labels": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "state": {"anyOf": [{"const": "open"}, {"const": "closed"}]},
                "options": {
                    "type": "object",
                    "properties": {"verbose": {"type": "boolean"}, "depth": {"type": "integer"}},
                    "additionalProperties": False,
                },
            },
            ["id"],
        ),
    }
    for server, action in [
        ("github", "list_issues"),
        ("github", "get_pull_request"),
        ("linear", "search_tickets"),
        ("linear", "update_ticket"),
        ("sentry", "get_event"),
        ("sentry", "list_projects"),
        ("postgres", "describe_table"),
        ("slack", "read_channel"),
    ]
]

TOOLS = CORE_TOOLS + MCP_TOOLS

SYSTEM_PROMPT = (
    "You are Claude Code, Anthropic's official CLI for Claude. You are an interactive CLI tool "
    "that helps users with software engineering tasks. Use the instructions below and the tools "
    "available to you to assist the user.\n\n"
    + "IMPORTANT: Assist with defensive security tasks only. Keep responses short. "
    * 60
    + "\n\nHere is useful information about the environment you are running in:\n<env>\n"
    "Working directory: /home/dev/project\nIs directory a git repo: Yes\nPlatform: linux\n</env>"
)


def request_body(billing: str, last_user: str) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 64000,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": "user_abc_account_123_session_456"},
        "system": [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.0; {billing}"},
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": TOOLS,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Context: none</system-reminder>"},
                    {
                        "type": "text",
                        "text": "What files are in this project?",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should list files.", "signature": "abc"},
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01ABC",
                        "name": "Glob",
                        "input": {"pattern": "**/*"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01ABC",
                        "content": [{"type": "text", "text": "README.md\nsrc/main.py"}],
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            },
            {"role": "system", "content": "The user changed the working directory."},
            {"role": "user", "content": last_user},
        ],
    }


@pytest.fixture(scope="module")
def cc_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon set up as docs/claude-code.md tells Claude Code users to (for the tiny model)."""
    d = start_daemon(
        Path(tmp_path_factory.mktemp("cc")),
        {"model": {"context_size": 16384, "slots": 1, "max_output_tokens": 48}},
    )
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for chunk in response.text.strip("\n").split("\n\n"):
        name_line, data_line = chunk.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        events.append(data)
    return events


def test_claude_code_request_streams_a_valid_reply(cc_daemon: DaemonProcess) -> None:
    with httpx.Client(base_url=cc_daemon.base_url, timeout=600) as http:
        assert http.head("/").status_code == 200
        body = request_body("cc_entrypoint=cli; session=aaaa1111", "Which file is the entry?")
        first = http.post("/v1/messages?beta=true", json=body, headers=HEADERS)
        assert first.status_code == 200, first.text
        events = read_sse(first)
        names = [e["type"] for e in events]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        assert names[-2] == "message_delta"
        start = events[0]["message"]
        assert start["model"] == "claude-sonnet-4-5-20250929"
        input_tokens = prompt_tokens(start["usage"])
        assert input_tokens > 6000, "the tools and system prompt should be in the prompt"
        # Every block opens, receives deltas of its own type, and closes, in order.
        open_index = None
        for event in events:
            if event["type"] == "content_block_start":
                assert open_index is None
                open_index = event["index"]
            elif event["type"] == "content_block_delta":
                assert event["index"] == open_index
            elif event["type"] == "content_block_stop":
                assert event["index"] == open_index
                open_index = None
        assert open_index is None
        delta = events[-2]
        # max_tokens 64000 is clamped (to model.max_output_tokens here), never rejected.
        assert 0 < delta["usage"]["output_tokens"] <= 48
        assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")

        # A new session: other billing header, another last question. All but the tail of
        # the prompt is the same tokens, so it comes from the KV cache.
        body = request_body("cc_entrypoint=cli; session=bbbb2222", "Now explain README.md.")
        second = http.post("/v1/messages?beta=true", json=body, headers=HEADERS)
        assert second.status_code == 200
        usage = read_sse(second)[-2]["usage"]
        tail = http.post(
            "/v1/messages/count_tokens?beta=true",
            json={
                "model": "x",
                "messages": [{"role": "user", "content": "Now explain README.md."}],
            },
            headers=HEADERS,
        ).json()["input_tokens"]
        assert usage["input_tokens"] <= tail
        assert usage["cache_read_input_tokens"] > 0.95 * prompt_tokens(usage)

        # count_tokens as /context sends it: no system, string content, empty tools.
        counted = http.post(
            "/v1/messages/count_tokens?beta=true",
            json={
                "model": "claude-opus-4-1",
                "tools": [],
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers=HEADERS,
        )
        assert counted.status_code == 200 and counted.json()["input_tokens"] > 0

        # And the same request counted exactly.
        count_body = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
        exact = http.post("/v1/messages/count_tokens?beta=true", json=count_body, headers=HEADERS)
        assert exact.json()["input_tokens"] == prompt_tokens(usage)


def test_billing_header_is_not_in_the_prompt(cc_daemon: DaemonProcess) -> None:
    with httpx.Client(base_url=cc_daemon.base_url, timeout=600) as http:
        counts = []
        for billing in ("a", "a much longer and entirely different billing header value " * 5):
            body = request_body(billing, "hi")
            body = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
            r = http.post("/v1/messages/count_tokens?beta=true", json=body, headers=HEADERS)
            counts.append(r.json()["input_tokens"])
        assert counts[0] == counts[1]
