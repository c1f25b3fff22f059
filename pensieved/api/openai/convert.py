"""OpenAI Chat Completions request → the engine's request types.

The engine has one dialect (`GenerationRequest`); everything OpenAI-specific is settled here:
roles, content parts, tool calls whose arguments travel as JSON strings, `tool_choice`,
`response_format` and the sampling fields. What Pensieve cannot honour is refused here, by
field name, never silently dropped: a client asking for `n=3` or log probabilities would
otherwise get something other than what it asked for.
"""

from __future__ import annotations

import json
from typing import Any

from pensieved.engine.types import (
    ChatMessage,
    GenerationRequest,
    Sampling,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from pensieved.errors import (
    InvalidRequestError,
    UnsupportedContentError,
    UnsupportedParameterError,
)
from pensieved.wire.openai import (
    AssistantMessage,
    ChatCompletionRequest,
    DeveloperMessage,
    ImagePart,
    Message,
    NamedToolChoice,
    RefusalPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
)

# No max_tokens: as many as the context and `model.max_output_tokens` allow (the engine
# clamps to both).
UNBOUNDED_MAX_TOKENS = 1 << 30
# Accepted and ignored: they describe the caller or OpenAI's own storage and billing, and
# change nothing about the reply.
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)
# Not OpenAI's, but llama-server and vLLM accept it and the engine's sampler has it.
EXTENSION_FIELDS = frozenset({"top_k"})
# Only these `reasoning_effort` values mean "no reasoning".
NO_REASONING = frozenset({"none", "minimal"})
_CHOICE_MODES: dict[str, ToolChoiceMode] = {"none": "none", "auto": "auto", "required": "any"}
# Any JSON object: the older JSON mode.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Refuse fields (or values) the engine cannot honour, naming the field."""
    if request.n is not None and request.n > 1:
        raise UnsupportedParameterError(
            "n",
            f"only one choice per request is generated (got n={request.n}); send n=1 "
            "or leave it out, and repeat the request for more",
            value_only=True,
        )
    if request.logprobs:
        raise UnsupportedParameterError(
            "logprobs", "log probabilities are not returned; leave logprobs out", value_only=True
        )
    if request.top_logprobs:
        raise UnsupportedParameterError(
            "top_logprobs",
            "log probabilities are not returned; leave top_logprobs out",
            value_only=True,
        )
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(request, name)
        if value:
            raise UnsupportedParameterError(
                name,
                f"repetition penalties are not implemented; send 0 or leave {name} out "
                f"(got {value})",
                value_only=True,
            )
    if request.logit_bias:
        raise UnsupportedParameterError(
            "logit_bias",
            "token biases are not implemented; leave logit_bias out",
            value_only=True,
        )
    for name, value in (request.model_extra or {}).items():
        if value is None or name in IGNORED_FIELDS or name in EXTENSION_FIELDS:
            continue
        if name == "modalities" and value == ["text"]:
            continue  # text out is what every reply is
        hint = ""
        if name in ("functions", "function_call"):
            hint = " (the deprecated function-calling fields: send `tools` and `tool_choice`)"
        raise UnsupportedParameterError(
            name, f"this field is not supported by pensieved{hint}; remove it"
        )


