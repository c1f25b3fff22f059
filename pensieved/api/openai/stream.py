"""Engine events → OpenAI's `chat.completion.chunk` stream, and the whole `chat.completion`.

Both go through the Messages side's `ReplyBuilder`, so the two dialects (and, within each,
the streamed and the whole reply) split a reply into the same text, reasoning and tool calls.
Its block events are restated as OpenAI deltas here: text → `content`, thinking →
`reasoning_content`, a tool_use block → one entry of `tool_calls` (its id and name first, then
argument fragments).

Stream order: a first chunk with the role (once a slot is known), the deltas, a chunk with the
`finish_reason`, with `stream_options.include_usage` a chunk with no choices and the usage,
then `data: [DONE]`. An error after the headers is one `data: {"error": ...}` chunk, which the
`openai` SDK raises as an APIError.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from pensieved.api.convert import new_id
from pensieved.api.replies import ReplyBuilder, collect
from pensieved.engine.types import Event, Failed, Finished, Heartbeat, PromptCached, StopReason
from pensieved.wire.anthropic import (
    BlockEvent,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    OutTextBlock,
    OutThinkingBlock,
    OutToolUseBlock,
    TextDelta,
    ThinkingDelta,
)
from pensieved.wire.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChunkChoice,
    CompletionUsage,
    ErrorEnvelope,
    FinishReason,
    FunctionCall,
    PromptTokensDetails,
    ResponseMessage,
    ToolCall,
)

DONE = b"data: [DONE]\n\n"
# SSE comments: clients skip them, proxies and idle timers see traffic.
WAITING_COMMENT = b": waiting for a slot\n\n"
KEEPALIVE_COMMENT = b": keep-alive\n\n"

FINISH_REASONS: dict[StopReason, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def usage(finished: Finished) -> CompletionUsage:
    """OpenAI's accounting: `prompt_tokens` is the whole prompt, cached tokens included."""
    return CompletionUsage(
        prompt_tokens=finished.input_tokens,
        completion_tokens=finished.output_tokens,
        total_tokens=finished.input_tokens + finished.output_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cache_read_tokens),
    )


def data_line(payload: ChatCompletionChunk) -> bytes:
    """One SSE `data:` line. Unset fields are left out, except the two every OpenAI chunk
    choice carries even when null (clients index them directly)."""
    data = payload.model_dump(mode="json", exclude_none=True)
    for choice in data.get("choices", ()):
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def call_id() -> str:
    return new_id("call_")


class OpenAIStream:
    """Turns one request's engine events into the bytes of its chunk stream."""

    def __init__(self, model_name: str, include_usage: bool) -> None:
        self._id = new_id("chatcmpl-")
        self._created = int(time.time())
        self._model = model_name
        self._include_usage = include_usage
        self._reply = ReplyBuilder()
        self._started = False
        self._calls = 0  # tool calls so far: the next one's `index`
        self._in_call = False  # the open block is a tool call
        self._args_sent = False  # ... and some of its arguments went out

    def _chunk(self, delta: ChoiceDelta, finish: FinishReason | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self._id,
            created=self._created,
            model=self._model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
        )

    def feed(self, event: Event) -> bytes:
        """The bytes to send for `event` (maybe none); a `Failed` event raises its error."""
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Heartbeat):
            return KEEPALIVE_COMMENT if self._started else WAITING_COMMENT
        if isinstance(event, PromptCached):
            self._started = True
            return data_line(self._chunk(ChoiceDelta(role="assistant", content="")))
        if isinstance(event, Finished):
            out = bytearray(self._deltas(self._reply.finish()))
            finish = ChoiceDelta()
            out += data_line(self._chunk(finish, FINISH_REASONS[event.stop_reason]))
            if self._include_usage:
                last = ChatCompletionChunk(
                    id=self._id,
                    created=self._created,
                    model=self._model,
                    choices=[],
                    usage=usage(event),
                )
                out += data_line(last)
            return bytes(out + DONE)
        return self._deltas(self._reply.feed(event))

    def _deltas(self, events: list[BlockEvent]) -> bytes:
        out = bytearray()
        for event in events:
            delta = self._delta(event)
            if delta is not None:
                out += data_line(self._chunk(delta))
        return bytes(out)

    def _delta(self, event: BlockEvent) -> ChoiceDelta | None:
        if isinstance(event, ContentBlockStart):
            block = event.content_block
            self._in_call = isinstance(block, OutToolUseBlock)
            if not isinstance(block, OutToolUseBlock):
                return None  # text and reasoning need no opening
            self._calls += 1
            self._args_sent = False
            call = ChoiceDeltaToolCall(
                index=self._calls - 1,
                id=call_id(),
                type="function",
                function=ChoiceDeltaFunctionCall(name=block.name, arguments=""),
            )
            return ChoiceDelta(tool_calls=[call])
        if isinstance(event, ContentBlockStop):
            if self._in_call and not self._args_sent:
                # A call without arguments: its arguments must still parse as JSON.
                return self._arguments("{}")
            return None
        delta = event.delta
        if isinstance(delta, TextDelta):
            return ChoiceDelta(content=delta.text)
        if isinstance(delta, ThinkingDelta):
            return ChoiceDelta(reasoning_content=delta.thinking)
        if isinstance(delta, InputJsonDelta):
            return self._arguments(delta.partial_json)
        return None  # a thinking signature: Anthropic's alone

    def _arguments(self, fragment: str) -> ChoiceDelta:
        self._args_sent = True
        function = ChoiceDeltaFunctionCall(arguments=fragment)
        return ChoiceDelta(
            tool_calls=[ChoiceDeltaToolCall(index=self._calls - 1, function=function)]
        )

    @staticmethod
    def error(payload: ErrorEnvelope) -> bytes:
        """The chunk that ends a stream whose headers are already sent (all four keys, as in
        an error reply's body)."""
        text = json.dumps(payload.model_dump(mode="json"), ensure_ascii=False)
        return f"data: {text}\n\n".encode()


async def whole_completion(model_name: str, events: AsyncIterator[Event]) -> ChatCompletion:
    """The non-streamed reply: what the stream would have sent, put together."""
    reply, finished = await collect(events)
    texts = [b.text for b in reply.blocks if isinstance(b, OutTextBlock)]
    thoughts = [b.thinking for b in reply.blocks if isinstance(b, OutThinkingBlock)]
    calls = [
        ToolCall(
            id=call_id(),
            function=FunctionCall(name=b.name, arguments=json.dumps(b.input, ensure_ascii=False)),
        )
        for b in reply.blocks
        if isinstance(b, OutToolUseBlock)
    ]
    message = ResponseMessage(
        content="".join(texts) if texts or not calls else None,
        tool_calls=calls or None,
        reasoning_content="".join(thoughts) if thoughts else None,
    )
    return ChatCompletion(
        id=new_id("chatcmpl-"),
        created=int(time.time()),
        model=model_name,
        choices=[Choice(message=message, finish_reason=FINISH_REASONS[finished.stop_reason])],
        usage=usage(finished),
    )
