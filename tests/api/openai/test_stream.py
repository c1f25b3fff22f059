"""Engine events → chat.completion.chunk bytes and the whole chat.completion; both parsed
back with the official `openai` SDK's types."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai.types.chat as sdk
import pytest

from pensieved.api.openai.stream import OpenAIStream, whole_completion
from pensieved.engine.types import (
    Event,
    Failed,
    Finished,
    Heartbeat,
    PromptCached,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from pensieved.errors import EngineError
from pensieved.wire.openai import ErrorDetail, ErrorEnvelope

TEXT_EVENTS: list[Event] = [
    Heartbeat(),
    PromptCached(cache_read_tokens=4),
    TextPiece("Hel"),
    Heartbeat(),
    TextPiece("lo"),
    Finished("end_turn", None, input_tokens=10, output_tokens=2, cache_read_tokens=4),
]
TOOL_EVENTS: list[Event] = [
    PromptCached(cache_read_tokens=0),
    TextPiece("Let me look."),
    ToolCallStart("weather"),
    ToolCallDelta('{"city": '),
    ToolCallDelta('"Oslo"}'),
    ToolCallEnd({"city": "Oslo"}),
    ToolCallStart("now"),
    ToolCallEnd({}),
    ToolCallStart("parsed_whole"),
    ToolCallEnd({"a": 1}),
    Finished("tool_use", None, input_tokens=10, output_tokens=9, cache_read_tokens=0),
]


def encode(events: list[Event], include_usage: bool = False) -> bytes:
    encoder = OpenAIStream("gpt-4o", include_usage)
    return b"".join(encoder.feed(e) for e in events)


def data_lines(raw: bytes) -> list[str]:
    """The `data:` payloads, with the SSE comments checked and dropped."""
    frames = raw.decode().split("\n\n")
    assert frames[-1] == ""
    out = []
    for frame in frames[:-1]:
        if frame.startswith(":"):
            continue
        assert frame.startswith("data: ") and "\n" not in frame, frame
        out.append(frame.removeprefix("data: "))
    return out


def chunks(raw: bytes) -> list[sdk.ChatCompletionChunk]:
    lines = data_lines(raw)
    assert lines[-1] == "[DONE]"
    return [sdk.ChatCompletionChunk.model_validate(json.loads(line)) for line in lines[:-1]]


def test_text_stream_order_role_first_finish_then_done() -> None:
    raw = encode(TEXT_EVENTS)
    assert raw.startswith(b": waiting for a slot\n\n")
    assert b": keep-alive\n\n" in raw
    parsed = chunks(raw)
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == "Hello"
    assert [c.choices[0].finish_reason for c in parsed][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in parsed[:-1])
    assert len({c.id for c in parsed}) == 1 and parsed[0].id.startswith("chatcmpl-")
    assert all(c.usage is None for c in parsed)


def test_every_choice_carries_finish_reason_and_logprobs_even_when_null() -> None:
    for line in data_lines(encode(TEXT_EVENTS))[:-1]:
        choice = json.loads(line)["choices"][0]
        assert "finish_reason" in choice and "logprobs" in choice


def test_include_usage_adds_a_choiceless_usage_chunk_before_done() -> None:
    parsed = chunks(encode(TEXT_EVENTS, include_usage=True))
    last = parsed[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (10, 2)
    assert last.usage.total_tokens == 12
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 4


def _assemble(parsed: list[sdk.ChatCompletionChunk]) -> dict[int, dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in parsed:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert entry["id"] is None, "the id comes once, first"
                    entry["id"] = call.id
                if call.function and call.function.name:
                    entry["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
    return calls


def test_tool_calls_stream_as_indexed_deltas_whose_arguments_parse() -> None:
    parsed = chunks(encode(TOOL_EVENTS))
    calls = _assemble(parsed)
    assert sorted(calls) == [0, 1, 2]
    assert [calls[i]["name"] for i in range(3)] == ["weather", "now", "parsed_whole"]
    assert [json.loads(calls[i]["arguments"]) for i in range(3)] == [
        {"city": "Oslo"},
        {},
        {"a": 1},
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == "Let me look."
    assert parsed[-1].choices[0].finish_reason == "tool_calls"


def test_reasoning_streams_as_reasoning_content() -> None:
    events: list[Event] = [
        PromptCached(cache_read_tokens=0),
        ThinkingPiece("hmm"),
        TextPiece("yes"),
        Finished("max_tokens", None, input_tokens=3, output_tokens=2, cache_read_tokens=0),
    ]
    lines = [json.loads(x) for x in data_lines(encode(events))[:-1]]
    deltas = [line["choices"][0]["delta"] for line in lines]
    assert {"reasoning_content": "hmm"} in deltas and {"content": "yes"} in deltas
    assert lines[-1]["choices"][0]["finish_reason"] == "length"


def test_a_failure_raises_for_the_handler_to_send_in_band() -> None:
    encoder = OpenAIStream("m", False)
    encoder.feed(PromptCached(cache_read_tokens=0))
    with pytest.raises(EngineError):
        encoder.feed(Failed(EngineError("boom")))
    detail = ErrorDetail(message="boom", type="server_error")
    raw = OpenAIStream.error(ErrorEnvelope(error=detail))
    assert json.loads(data_lines(raw)[0]) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }


async def _events(events: list[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event


def whole(events: list[Event]) -> sdk.ChatCompletion:
    reply = asyncio.run(whole_completion("gpt-4o", _events(events)))
    return sdk.ChatCompletion.model_validate(reply.model_dump(mode="json"))


def test_the_whole_reply_says_what_the_stream_said() -> None:
    for events in (TEXT_EVENTS, TOOL_EVENTS):
        streamed = chunks(encode(events))
        reply = whole(events)
        message = reply.choices[0].message
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        assert (message.content or "") == text
        calls = _assemble(streamed)
        assert [
            (c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()
        ] == [  # type: ignore[union-attr]
            (calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)
        ]
        assert reply.choices[0].finish_reason == streamed[-1].choices[0].finish_reason


def test_a_whole_reply_of_only_tool_calls_has_null_content_and_usage() -> None:
    only_call: list[Event] = [TOOL_EVENTS[0], *TOOL_EVENTS[2:]]
    reply = whole(only_call)
    assert reply.choices[0].message.content is None
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_an_empty_reply_is_empty_text() -> None:
    events: list[Event] = [
        PromptCached(cache_read_tokens=0),
        Finished("end_turn", None, input_tokens=3, output_tokens=1, cache_read_tokens=0),
    ]
    assert whole(events).choices[0].message.content == ""
