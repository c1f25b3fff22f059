"""Wire requests → engine requests, and engine events → content blocks and SSE payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pensieved.api.convert import to_generation_request
from pensieved.api.replies import ReplyBuilder
from pensieved.engine.types import (
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolChoice,
)
from pensieved.errors import InvalidRequestError
from pensieved.wire.anthropic import (
    MessagesRequest,
    OutTextBlock,
    OutThinkingBlock,
    OutToolUseBlock,
)

TOOL = {"name": "Read", "input_schema": {"type": "object"}}


def request(**fields: Any) -> MessagesRequest:
    body: dict[str, Any] = {
        "model": "claude-opus-4-1",
        "max_tokens": 64000,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }
    return MessagesRequest.model_validate(body)


def test_billing_header_block_is_dropped_and_system_kept() -> None:
    body = request(
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; x=1"},
            {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}},
        ]
    )
    messages = to_generation_request(body).messages
    assert messages[0].role == "system" and messages[0].content == "You are helpful."


def test_mid_conversation_system_message_is_kept_in_place() -> None:
    body = request(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "note"},
            {"role": "user", "content": "c"},
        ]
    )
    assert [m.role for m in to_generation_request(body).messages] == [
        "user",
        "assistant",
        "system",
        "user",
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ToolChoice("auto", None, True)),
        ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto", None, False)),
        ({"type": "any"}, ToolChoice("any", None, False)),
        ({"type": "tool", "name": "Read"}, ToolChoice("tool", "Read", False)),
        ({"type": "none"}, ToolChoice("none", None, False)),
    ],
)
def test_tool_choice(choice: dict[str, Any] | None, expected: ToolChoice) -> None:
    fields: dict[str, Any] = {"tools": [TOOL]}
    if choice is not None:
        fields["tool_choice"] = choice
    assert to_generation_request(request(**fields)).tool_choice == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "Write"}},
        {"tools": [TOOL], "tool_choice": {"type": "tool"}},
        {"tool_choice": {"type": "any"}},
        {"tools": [], "tool_choice": {"type": "tool", "name": "Read"}},
    ],
)
def test_impossible_tool_choice_is_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        to_generation_request(request(**fields))


def test_output_format_and_thinking() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    converted = to_generation_request(
        request(
            output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}},
            thinking={"type": "adaptive"},
            context_management={"edits": []},
        )
    )
    assert converted.output_schema == schema
    assert converted.thinking is True
    beta = to_generation_request(
        request(
            output_format={"type": "json_schema", "schema": schema}, thinking={"type": "disabled"}
        )
    )
    assert beta.output_schema == schema and beta.thinking is False
    assert to_generation_request(request()).thinking is False


def feed_all(events: list[Any]) -> tuple[ReplyBuilder, list[dict[str, Any]]]:
    builder = ReplyBuilder()
    payloads: list[dict[str, Any]] = []
    for event in events:
        payloads += [e.model_dump(mode="json") for e in builder.feed(event)]
    payloads += [e.model_dump(mode="json") for e in builder.finish()]
    return builder, payloads


def test_reply_blocks_and_stream_agree() -> None:
    args = {"file_path": "/a b.txt", "limit": 3}
    encoded = json.dumps(args)
    builder, payloads = feed_all(
        [
            ThinkingPiece("Let me "),
            ThinkingPiece("think."),
            TextPiece("Reading "),
            TextPiece("it."),
            ToolCallStart("Read"),
            ToolCallDelta(encoded[:5]),
            ToolCallDelta(encoded[5:]),
            ToolCallEnd(args),
            ToolCallStart("Read"),
            ToolCallEnd({"file_path": "/b"}),  # parsed whole: input sent as one delta
        ]
    )
    blocks = builder.blocks
    assert [type(b) for b in blocks] == [
        OutThinkingBlock,
        OutTextBlock,
        OutToolUseBlock,
        OutToolUseBlock,
    ]
    assert isinstance(blocks[0], OutThinkingBlock) and blocks[0].thinking == "Let me think."
    assert blocks[0].signature
    assert isinstance(blocks[2], OutToolUseBlock) and blocks[2].input == args
    assert blocks[2].id.startswith("toolu_") and blocks[2].id != blocks[3].id
    # Rebuild the blocks from the stream alone, as an SDK does.
    rebuilt: dict[int, dict[str, Any]] = {}
    for p in payloads:
        if p["type"] == "content_block_start":
            rebuilt[p["index"]] = {**p["content_block"], "_json": ""}
        elif p["type"] == "content_block_delta":
            block, delta = rebuilt[p["index"]], p["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                block["_json"] += delta["partial_json"]
    for index, block in rebuilt.items():
        if block["type"] == "tool_use":
            block["input"] = json.loads(block["_json"])
        del block["_json"]
        assert block == blocks[index].model_dump(mode="json")
    starts = [p["index"] for p in payloads if p["type"] == "content_block_start"]
    stops = [p["index"] for p in payloads if p["type"] == "content_block_stop"]
    assert starts == stops == [0, 1, 2, 3]


def test_empty_reply_has_one_empty_text_block() -> None:
    builder, payloads = feed_all([])
    assert builder.blocks == [OutTextBlock(text="")]
    assert [p["type"] for p in payloads] == ["content_block_start", "content_block_stop"]