def _text(content: str | list[TextPart] | list[TextPart | RefusalPart]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


def _user_text(message: UserMessage, where: str) -> str:
    if isinstance(message.content, str):
        return message.content
    texts = []
    for number, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        kind = {"image_url": "images", "input_audio": "audio", "file": "files"}[part.type]
        why = "it has no vision support" if isinstance(part, ImagePart) else "it reads text only"
        error = UnsupportedContentError(
            f"{where}.content.{number}: the loaded model does not accept {kind} ({why}); "
            "send text only or configure a model that accepts them"
        )
        error.param = f"{where}.content.{number}"
        raise error
    return "\n".join(texts)


def _arguments(text: str, where: str) -> dict[str, Any]:
    if not text.strip():
        return {}  # some clients send "" for a call without arguments
    try:
        value = json.loads(text)
    except ValueError as exc:
        error = InvalidRequestError(f"{where}: not valid JSON ({exc})")
        error.param = where
        raise error from None
    if not isinstance(value, dict):
        error = InvalidRequestError(f"{where}: must be a JSON object, got {type(value).__name__}")
        error.param = where
        raise error
    return value


def _convert_message(index: int, message: Message, call_names: dict[str, str]) -> ChatMessage:
    where = f"messages.{index}"
    if isinstance(message, SystemMessage | DeveloperMessage):
        return ChatMessage(role="system", content=_text(message.content))
    if isinstance(message, UserMessage):
        return ChatMessage(role="user", content=_user_text(message, where))
    if isinstance(message, ToolMessage):
        return ChatMessage(
            role="tool",
            content=_text(message.content),
            tool_call_id=message.tool_call_id,
            name=call_names.get(message.tool_call_id),
        )
    assert isinstance(message, AssistantMessage)
    calls = []
    for number, call in enumerate(message.tool_calls or ()):
        at = f"{where}.tool_calls.{number}.function.arguments"
        arguments = _arguments(call.function.arguments, at)
        calls.append(ToolCall(id=call.id, name=call.function.name, arguments=arguments))
        call_names[call.id] = call.function.name
    content = _text(message.content) if message.content is not None else ""
    content = content or message.refusal or ""
    return ChatMessage(role="assistant", content=content, tool_calls=tuple(calls))


def to_engine_messages(request: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    call_names: dict[str, str] = {}  # a tool result's name, from the call it answers
    return tuple(
        _convert_message(index, message, call_names)
        for index, message in enumerate(request.messages)
    )


def to_engine_tools(request: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(
            name=tool.function.name,
            description=tool.function.description or "",
            parameters=tool.function.parameters or {"type": "object", "properties": {}},
        )
        for tool in request.tools or ()
    )


def to_engine_tool_choice(request: ChatCompletionRequest) -> ToolChoice:
    choice = request.tool_choice
    names = [t.function.name for t in request.tools or ()]
    mode: ToolChoiceMode
    name: str | None
    if choice is None:
        mode, name = "auto", None
    elif isinstance(choice, NamedToolChoice):
        mode, name = "tool", choice.function.name
        if name not in names:
            error = InvalidRequestError(
                f"tool_choice.function.name: function '{name}' is not among the request's tools"
            )
            error.param = "tool_choice"
            raise error
    else:
        mode, name = _CHOICE_MODES[choice], None
    if mode == "any" and not names:
        error = InvalidRequestError("tool_choice: 'required' needs `tools` with at least one tool")
        error.param = "tool_choice"
        raise error
    # As on the Messages side: a forced call is one call, or a small model keeps calling.
    parallel = mode == "auto" and request.parallel_tool_calls is not False
    return ToolChoice(mode=mode, name=name, parallel=parallel)


def output_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = request.response_format
    if isinstance(fmt, ResponseFormatJSONObject):
        return JSON_OBJECT_SCHEMA
    if isinstance(fmt, ResponseFormatJSONSchema):
        return fmt.json_schema.schema_ or JSON_OBJECT_SCHEMA
    return None


def _top_k(request: ChatCompletionRequest) -> int:
    value = (request.model_extra or {}).get("top_k")
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsupportedParameterError("top_k", "must be an integer >= 0", value_only=True)
    return value


def to_generation_request(request: ChatCompletionRequest) -> GenerationRequest:
    _refuse_unsupported(request)
    max_tokens = request.max_completion_tokens or request.max_tokens or UNBOUNDED_MAX_TOKENS
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    sampling = Sampling(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=_top_k(request),
        seed=request.seed,
    )
    effort = request.reasoning_effort
    return GenerationRequest(
        messages=to_engine_messages(request),
        max_tokens=max_tokens,
        sampling=sampling,
        stop_sequences=tuple(stop),
        tools=to_engine_tools(request),
        tool_choice=to_engine_tool_choice(request),
        output_schema=output_schema(request),
        thinking=effort is not None and effort not in NO_REASONING,
        effort=effort,
    )
