"""Engine events → Anthropic content blocks, for streamed and whole replies alike.

Both forms go through the same `ReplyBuilder`, so a streamed reply and the same request sent
without `stream` (Claude Code's fallback) produce the same blocks: text, thinking and tool_use
blocks in the order the model wrote them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pensieved.api.convert import new_id
from pensieved.api.models import OutBlock, OutTextBlock, OutThinkingBlock, OutToolUseBlock
from pensieved.engine.types import (
    Event,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)


def thinking_signature(text: str) -> str:
    """Anthropic signs thinking; we have nothing to sign with, so a digest stands in."""
    return "pensieve-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class ReplyBuilder:
    """Accumulates content blocks; `feed` also returns the SSE payloads for the stream."""

    def __init__(self) -> None:
        self.blocks: list[OutBlock] = []
        self._open: str | None = None  # type of the block being written, if any
        self._texts: list[str] = []
        self._tool_json: list[str] = []

    @property
    def _index(self) -> int:
        return len(self.blocks) - 1

    def feed(self, event: Event) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(event, TextPiece):
            if not event.text:
                return out
            self._ensure(out, "text")
            self._texts.append(event.text)
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, ThinkingPiece):
            if not event.text:
                return out
            self._ensure(out, "thinking")
            self._texts.append(event.text)
            out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
        elif isinstance(event, ToolCallStart):
            self.close(out)
            block = OutToolUseBlock(id=new_id("toolu_"), name=event.name, input={})
            self.blocks.append(block)
            self._open, self._tool_json = "tool_use", []
            out.append(self._start(block))
        elif isinstance(event, ToolCallDelta):
            if self._open == "tool_use" and event.partial_json:
                self._tool_json.append(event.partial_json)
                out.append(
                    self._delta({"type": "input_json_delta", "partial_json": event.partial_json})
                )
        elif isinstance(event, ToolCallEnd) and self._open == "tool_use":
            call = self.blocks[-1]
            assert isinstance(call, OutToolUseBlock)
            call.input = event.input
            if not self._tool_json and event.input:
                # A call parsed whole (not streamed): its input still travels as one delta.
                text = json.dumps(event.input, ensure_ascii=False)
                out.append(self._delta({"type": "input_json_delta", "partial_json": text}))
            self.close(out)
        return out

    def _ensure(self, out: list[dict[str, Any]], kind: str) -> None:
        if self._open == kind:
            return
        self.close(out)
        block: OutBlock = OutTextBlock(text="") if kind == "text" else OutThinkingBlock(thinking="")
        self.blocks.append(block)
        self._open, self._texts = kind, []
        out.append(self._start(block))

    def _start(self, block: OutBlock) -> dict[str, Any]:
        content = block.model_dump(mode="json")
        return {"type": "content_block_start", "index": self._index, "content_block": content}

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def close(self, out: list[dict[str, Any]]) -> None:
        """End the open block (if any), appending its closing events to `out`."""
        if self._open is None:
            return
        block = self.blocks[-1]
        if isinstance(block, OutTextBlock):
            block.text = "".join(self._texts)
        elif isinstance(block, OutThinkingBlock):
            block.thinking = "".join(self._texts)
            block.signature = thinking_signature(block.thinking)
            out.append(self._delta({"type": "signature_delta", "signature": block.signature}))
        out.append({"type": "content_block_stop", "index": self._index})
        self._open = None

    def finish(self) -> list[dict[str, Any]]:
        """Close the last block; a reply with no content at all gets one empty text block."""
        out: list[dict[str, Any]] = []
        self.close(out)
        if not self.blocks:
            self._ensure(out, "text")
            self.close(out)
        return out
