"""What a tool dialect is: how one model family writes tool calls and its reasoning.

A dialect is data plus a few callables: the call syntax (`Syntax`), from which one parser
(`parser.py`) and one grammar builder (`build.py`) serve every family, and the reasoning
markup with the template switches that turn reasoning on or off (`Reasoning`). A family whose
calls fit the generic syntax is one small file and one row in the registry (`__init__.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pensieved.engine.gbnf import escape_literal
from pensieved.engine.tools import Parsed, ParsedText
from pensieved.engine.types import ToolSpec

if TYPE_CHECKING:
    from pensieved.engine.llama import SchemaConverter

__all__ = ["CallParser", "Dialect", "JsonArgs", "Parsed", "ParsedText", "Reasoning", "Syntax"]


class CallParser(Protocol):
    """Splits streamed model text into text and tool calls (the arguments as JSON deltas)."""

    calls: int  # complete calls so far

    @property
    def in_call(self) -> bool: ...

    def feed(self, text: str) -> list[Parsed]: ...

    def finish(self) -> list[Parsed]: ...


@dataclass(frozen=True)
class JsonArgs:
    """The arguments are one JSON object, written as is."""


@dataclass(frozen=True)
class XmlArgs:
    """The arguments are tagged parameters, one per key: strings raw, other types as JSON.

    `key_open` + key + `key_close` + value + `value_close` is one parameter as the grammar
    writes it; `param_re` reads one (groups `key` and `value`), however it is spaced.
    """

    key_open: str
    key_close: str
    value_close: str
    param_re: re.Pattern[str]
    separator: str = "\n"  # written after each parameter
    key_close_gbnf: str = ""  # GBNF for `key_close` when it may be spaced differently
    newline_values: bool = False  # values sit on lines of their own (one newline each side)
    # `key_close` for a raw string value and for a JSON one, where the tag says which it is
    # (DeepSeek's DSML: `" string="true">`, `" string="false">`); the grammar writes the one
    # that fits the property's schema.
    typed_key_close: tuple[str, str] | None = None


class NotationReader(Protocol):
    """Translates one streamed arguments object from a family's own notation into JSON."""

    done: bool  # the object closed
    failed: bool  # the text is not the notation: what came after is not translated

    def read(self, text: str) -> tuple[str, int]:
        """The JSON that `text` (what follows the part read so far) translates to, and how
        many of its characters were used; the rest is held until more text decides it."""
        ...


@dataclass(frozen=True)
class NotationArgs:
    """The arguments are one object in a notation of the family's own (Gemma 4's unquoted
    keys and delimited strings, MiniMax-M3's nested tags): `reader` translates it to JSON as it
    streams, given the tool's schema (None: a tool not known), `rule` writes its GBNF from
    the schema (returning the rule and what was loosened). `opens` is what the notation
    starts with ("": it starts right after the call's head, whatever comes)."""

    reader: Callable[[dict[str, Any] | None], NotationReader]
    rule: Callable[[SchemaConverter, dict[str, Any], str], tuple[str, list[str]]]
    opens: str = "{"


@dataclass(frozen=True)
class Syntax:
    """How calls are written. A call is head(name), arguments, `call_close`; several calls
    sit one after another, inside `block_open` … `block_close` when the family has a block.
    """

    trigger: str  # the text tool calling starts with (the lazy grammar's trigger)
    head: Callable[[str], str]  # GBNF of a call up to its arguments, for a tool name
    head_re: re.Pattern[str]  # the same for the parser: group `name`, matched at the call
    args: JsonArgs | XmlArgs | NotationArgs
    call_close: str  # the literal a call ends with (how far a malformed call reaches)
    render: Callable[[str, dict[str, Any]], str]  # one call as the grammar writes it
    # GBNF for the close, when it allows more than the literal (spacing, a closing brace)
    call_close_gbnf: str | None = None
    close_re: re.Pattern[str] | None = None  # what ends a call, if not just `call_close`
    block_open: str = ""  # "": each call opens with the trigger itself
    block_close: str = ""
    separator: str = '"\\n"?'  # GBNF between calls
    lead: str = ""  # GBNF allowed before the trigger when a call is forced (not lazy)
    drop: tuple[str, ...] = ()  # markup removed from visible text (message headers)
    markup: tuple[str, ...] = ()  # control tokens of a call that `render` does not write

    @property
    def close_gbnf(self) -> str:
        """GBNF of what ends a call."""
        if self.call_close_gbnf is not None:
            return self.call_close_gbnf
        return escape_literal(self.call_close) if self.call_close else ""


def _no_switches(thinking: bool) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Reasoning:
    """The family's reasoning markup, and template variables of its own that switch it (the
    common ones, `enable_thinking`, `thinking` and `reasoning_effort`, are set for every
    template by `prompt.request_variables`)."""

    open: str = "<think>"
    close: str = "</think>"
    # What else ends the reasoning, kept as the start of the answer (DeepSeek V3.2 and V4 may
    # open their call block inside `<think>` without closing it first).
    ends: tuple[str, ...] = ()
    switches: Callable[[bool], dict[str, Any]] = _no_switches


@dataclass(frozen=True)
class Dialect:
    """One family's tool calls and reasoning."""

    name: str
    syntax: Syntax
    reasoning: Reasoning = field(default_factory=Reasoning)
    # A parser of the family's own, when the generic one does not fit (else None).
    parser: Callable[[Sequence[ToolSpec] | None], CallParser] | None = None

    def new_parser(self, tools: Sequence[ToolSpec] | None) -> CallParser:
        """A parser for one reply; `tools` None: any name is accepted."""
        if self.parser is not None:
            return self.parser(tools)
        from pensieved.engine.dialects.parser import SyntaxParser

        return SyntaxParser(self.syntax, tools)
