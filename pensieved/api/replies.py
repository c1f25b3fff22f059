"""Engine events → Anthropic content blocks, for streamed and whole replies alike.

Both forms go through the same `ReplyBuilder`, so a streamed reply and the same request sent
without `stream` (Claude Code's fallback) produce the same blocks: text, thinking and tool_use
blocks in the order the model wrote them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

from pensieved.api.convert import new_id
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
from pensieved.wire.anthropic import (
    BlockEvent,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    OutBlock,
    OutTextBlock,
    OutThinkingBlock,
    OutToolUseBlock,
    SignatureDelta,
    TextDelta,
    ThinkingDelta,
)


async def collect(events: AsyncIterator[Event]) -> tuple[ReplyBuilder, Finished]:
    """A whole generation's blocks, as a stream would have sent them, and how it ended; a
    `Failed` event raises its error."""
    reply = ReplyBuilder()
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, Finished):
            finished = event
        elif isinstance(event, Failed):
            raise event.error
        elif not isinstance(event, PromptCached | Heartbeat):
            reply.feed(event)
    assert finished is not None
    reply.finish()
    return reply, finished


def thinking_signature(text: str) -> str:
    """Anthropic signs thinking; we have nothing to sign with, so a digest stands in."""
    return "pensieve-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class ReplyBuilder:
    """Accumulates content blocks; `feed` also returns the block events for the stream."""

    def __init__(self) -> None:
        self.blocks: list[OutBlock] = []
        self._open: str | None = None  # type of the block being written, if any
        self._texts: list[str] = []
        self._tool_json: list[str] = []

    @property
    def _index(self) -> int:
        return len(self.blocks) - 1

    def feed(self, event: Event) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        if isinstance(event, TextPiece):
            if not event.text:
                return out
            self._ensure(out, "text")
            self._texts.append(event.text)
            out.append(self._delta(TextDelta(text=event.text)))
        elif isinstance(event, ThinkingPiece):
            if not event.text:
                return out
            self._ensure(out, "thinking")
            self._texts.append(event.text)
            out.append(self._delta(ThinkingDelta(thinking=event.text)))
        elif isinstance(event, ToolCallStart):
            self.close(out)
            block = OutToolUseBlock(id=new_id("toolu_"), name=event.name, input={})
            self.blocks.append(block)
            self._open, self._tool_json = "tool_use", []
            out.append(self._start(block))
        elif isinstance(event, ToolCallDelta):
            if self._open == "tool_use" and event.partial_json:
                self._tool_json.append(event.partial_json)
                out.append(self._delta(InputJsonDelta(partial_json=event.partial_json)))
        elif isinstance(event, ToolCallEnd) and self._open == "tool_use":
            call = self.blocks[-1]
            assert isinstance(call, OutToolUseBlock)
            call.input = event.input
            if not self._tool_json and event.input:
                # A call parsed whole (not streamed): its input still travels as one delta.
                text = json.dumps(event.input, ensure_ascii=False)
                out.append(self._delta(InputJsonDelta(partial_json=text)))
            self.close(out)
        return out

    def _ensure(self, out: list[BlockEvent], kind: str) -> None:
        if self._open == kind:
            return
        self.close(out)
        block: OutBlock = OutTextBlock(text="") if kind == "text" else OutThinkingBlock(thinking="")
        self.blocks.append(block)
        self._open, self._texts = kind, []
        out.append(self._start(block))

    def _start(self, block: OutBlock) -> ContentBlockStart:
        # A copy: the block itself fills up as the deltas arrive.
        return ContentBlockStart(index=self._index, content_block=block.model_copy())

    def _delta(
        self, delta: TextDelta | ThinkingDelta | InputJsonDelta | SignatureDelta
    ) -> BlockEvent:
        return ContentBlockDelta(index=self._index, delta=delta)

    def close(self, out: list[BlockEvent]) -> None:
        """End the open block (if any), appending its closing events to `out`."""
        if self._open is None:
            return
        block = self.blocks[-1]
        if isinstance(block, OutTextBlock):
            block.text = "".join(self._texts)
        elif isinstance(block, OutThinkingBlock):
            block.thinking = "".join(self._texts)
            block.signature = thinking_signature(block.thinking)
            out.append(self._delta(SignatureDelta(signature=block.signature)))
        out.append(ContentBlockStop(index=self._index))
        self._open = None

    def finish(self) -> list[BlockEvent]:
        """Close the last block; a reply with no content at all gets one empty text block."""
        out: list[BlockEvent] = []
        self.close(out)
        if not self.blocks:
            self._ensure(out, "text")
            self.close(out)
        return out
