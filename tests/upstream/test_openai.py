"""Anthropic ↔ Chat Completions conversion: requests out, whole replies and streams back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pensieved.engine.types import (
    ChatMessage,
    Event,
    Finished,
    GenerationRequest,
    PromptCached,
    Sampling,
    TextPiece,
    ThinkingPiece,
    ToolCall,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolChoice,
    ToolSpec,
)
from pensieved.errors import UpstreamError
from pensieved.upstream import openai

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _request(**kwargs: Any) -> GenerationRequest:
    messages = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall("toolu_1", "weather", {"city": "Paris"}),)
        ),
        ChatMessage("tool", "Sunny", tool_call_id="toolu_1"),
    )
    return GenerationRequest(messages=messages, max_tokens=64, **kwargs)


def test_request_messages_and_options() -> None:
    body = openai.chat_request(
        _request(
            sampling=Sampling(temperature=0.2, top_p=0.9, top_k=40),
            stop_sequences=("END",),
            tools=(ToolSpec("weather", "Forecast", SCHEMA),),
            tool_choice=ToolChoice(mode="any", parallel=False),
        ),
        "big-model",
        stream=True,
    )
    assert body["model"] == "big-model" and body["max_tokens"] == 64
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]
    call = body["messages"][2]["tool_calls"][0]
    assert call["id"] == "toolu_1" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }
    assert body["messages"][2]["content"] == ""  # only a call: empty, but present
    assert body["messages"][3] == {"role": "tool", "content": "Sunny", "tool_call_id": "toolu_1"}
    assert body["tools"][0]["function"] == {
        "name": "weather",
        "description": "Forecast",
        "parameters": SCHEMA,
    }
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert body["stop"] == ["END"] and body["top_k"] == 40 and body["temperature"] == 0.2
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_request_named_tool_and_schema_output() -> None:
    body = openai.chat_request(
        _request(
            tools=(ToolSpec("weather", "", SCHEMA),),
            tool_choice=ToolChoice(mode="tool", name="weather", parallel=False),
            output_schema=SCHEMA,
        ),
        "m",
        stream=False,
    )
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert "description" not in body["tools"][0]["function"]
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert "stream_options" not in body and "top_k" not in body


def _completion(message: dict[str, Any], reason: str, usage: dict[str, Any] | None) -> bytes:
    data = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        "usage": usage,
    }
    return json.dumps(data).encode()


def test_whole_reply_with_tool_call_and_cached_usage() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 9,
        "total_tokens": 109,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    message = {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "The user wants weather.",
        "tool_calls": [
            {
                "id": "call_9",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }
    events = list(openai.reply_events(_completion(message, "stop", usage), thinking=True))
    assert events == [
        PromptCached(60),
        ThinkingPiece("The user wants weather."),
        TextPiece("Checking."),
        ToolCallStart("weather"),
        ToolCallDelta('{"city":"Oslo"}'),
        ToolCallEnd({"city": "Oslo"}),
        Finished("tool_use", None, 100, 9, 60),  # "stop" after a call is a tool_use stop
    ]
    no_thinking = list(
        openai.reply_events(_completion(message, "tool_calls", usage), thinking=False)
    )
    assert not any(isinstance(e, ThinkingPiece) for e in no_thinking)


@pytest.mark.parametrize(("reason", "stop"), [("stop", "end_turn"), ("length", "max_tokens")])
def test_whole_reply_stop_reasons(reason: str, stop: str) -> None:
    events = list(
        openai.reply_events(
            _completion({"role": "assistant", "content": "x"}, reason, None), thinking=False
        )
    )
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == stop


def test_tool_arguments_that_are_not_an_object_are_an_error() -> None:
    message = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "w", "arguments": "[1"}}
        ],
    }
    with pytest.raises(UpstreamError, match="not a JSON object"):
        list(openai.reply_events(_completion(message, "tool_calls", None), thinking=False))


def _chunk(
    delta: dict[str, Any], reason: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}]
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        "usage": usage,
    }


def _sse(chunks: list[dict[str, Any]], split: int = 7) -> list[bytes]:
    """The stream's bytes, cut into pieces that split lines and events anywhere."""
    text = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + "data: [DONE]\n\n"
    raw = text.encode()
    return [raw[i : i + split] for i in range(0, len(raw), split)]


def _collect(pieces: list[bytes], thinking: bool = False) -> list[Event]:
    async def source() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def run() -> list[Event]:
        return [e async for e in openai.stream_events(source(), thinking=thinking)]

    return asyncio.run(run())


def _call(
    index: int, *, name: str | None = None, args: str | None = None, id_: str | None = None
) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    return {"index": index, "id": id_, "type": "function" if id_ else None, "function": function}


def test_stream_text_then_two_tool_calls_with_usage() -> None:
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let me "}),
        _chunk({"content": "check."}),
        _chunk({"tool_calls": [_call(0, name="weather", args="", id_="call_a")]}),
        _chunk({"tool_calls": [_call(0, args='{"ci')]}),
        _chunk({"tool_calls": [_call(0, args='ty": "Oslo"}')]}),
        _chunk({"tool_calls": [_call(1, name="time", args='{"tz":"CET"}', id_="call_b")]}),
        _chunk({}, reason="tool_calls"),
        {
            **_chunk({}),
            "choices": [],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 20,
                "total_tokens": 70,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        },
    ]
    events = _collect(_sse(chunks))
    assert events == [
        PromptCached(0),
        TextPiece("Let me "),
        TextPiece("check."),
        ToolCallStart("weather"),
        ToolCallDelta('{"ci'),
        ToolCallDelta('ty": "Oslo"}'),
        ToolCallEnd({"city": "Oslo"}),
        ToolCallStart("time"),
        ToolCallDelta('{"tz":"CET"}'),
        ToolCallEnd({"tz": "CET"}),
        Finished("tool_use", None, 50, 20, 32),
    ]


def test_stream_reasoning_and_no_usage() -> None:
    chunks = [
        _chunk({"reasoning_content": "hmm"}),
        _chunk({"content": "Hi"}),
        _chunk({"content": "!"}, reason="length"),
    ]
    events = _collect(_sse(chunks, split=3), thinking=True)
    assert events[1:4] == [ThinkingPiece("hmm"), TextPiece("Hi"), TextPiece("!")]
    # Without a usage chunk the output is counted in chunks and the prompt is unknown (0).
    assert events[-1] == Finished("max_tokens", None, 0, 3, 0)


def test_stream_interleaved_tool_calls_are_refused() -> None:
    chunks = [
        _chunk({"tool_calls": [_call(0, name="a", args='{"x":', id_="1")]}),
        _chunk({"tool_calls": [_call(1, name="b", args="{}", id_="2")]}),
        _chunk({"tool_calls": [_call(0, args="1}")]}),
    ]
    with pytest.raises(UpstreamError, match="interleave"):
        _collect(_sse(chunks))


def test_stream_error_event_and_garbage() -> None:
    with pytest.raises(UpstreamError, match="out of memory"):
        _collect([b'data: {"error": {"message": "out of memory"}}\n\n'])
    with pytest.raises(UpstreamError, match="not JSON"):
        _collect([b"data: {oops\n\n"])
    with pytest.raises(UpstreamError, match="before its first chunk"):
        _collect([b"data: [DONE]\n\n"])
