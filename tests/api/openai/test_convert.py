"""OpenAI requests → engine requests, table-driven; and every refusal names its field."""

from __future__ import annotations

from typing import Any

import pytest

from pensieved.api.openai.convert import (
    JSON_OBJECT_SCHEMA,
    UNBOUNDED_MAX_TOKENS,
    to_generation_request,
)
from pensieved.engine.types import ChatMessage, GenerationRequest, ToolCall, ToolChoice
from pensieved.errors import (
    InvalidRequestError,
    UnsupportedContentError,
    UnsupportedParameterError,
)
from pensieved.wire.openai import ChatCompletionRequest

USER = {"role": "user", "content": "hi"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def convert(**fields: Any) -> GenerationRequest:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [USER], **fields}
    return to_generation_request(ChatCompletionRequest.model_validate(body))


MESSAGE_CASES: list[tuple[str, list[dict[str, Any]], list[ChatMessage]]] = [
    ("plain user", [USER], [ChatMessage(role="user", content="hi")]),
    (
        "system and developer both become system, in place",
        [
            {"role": "system", "content": "a"},
            USER,
            {"role": "developer", "content": [{"type": "text", "text": "b"}]},
        ],
        [
            ChatMessage(role="system", content="a"),
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="system", content="b"),
        ],
    ),
    (
        "text parts are joined by newlines",
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
        [ChatMessage(role="user", content="a\nb")],
    ),
    (
        "assistant tool calls parse their arguments; the tool result is named after its call",
        [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "now", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "9"}]},
        ],
        [
            ChatMessage(role="user", content="hi"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=(
                    ToolCall(id="call_1", name="weather", arguments={"city": "Oslo"}),
                    ToolCall(id="call_2", name="now", arguments={}),
                ),
            ),
            ChatMessage(role="tool", content="cold", tool_call_id="call_1", name="weather"),
            ChatMessage(role="tool", content="9", tool_call_id="call_2", name="now"),
        ],
    ),
    (
        "an earlier refusal is replayed as the assistant's text",
        [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
        [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="no")],
    ),
    (
        "an earlier refusal given as the refusal field, too",
        [USER, {"role": "assistant", "content": None, "refusal": "no"}],
        [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="no")],
    ),
]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [(m, e) for _, m, e in MESSAGE_CASES],
    ids=[name for name, _, _ in MESSAGE_CASES],
)
def test_messages(messages: list[dict[str, Any]], expected: list[ChatMessage]) -> None:
    assert list(convert(messages=messages).messages) == expected


CHOICE_CASES: list[tuple[dict[str, Any], ToolChoice]] = [
    ({"tools": [WEATHER]}, ToolChoice(mode="auto", parallel=True)),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, ToolChoice(mode="auto", parallel=False)),
    ({"tools": [WEATHER], "tool_choice": "none"}, ToolChoice(mode="none", parallel=False)),
    ({"tools": [WEATHER], "tool_choice": "required"}, ToolChoice(mode="any", parallel=False)),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        ToolChoice(mode="tool", name="weather", parallel=False),
    ),
]


@pytest.mark.parametrize(("fields", "expected"), CHOICE_CASES)
def test_tool_choice(fields: dict[str, Any], expected: ToolChoice) -> None:
    request = convert(**fields)
    assert request.tool_choice == expected
    assert request.tools[0].name == "weather"
    assert request.tools[0].parameters == WEATHER["function"]["parameters"]


def test_a_tool_without_parameters_takes_an_empty_object() -> None:
    tool = {"type": "function", "function": {"name": "now"}}
    assert convert(tools=[tool]).tools[0].parameters == {"type": "object", "properties": {}}


