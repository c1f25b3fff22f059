"""The Chat Completions wire models: they parse what clients and servers send, and what they
produce is what the official `openai` SDK parses."""

from __future__ import annotations

from typing import Any

import openai.types.chat as sdk
import pytest
from pydantic import ValidationError

from pensieved.wire.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChunkChoice,
    CompletionUsage,
    DeveloperMessage,
    ErrorEnvelope,
    FunctionCall,
    ImagePart,
    JSONSchemaSpec,
    NamedToolChoice,
    PromptTokensDetails,
    ResponseFormatJSONSchema,
    ResponseMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from pensieved.wire.openai import Choice as WholeChoice

FULL_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the file?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read", "arguments": '{"path": "a.txt"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "hello"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "read",
                "description": "Read a file",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
                "strict": True,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "read"}},
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_completion_tokens": 100,
    "stop": ["\n\n"],
    "temperature": 0.2,
    "top_p": 0.9,
    "seed": 7,
    "n": 1,
}


def test_a_request_with_every_role_and_option_parses() -> None:
    request = ChatCompletionRequest.model_validate(FULL_REQUEST)
    kinds = [type(m) for m in request.messages]
    assert kinds == [SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage]
    user = request.messages[2]
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    assert isinstance(user.content[1], ImagePart)
    assert isinstance(request.tool_choice, NamedToolChoice)
    assert request.tool_choice.function.name == "read"
    assert isinstance(request.response_format, ResponseFormatJSONSchema)
    assert request.response_format.json_schema.schema_ == {"type": "object"}
    assert request.stream_options is not None and request.stream_options.include_usage
    assert request.model_extra == {}
    null_content = {"role": "assistant", "content": None, "tool_calls": []}
    assert AssistantMessage.model_validate(null_content).content is None


def test_a_request_round_trips_to_the_same_json() -> None:
    request = ChatCompletionRequest.model_validate(FULL_REQUEST)
    assert request.model_dump(exclude_none=True, by_alias=True) == FULL_REQUEST


def test_undeclared_request_fields_are_kept_for_the_server_to_refuse() -> None:
    body = {**FULL_REQUEST, "prediction": {"type": "content"}, "top_k": 4}
    request = ChatCompletionRequest.model_validate(body)
    assert request.model_extra == {"prediction": {"type": "content"}, "top_k": 4}


@pytest.mark.parametrize(
    "change",
    [
        {"messages": []},
        {"messages": [{"role": "function", "name": "f", "content": "x"}]},
        {"messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
        {"tool_choice": "sometimes"},
        {"response_format": {"type": "xml"}},
        {"max_tokens": 0},
        {"temperature": 3},
    ],
)
def test_malformed_requests_fail_validation(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**FULL_REQUEST, **change})


def test_a_client_can_build_a_request_with_python_names() -> None:
    fmt = ResponseFormatJSONSchema(json_schema=JSONSchemaSpec(name="a", schema_={"type": "object"}))
    dumped = fmt.model_dump(exclude_none=True, by_alias=True)
    assert dumped == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object"}},
    }


def _usage() -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=10,
        completion_tokens=3,
        total_tokens=13,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=8),
    )


def test_a_whole_completion_is_what_the_sdk_parses() -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="read", arguments='{"path":"a"}'))
    reply = ChatCompletion(
        id="chatcmpl-1",
        created=1700000000,
        model="m",
        choices=[
            WholeChoice(
                message=ResponseMessage(content=None, tool_calls=[call]),
                finish_reason="tool_calls",
            )
        ],
        usage=_usage(),
    )
    parsed = sdk.ChatCompletion.model_validate(reply.model_dump(mode="json"))
    tool_call = parsed.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert tool_call.function.arguments == '{"path":"a"}'  # type: ignore[union-attr]
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 8
    assert parsed.choices[0].finish_reason == "tool_calls"


def test_chunks_are_what_the_sdk_parses() -> None:
    first = ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[
            ChunkChoice(
                delta=ChoiceDelta(
                    role="assistant",
                    tool_calls=[
                        ChoiceDeltaToolCall(
                            index=0,
                            id="call_1",
                            type="function",
                            function=ChoiceDeltaFunctionCall(name="read", arguments=""),
                        )
                    ],
                )
            )
        ],
    )
    parsed = sdk.ChatCompletionChunk.model_validate(first.model_dump(mode="json"))
    delta_call = parsed.choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert delta_call.id == "call_1" and delta_call.function.name == "read"  # type: ignore[union-attr]
    last = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[], usage=_usage())
    parsed = sdk.ChatCompletionChunk.model_validate(last.model_dump(mode="json"))
    assert parsed.choices == [] and parsed.usage is not None and parsed.usage.total_tokens == 13


def test_chunks_from_other_servers_parse_with_their_extra_fields() -> None:
    # llama-server's shape: reasoning_content in the delta, timings beside the choices.
    raw = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "qwen",
        "system_fingerprint": "b1234",
        "choices": [{"index": 0, "delta": {"reasoning_content": "hm"}, "finish_reason": None}],
        "timings": {"predicted_ms": 1.5},
    }
    chunk = ChatCompletionChunk.model_validate(raw)
    assert chunk.choices[0].delta.reasoning_content == "hm"
    assert chunk.model_extra == {"timings": {"predicted_ms": 1.5}}


def test_the_error_envelope_has_openais_four_fields() -> None:
    body = {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert ErrorEnvelope.model_validate(body).model_dump() == body
