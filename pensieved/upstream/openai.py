"""Protocol `openai`: a request in the engine's terms → Chat Completions, and its reply (whole
or streamed) → the engine's events, which the API layer encodes as Anthropic's reply.

The request side starts from the same `GenerationRequest` a local model gets, so an upstream
sees exactly the normalized conversation (billing header gone, tool results as tool messages).
Tool-call arguments stream through as they arrive and are parsed once complete; a server
that interleaves the fragments of parallel calls, or sends arguments that are not a JSON
object, gets a clear error rather than a garbled tool_use block.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import ValidationError

from pensieved.engine.types import (
    ChatMessage,
    Event,
    Finished,
    GenerationRequest,
    PromptCached,
    StopReason,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from pensieved.errors import UpstreamError
from pensieved.wire.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionUsage,
    FunctionCall,
    FunctionDefinition,
    JSONSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormatJSONSchema,
    StreamOptions,
    SystemMessage,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)

_STOP_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "end_turn",
}


def _message(message: ChatMessage) -> Any:
    if message.role == "system":
        return SystemMessage(content=message.content)
    if message.role == "tool":
        return ToolMessage(content=message.content, tool_call_id=message.tool_call_id or "")
    if message.role == "assistant":
        calls = [
            ToolCall(
                id=call.id,
                function=FunctionCall(
                    name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)
                ),
            )
            for call in message.tool_calls
        ]
        # Content stays a string even when empty: some servers' templates (llama-cpp-python's
        # chatml-function-calling) read it on every assistant message.
        return AssistantMessage(content=message.content, tool_calls=calls or None)
    return UserMessage(content=message.content)


def _tool_choice(request: GenerationRequest) -> Any:
    choice = request.tool_choice
    if choice.mode == "tool" and choice.name:
        return NamedToolChoice(function=NamedFunction(name=choice.name))
    return {"auto": "auto", "any": "required", "none": "none"}.get(choice.mode, "auto")


def chat_request(request: GenerationRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The Chat Completions body for `request`, as JSON-ready data."""
    sampling = request.sampling
    body = ChatCompletionRequest(
        model=model,
        messages=[_message(m) for m in request.messages],
        max_tokens=request.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=list(request.stop_sequences) or None,
        stream=stream,
        stream_options=StreamOptions(include_usage=True) if stream else None,
    )
    if request.tools:
        body.tools = [
            Tool(
                function=FunctionDefinition(
                    name=t.name, description=t.description or None, parameters=t.parameters
                )
            )
            for t in request.tools
        ]
        body.tool_choice = _tool_choice(request)
        if not request.tool_choice.parallel:
            body.parallel_tool_calls = False
    if request.output_schema is not None:
        body.response_format = ResponseFormatJSONSchema(
            json_schema=JSONSchemaSpec(name="output", schema=request.output_schema, strict=True)
        )
    data = body.model_dump(mode="json", exclude_none=True, by_alias=True)
    if sampling.top_k:
        data["top_k"] = sampling.top_k  # not OpenAI's, but vLLM, llama.cpp and Ollama read it
    return data