OPTION_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults", {}, {"max_tokens": UNBOUNDED_MAX_TOKENS, "output_schema": None, "stops": ()}),
    ("max_tokens", {"max_tokens": 5}, {"max_tokens": 5}),
    (
        "max_completion_tokens wins",
        {"max_tokens": 5, "max_completion_tokens": 7},
        {"max_tokens": 7},
    ),
    ("one stop string", {"stop": "END"}, {"stops": ("END",)}),
    ("stop list", {"stop": ["a", "b"]}, {"stops": ("a", "b")}),
    (
        "json_object",
        {"response_format": {"type": "json_object"}},
        {"output_schema": JSON_OBJECT_SCHEMA},
    ),
    ("text format", {"response_format": {"type": "text"}}, {"output_schema": None}),
    (
        "json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMA},
            }
        },
        {"output_schema": SCHEMA},
    ),
    (
        "sampling",
        {"temperature": 0, "top_p": 0.5, "seed": 3, "top_k": 4},
        {"sampling": (0.0, 0.5, 4, 3)},
    ),
    ("no reasoning by default", {}, {"thinking": False}),
    ("reasoning_effort asks for reasoning", {"reasoning_effort": "low"}, {"thinking": True}),
    ("reasoning_effort none", {"reasoning_effort": "none"}, {"thinking": False}),
    ("n=1 and zero penalties are fine", {"n": 1, "presence_penalty": 0, "logprobs": False}, {}),
    (
        "ignored fields",
        {"user": "u", "store": False, "metadata": {"a": "b"}, "foo": None, "modalities": ["text"]},
        {},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [(f, e) for _, f, e in OPTION_CASES],
    ids=[name for name, _, _ in OPTION_CASES],
)
def test_options(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    request = convert(**fields)
    s = request.sampling
    seen = {
        "max_tokens": request.max_tokens,
        "output_schema": request.output_schema,
        "stops": request.stop_sequences,
        "sampling": (s.temperature, s.top_p, s.top_k, s.seed),
        "thinking": request.thinking,
    }
    assert {k: seen[k] for k in expected} == expected


REFUSALS: list[tuple[dict[str, Any], type[InvalidRequestError], str, str]] = [
    ({"n": 2}, UnsupportedParameterError, "n", "unsupported_value"),
    ({"logprobs": True}, UnsupportedParameterError, "logprobs", "unsupported_value"),
    ({"top_logprobs": 3}, UnsupportedParameterError, "top_logprobs", "unsupported_value"),
    (
        {"frequency_penalty": 0.5},
        UnsupportedParameterError,
        "frequency_penalty",
        "unsupported_value",
    ),
    ({"presence_penalty": -1}, UnsupportedParameterError, "presence_penalty", "unsupported_value"),
    ({"logit_bias": {"50256": -100}}, UnsupportedParameterError, "logit_bias", "unsupported_value"),
    ({"top_k": -1}, UnsupportedParameterError, "top_k", "unsupported_value"),
    (
        {"prediction": {"type": "content", "content": "x"}},
        UnsupportedParameterError,
        "prediction",
        "unsupported_parameter",
    ),
    (
        {"functions": [{"name": "f"}]},
        UnsupportedParameterError,
        "functions",
        "unsupported_parameter",
    ),
    ({"audio": {"voice": "alloy"}}, UnsupportedParameterError, "audio", "unsupported_parameter"),
    (
        {"modalities": ["text", "audio"]},
        UnsupportedParameterError,
        "modalities",
        "unsupported_parameter",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}
            ]
        },
        UnsupportedContentError,
        "messages.0.content.0",
        "",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
                    ],
                }
            ]
        },
        UnsupportedContentError,
        "messages.0.content.0",
        "",
    ),
    (
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                },
            ]
        },
        InvalidRequestError,
        "messages.1.tool_calls.0.function.arguments",
        "",
    ),
    (
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                },
            ]
        },
        InvalidRequestError,
        "messages.1.tool_calls.0.function.arguments",
        "",
    ),
    ({"tool_choice": "required"}, InvalidRequestError, "tool_choice", ""),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        InvalidRequestError,
        "tool_choice",
        "",
    ),
]


@pytest.mark.parametrize(("fields", "kind", "param", "code"), REFUSALS)
def test_refusals_name_the_field(
    fields: dict[str, Any], kind: type[InvalidRequestError], param: str, code: str
) -> None:
    with pytest.raises(kind) as info:
        convert(**fields)
    assert info.value.param == param
    assert str(info.value).startswith(param)
    if code:
        assert getattr(info.value, "code", None) == code
