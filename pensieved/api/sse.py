"""Engine events → Anthropic's Messages stream: the one place that knows its event order.

message_start (once a slot is known) → per block: content_block_start, deltas,
content_block_stop (a ping follows the first block start) → message_delta → message_stop; or
an `error` event once the stream has begun. Before message_start only an SSE comment may keep
the connection alive.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from pensieved.api.convert import new_id
from pensieved.api.errors import envelope
from pensieved.api.replies import ReplyBuilder, collect
from pensieved.engine.types import Event, Failed, Finished, Heartbeat, PromptCached
from pensieved.wire.anthropic import (
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    Ping,
    StopInfo,
    StreamEvent,
    Usage,
)

# Keeps the connection alive while waiting for a slot, before the stream may send events.
WAITING_COMMENT = b": waiting for a slot\n\n"
# The same, while the request's model is loaded (after an idle unload, or to make room).
LOADING_COMMENT = b": loading the model\n\n"


def frame(event: StreamEvent) -> bytes:
    """One SSE event whose name is the payload's `type`, as Anthropic frames them."""
    payload = json.dumps(event.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
    return f"event: {event.type}\ndata: {payload}\n\n".encode()


def usage(prompt_tokens: int, cached: int, output_tokens: int) -> Usage:
    """Anthropic's accounting: `input_tokens` excludes the tokens read from the cache, so
    `input_tokens + cache_read_input_tokens` is the whole prompt (what count_tokens says)."""
    return Usage(
        input_tokens=prompt_tokens - cached,
        output_tokens=output_tokens,
        cache_read_input_tokens=cached,
    )


class AnthropicStream:
    """Turns one request's engine events into the bytes of its SSE stream."""

    def __init__(self, model_name: str, prompt_tokens: int) -> None:
        self._model = model_name
        self._prompt_tokens = prompt_tokens
        self._reply = ReplyBuilder()
        self._started = False
        self._pinged = False

    def feed(self, event: Event) -> bytes:
        """The bytes to send for `event` (maybe none); a `Failed` event raises its error."""
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Heartbeat):
            return frame(Ping()) if self._started else WAITING_COMMENT
        if isinstance(event, PromptCached):
            # Sent once a slot is known, so the usage split into cached and new prompt
            # tokens is already right in message_start.
            self._started = True
            skeleton = Message(
                id=new_id("msg_"),
                model=self._model,
                content=[],
                stop_reason=None,
                stop_sequence=None,
                usage=usage(self._prompt_tokens, event.cache_read_tokens, 0),
            )
            return frame(MessageStart(message=skeleton))
        if isinstance(event, Finished):
            # From the event: an upstream reply learns its prompt's size only at its end.
            total = usage(event.input_tokens, event.cache_read_tokens, event.output_tokens)
            stop = StopInfo(stop_reason=event.stop_reason, stop_sequence=event.stop_sequence)
            events: list[StreamEvent] = [*self._reply.finish()]
            events += [MessageDelta(delta=stop, usage=total), MessageStop()]
            return self._frames(events)
        return self._frames(self._reply.feed(event))

    def _frames(self, events: Sequence[StreamEvent]) -> bytes:
        out = bytearray()
        for event in events:
            out += frame(event)
            if not self._pinged and event.type == "content_block_start":
                self._pinged = True  # Anthropic's order: the first block opens, then a ping
                out += frame(Ping())
        return bytes(out)

    @staticmethod
    def error(error_type: str, message: str) -> bytes:
        """The `error` event that ends a stream whose headers are already sent."""
        return frame(envelope(error_type, message))


async def whole_message(
    model_name: str, prompt_tokens: int, events: AsyncIterator[Event]
) -> Message:
    """The non-streamed reply: the same blocks the stream would have sent."""
    reply, finished = await collect(events)
    return Message(
        id=new_id("msg_"),
        model=model_name,
        content=reply.blocks,
        stop_reason=finished.stop_reason,
        stop_sequence=finished.stop_sequence,
        usage=usage(finished.input_tokens, finished.cache_read_tokens, finished.output_tokens),
    )
