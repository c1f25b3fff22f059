"""Every content block type and role of the Messages API is served or refused in one line."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pensieved.api.convert import to_generation_request
from pensieved.api.handlers import validation_message
from pensieved.errors import InvalidRequestError, UnsupportedContentError
from pensieved.wire.anthropic import MessagesRequest

TOOLS = [{"name": "Read", "input_schema": {"type": "object"}}]
USE = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}


def convert(*blocks: dict[str, Any], role: str = "user") -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": [USE]},
        {"role": role, "content": list(blocks)},
    ]
    body = {"model": "m", "max_tokens": 8, "messages": messages, "tools": TOOLS}
    to_generation_request(MessagesRequest.model_validate(body))


def result_of(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": "toolu_1", "content": list(parts)}


TEXT = {"type": "text", "text": "x"}
SEARCH_RESULT = {"type": "search_result", "source": "s", "title": "t", "content": [TEXT]}
SERVED = [
    TEXT,
    SEARCH_RESULT,
    {"type": "thinking", "thinking": "hm", "signature": "sig"},
    {"type": "redacted_thinking", "data": "opaque"},
    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"},
    result_of(TEXT, SEARCH_RESULT),
    {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}, "citations": None},
]
# Anthropic's server-side block types: nothing a local model produced or can act on.
REFUSED = [
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
    "container_upload",
    "a_type_from_next_year",
]


@pytest.mark.parametrize("block", SERVED, ids=lambda b: str(b["type"]))
def test_served_blocks_convert(block: dict[str, Any]) -> None:
    convert(block)


@pytest.mark.parametrize("kind", REFUSED)
def test_refused_block_types_get_one_line_naming_path_and_type(kind: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        convert(TEXT, {"type": kind, "id": "x", "content": []})
    assert str(error.value) == f'messages.2.content.1: block type "{kind}" is not supported'


@pytest.mark.parametrize("kind", ["web_search_result", "image_generation", "container_upload"])
def test_refused_types_inside_a_tool_result_name_their_path(kind: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        convert(result_of(TEXT, {"type": kind}))
    assert (
        str(error.value) == f'messages.2.content.0.content.1: block type "{kind}" is not supported'
    )


@pytest.mark.parametrize(
    "block", [{"type": "image", "source": {}}, {"type": "document", "source": {}}]
)
def test_media_is_refused_as_the_model_cannot_read_it(block: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedContentError, match=r"^messages\.2\.content\.0: .* support"):
        convert(block)
    with pytest.raises(UnsupportedContentError, match=r"^messages\.2\.content\.0\.content\.0: "):
        convert(result_of(block))


def problems(body_fields: dict[str, Any]) -> str:
    body = {"model": "m", "max_tokens": 8, **body_fields}
    with pytest.raises(ValidationError) as error:
        MessagesRequest.model_validate(body)
    return validation_message(error.value)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "ctx", "content": "x"}], 'messages.0.role: role "ctx" is not supported'),
        ([{"role": "msg", "content": "x"}], 'messages.0.role: role "msg" is not supported'),
        (
            [{"role": "user", "content": 5}],
            "messages.0.content: Input should be a string or a list of content blocks",
        ),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages.0.content.0.type: Field"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content.0.text: Field"),
        (
            [{"role": "user", "content": [result_of({"type": "text"})]}],
            "messages.0.content.0.content.0.text: Field required",
        ),
        (
            [{"role": "user", "content": [result_of({"type": "tool_reference"})]}],
            "messages.0.content.0.content.0.tool_name: Field required",
        ),
    ],
)
def test_malformed_blocks_and_roles_get_one_problem_per_path(
    messages: list[dict[str, Any]], expected: str
) -> None:
    message = problems({"messages": messages})
    assert message.startswith(expected)
    assert ";" not in message  # one line, one problem: no dump of union branches


def test_the_documented_roles_are_served() -> None:
    for role in ("user", "assistant"):
        convert(TEXT, role=role)
    convert(TEXT, role="system")  # mid-conversation system messages, as Claude Code sends them
