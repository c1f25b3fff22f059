"""Generated text in, events out: reasoning, visible text and tool calls, and the stop."""

from __future__ import annotations

from collections.abc import Callable

from pensieved.engine.dialects import by_name
from pensieved.engine.dialects.base import CallParser
from pensieved.engine.textstream import TextStream
from pensieved.engine.thinking import ThinkSplitter
from pensieved.engine.tools import ParsedText
from pensieved.engine.types import (
    Event,
    PreparedPrompt,
    StopReason,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)


class OutputRouter:
    """Generated text in, events out: reasoning, visible text, tool calls; decides the stop.

    Order matters: `<think>` blocks are split off first, tool calls next, and stop sequences
    are matched in the visible text only, so a stop sequence can never cut a tool call apart.
    """

    def __init__(self, prepared: PreparedPrompt, emit: Callable[[Event], None]) -> None:
        request = prepared.request
        self._emit = emit
        self._stops = request.stop_sequences
        self._visible = TextStream(self._stops)
        dialect = by_name(prepared.tool_dialect)
        reasoning = dialect.reasoning
        # A grammar from the first token (a forced call, structured output) leaves no room for
        # reasoning, whatever block the prompt opened.
        forced = prepared.grammar is not None and not prepared.grammar.lazy
        self._think = ThinkSplitter(
            start_open=prepared.thinking_open and not forced,
            open_tag=reasoning.open,
            close_tag=reasoning.close,
            ends=reasoning.ends,
        )
        self._show_thinking = request.thinking
        self._no_tools = request.tool_choice.mode == "none"
        self._parallel = request.tool_choice.parallel
        self._parser: CallParser | None = None
        if request.output_schema is None and (request.tools or dialect.syntax.drop):
            # A dialect with message headers to drop parses every reply; without tools (or
            # with tool_choice none) it knows no tool, so no call is taken as one.
            known = () if self._no_tools or not request.tools else request.tools
            self._parser = dialect.new_parser(known)
        self.stop_reason: StopReason = "max_tokens"
        self.stop_sequence: str | None = None
        self.done = False
        self._dropped = False
        self._after_call = False

    def feed(self, text: str) -> bool:
        """Route `text`; True when generation should stop here."""
        if self.done or not text:
            return self.done
        for thinking, piece in self._think.feed(text):
            self._route(thinking, piece)
            if self.done:
                break
        return self.done

    def _route(self, thinking: bool, piece: str) -> None:
        if thinking:
            if self._show_thinking:
                self._emit(ThinkingPiece(piece))
            return
        if self._parser is None:
            self._text(piece)
            return
        for parsed in self._parser.feed(piece):
            self._parsed(parsed)
            if self.done:
                return
        if self._no_tools and self._parser.in_call:
            # tool_choice none: the reply ends where the model tried to call a tool.
            self._flush_visible()
            self._stop("end_turn")

    def _parsed(self, parsed: object) -> None:
        if isinstance(parsed, ParsedText):
            self._text(parsed.text)
        elif isinstance(parsed, ToolCallStart):
            self._flush_visible()
            self._emit(parsed)
        elif isinstance(parsed, ToolCallDelta):
            self._emit(parsed)
        elif isinstance(parsed, ToolCallEnd):
            self._emit(parsed)
            self._after_call = True
            if parsed.complete and not self._parallel:
                self._stop("tool_use")

    def _text(self, text: str) -> None:
        if self._after_call:
            # The line breaks between and after calls would be whitespace-only text blocks.
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        out = self._visible.feed(text.encode())
        if out.text:
            self._emit(TextPiece(out.text))
        if out.stop_sequence is not None:
            self.stop_sequence = out.stop_sequence
            self._stop("stop_sequence")

    def _flush_visible(self) -> None:
        tail = self._visible.finish()
        if tail:
            self._emit(TextPiece(tail))
        self._visible = TextStream(self._stops)

    def _stop(self, reason: StopReason) -> None:
        """Stop here and show nothing more (stop sequence, finished call, refused call)."""
        self.stop_reason = reason
        self.done = True
        self._dropped = True

    def end_of_turn(self) -> None:
        self.stop_reason = "end_turn"
        self.done = True

    def finish(self) -> None:
        """Release held text and close a tool call the output ended inside of."""
        if not self._dropped:
            for thinking, piece in self._think.finish():
                self._route(thinking, piece)
        parser = self._parser
        if not self._dropped and parser is not None and not (self._no_tools and parser.in_call):
            for parsed in parser.finish():
                self._parsed(parsed)
        if not self._dropped:
            self._flush_visible()
        calls = self._parser.calls if self._parser is not None else 0
        if self.stop_reason == "end_turn" and calls and not self._no_tools:
            self.stop_reason = "tool_use"