def _arguments(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamError(
            f"the upstream's call of tool {name!r} has arguments that are not a JSON object: "
            f"{text[:200]!r}"
        )
    return value


def _finished(usage: CompletionUsage | None, reason: str | None, fallback_output: int) -> Finished:
    stop = _STOP_REASONS.get(reason or "stop", "end_turn")
    if usage is None:
        return Finished(stop, None, 0, fallback_output, 0)
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return Finished(stop, None, usage.prompt_tokens, usage.completion_tokens, cached)


def reply_events(body: bytes, *, thinking: bool) -> Iterator[Event]:
    """The events of a whole (non-streamed) Chat Completions reply."""
    try:
        reply = ChatCompletion.model_validate_json(body)
    except ValidationError as exc:
        raise UpstreamError(f"the upstream's reply is not a chat completion: {exc}") from None
    if not reply.choices:
        raise UpstreamError("the upstream's reply has no choices")
    choice = reply.choices[0]
    message = choice.message
    cached = reply.usage.prompt_tokens_details if reply.usage else None
    yield PromptCached((cached.cached_tokens or 0) if cached else 0)
    if thinking and message.reasoning_content:
        yield ThinkingPiece(message.reasoning_content)
    if message.content:
        yield TextPiece(message.content)
    for call in message.tool_calls or ():
        yield ToolCallStart(call.function.name)
        yield ToolCallDelta(call.function.arguments)
        yield ToolCallEnd(_arguments(call.function.name, call.function.arguments))
    reason = choice.finish_reason
    if message.tool_calls and reason == "stop":
        reason = "tool_calls"  # some servers say stop after a call
    yield _finished(reply.usage, reason, 0)


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event, as the bytes arrive."""
    buffer = b""
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = buffer[:end].rstrip(b"\r").decode("utf-8", "replace")
            buffer = buffer[end + 1 :]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


class _ToolCalls:
    """Assembles streamed tool-call fragments into start/delta/end events, one call at a time."""

    def __init__(self) -> None:
        self.active: int | None = None
        self.name = ""
        self.parts: list[str] = []
        self.seen: set[int] = set()

    def close(self) -> list[Event]:
        if self.active is None:
            return []
        self.active = None
        return [ToolCallEnd(_arguments(self.name, "".join(self.parts)))]

    def feed(self, index: int, name: str | None, arguments: str | None) -> list[Event]:
        out: list[Event] = []
        if index not in self.seen:
            try:
                out += self.close()
            except UpstreamError:
                raise UpstreamError(
                    f"the upstream began another tool call before the arguments of {self.name!r} "
                    "were a complete JSON object: it interleaves parallel tool calls, which "
                    "cannot be streamed as Anthropic tool_use blocks"
                ) from None
            if not name:
                raise UpstreamError("the upstream's stream began a tool call without its name")
            self.seen.add(index)
            self.active, self.name, self.parts = index, name, []
            out.append(ToolCallStart(name))
        elif index != self.active:
            raise UpstreamError(
                "the upstream interleaved the fragments of parallel tool calls, which cannot "
                "be streamed as Anthropic tool_use blocks; ask for one call at a time"
            )
        if arguments:
            self.parts.append(arguments)
            out.append(ToolCallDelta(arguments))
        return out


async def stream_events(chunks: AsyncIterator[bytes], *, thinking: bool) -> AsyncIterator[Event]:
    """The events of a streamed Chat Completions reply (`chat.completion.chunk`s)."""
    calls = _ToolCalls()
    usage: CompletionUsage | None = None
    reason: str | None = None
    pieces = 0
    started = False
    async for data in sse_data(chunks):
        if data.strip() == "[DONE]":
            break
        try:
            raw = json.loads(data)
        except ValueError:
            raise UpstreamError(
                f"the upstream sent an event that is not JSON: {data[:200]!r}"
            ) from None
        if isinstance(raw, dict) and "error" in raw:
            error = raw["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError(f"the upstream's stream ended with an error: {message}")
        try:
            chunk = ChatCompletionChunk.model_validate(raw)
        except ValidationError as exc:
            raise UpstreamError(f"the upstream sent a malformed chunk: {exc}") from None
        if not started:
            started = True
            yield PromptCached(0)  # the split is known only from the last chunk's usage
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices[:1]:
            delta = choice.delta
            if thinking and delta.reasoning_content:
                for event in calls.close():
                    yield event
                yield ThinkingPiece(delta.reasoning_content)
                pieces += 1
            if delta.content:
                for event in calls.close():
                    yield event
                yield TextPiece(delta.content)
                pieces += 1
            for call in delta.tool_calls or ():
                function = call.function
                for event in calls.feed(
                    call.index,
                    function.name if function else None,
                    function.arguments if function else None,
                ):
                    yield event
                pieces += 1
            if choice.finish_reason is not None:
                reason = choice.finish_reason
    if not started:
        raise UpstreamError("the upstream's stream ended before its first chunk")
    for event in calls.close():
        yield event
    if calls.seen and reason == "stop":
        reason = "tool_calls"
    yield _finished(usage, reason, pieces)
