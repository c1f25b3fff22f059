"""One incremental parser for every dialect described by a `Syntax`.

Text is forwarded as soon as it cannot be the start of the trigger (or of markup the dialect
drops). A call's name is reported once its head is complete; JSON arguments stream as the
raw fragments the model writes, a family's own notation (Gemma 4's) as the JSON its reader
translates it into, tagged parameters as one JSON member each once its closing tag arrives,
so the deltas of a call always concatenate to its arguments object. Output that opens a call
but is not a call of a known tool comes back as text, unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pensieved.engine.dialects.base import (
    NotationArgs,
    NotationReader,
    Parsed,
    ParsedText,
    Syntax,
    XmlArgs,
)
from pensieved.engine.holdback import held_prefix
from pensieved.engine.tools import JsonEnd, repair_partial_json, steps_to_rest
from pensieved.engine.types import ToolCallDelta, ToolCallEnd, ToolCallStart, ToolSpec

# A call head not recognised within this many characters is not a call.
_HEAD_LIMIT = 256


def typed_value(raw: str, schema: Any) -> Any:
    """A tagged parameter's value: raw text for strings, JSON for other types (raw text when
    it does not parse, as the model evidently meant a string)."""
    types = schema.get("type") if isinstance(schema, dict) else None
    if types == "string" or (isinstance(types, list) and types == ["string"]):
        return raw
    if types == "boolean" and raw in ("True", "False"):  # Python's spelling, from templates
        return raw == "True"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


class _JsonReader:
    """JSON arguments are their own translation: read up to where the object ends."""

    failed = False

    def __init__(self) -> None:
        self._end = JsonEnd()
        self.done = False

    def read(self, text: str) -> tuple[str, int]:
        end = self._end.scan(text, 0)
        self.done = end is not None
        used = end if end is not None else len(text)
        return text[:used], used


def _reader(syntax: Syntax, schema: dict[str, Any] | None = None) -> NotationReader:
    if isinstance(syntax.args, NotationArgs):
        return syntax.args.reader(schema)
    return _JsonReader()


class SyntaxParser:
    """Splits streamed model text into plain text and tool calls, per a dialect's `Syntax`."""

    def __init__(self, syntax: Syntax, tools: Sequence[ToolSpec] | None) -> None:
        self._syntax = syntax
        self._close_re = syntax.close_re or re.compile(re.escape(syntax.call_close))
        self._tools = {t.name: t for t in tools} if tools is not None else None
        self._state = "text"  # text | block | head | args | tail | raw
        self._buffer = ""
        self._raw = ""  # the current call (or block) as written, for falling back to text
        self._name = ""
        self._args = ""  # argument JSON forwarded so far
        self._reader = _reader(syntax)
        self._started = False
        self.calls = 0

    @property
    def in_call(self) -> bool:
        return self._state != "text"

    def feed(self, text: str) -> list[Parsed]:
        self._buffer += text
        return steps_to_rest(self._step, lambda: (self._state, len(self._buffer)))

    def _take(self, count: int) -> str:
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        self._raw += taken
        return taken

    def _step(self, out: list[Parsed]) -> None:
        state = self._state
        if state == "text":
            self._text(out)
        elif state == "block":
            self._block(out)
        elif state == "head":
            self._head(out)
        elif state == "args":
            if isinstance(self._syntax.args, XmlArgs):
                self._xml_args(out, self._syntax.args)
            else:
                self._object_args(out)
        elif state == "tail":
            match = self._close_re.search(self._buffer)
            if match is not None:
                self._take(match.end())
                self._end_call(out, complete=True)
        elif state == "raw":
            self._raw_step(out)

    def _text(self, out: list[Parsed]) -> None:
        syntax = self._syntax
        markers = [syntax.trigger, *syntax.drop]
        found = [(self._buffer.find(m), m) for m in markers]
        hits = [(at, m) for at, m in found if at >= 0]
        if hits:
            at, marker = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
            if at:
                out.append(ParsedText(self._buffer[:at]))
            self._buffer = self._buffer[at:]
            self._raw = ""
            if marker != syntax.trigger:
                self._buffer = self._buffer[len(marker) :]
            elif syntax.block_open:
                self._take(len(syntax.block_open))
                self._state = "block"
            else:
                self._state = "head"
            return
        cut = len(self._buffer) - held_prefix(self._buffer, *markers)
        if cut > 0:
            out.append(ParsedText(self._buffer[:cut]))
            self._buffer = self._buffer[cut:]

    def _block(self, out: list[Parsed]) -> None:
        stripped = self._buffer.lstrip()
        self._take(len(self._buffer) - len(stripped))
        close = self._syntax.block_close
        if close and self._buffer.startswith(close):
            self._take(len(close))
            self._state = "text"
            self._raw = ""
        elif self._buffer and not (close and close.startswith(self._buffer)):
            self._state = "head"

    def _head(self, out: list[Parsed]) -> None:
        syntax = self._syntax
        match = syntax.head_re.match(self._buffer)
        if match is None:
            ends = [m for m in (syntax.call_close, syntax.block_close) if m]
            if len(self._buffer) > _HEAD_LIMIT or any(m in self._buffer for m in ends):
                self._state = "raw"
            return
        name = match.group("name")
        if self._tools is not None and name not in self._tools:
            self._state = "raw"
            return
        self._take(match.end())
        self._name = name
        tool = self._tools.get(name) if self._tools is not None else None
        self._args, self._reader = "", _reader(syntax, tool.parameters if tool else None)
        self._started = False
        self._state = "args"
        out.append(ToolCallStart(name))

    def _object_args(self, out: list[Parsed]) -> None:
        """Arguments written as one object (JSON, or a notation read into JSON)."""
        if not self._started:
            stripped = self._buffer.lstrip()
            self._take(len(self._buffer) - len(stripped))
            if not self._buffer:
                return
            args = self._syntax.args
            opens = args.opens if isinstance(args, NotationArgs) else "{"
            if not self._buffer.startswith(opens):
                self._state = "raw"
                return
            self._started = True
        chunk, used = self._reader.read(self._buffer)
        self._take(used)
        if chunk:
            self._args += chunk
            out.append(ToolCallDelta(chunk))
        # A notation that breaks off is an incomplete call: its JSON does not parse.
        if self._reader.done or self._reader.failed:
            self._state = "tail"

    def _xml_args(self, out: list[Parsed], args: XmlArgs) -> None:
        stripped = self._buffer.lstrip()
        self._take(len(self._buffer) - len(stripped))
        closed = self._close_re.match(self._buffer)
        if closed is not None:
            self._take(closed.end())
            self._end_call(out, complete=True)
            return
        match = args.param_re.match(self._buffer)
        if match is None:
            return
        self._take(match.end())
        key, value = match.group("key").strip(), match.group("value")
        if args.newline_values:
            value = value.removeprefix("\n").removesuffix("\n")
        tool = self._tools.get(self._name) if self._tools is not None else None
        props = (tool.parameters or {}).get("properties", {}) if tool is not None else {}
        member = json.dumps(key, ensure_ascii=False) + ": "
        member += json.dumps(typed_value(value, props.get(key)), ensure_ascii=False)
        chunk = ("{" if not self._args else ", ") + member
        self._args += chunk
        out.append(ToolCallDelta(chunk))

    def _arguments(self) -> tuple[dict[str, Any], bool]:
        text = self._args
        if isinstance(self._syntax.args, XmlArgs):
            text = text + "}" if text else "{}"
        try:
            value: Any = json.loads(text) if text else {}
            complete = True
        except json.JSONDecodeError:
            value, complete = repair_partial_json(text), False
        if not isinstance(value, dict):
            return {}, False
        return value, complete

    def _end_call(self, out: list[Parsed], *, complete: bool) -> None:
        if isinstance(self._syntax.args, XmlArgs):
            closing = "}" if self._args else "{}"
            out.append(ToolCallDelta(closing))
        value, whole = self._arguments()
        complete = complete and whole
        out.append(ToolCallEnd(value, complete))
        if complete:
            self.calls += 1
        self._state = "block" if self._syntax.block_open else "text"
        if self._state == "text":
            self._raw = ""

    def _raw_step(self, out: list[Parsed]) -> None:
        ends = [m for m in (self._syntax.block_close, self._syntax.call_close) if m]
        hits = [self._buffer.find(m) + len(m) for m in ends if m in self._buffer]
        if not hits:
            return
        self._take(min(hits))
        out.append(ParsedText(self._raw))
        self._raw = ""
        self._state = "text"

    def finish(self) -> list[Parsed]:
        """The output ended: release held text, close a call cut short."""
        out: list[Parsed] = []
        state = self._state
        if state == "text":
            if self._buffer:
                out.append(ParsedText(self._buffer))
        elif state in ("head", "raw"):
            if self.calls and self._syntax.block_open and not self._raw.strip():
                pass
            else:
                out.append(ParsedText(self._raw + self._buffer))
        elif state == "block":
            rest = self._buffer.strip()
            if rest:
                out.append(ParsedText(rest))
        elif state in ("args", "tail"):
            # A call whose arguments finished but whose close never came (an end-of-generation
            # token ends it) is still whole.
            if isinstance(self._syntax.args, XmlArgs):
                out.append(ToolCallDelta("}" if self._args else "{}"))
                value, _ = self._arguments()
                out.append(ToolCallEnd(value, False))
            else:
                value, whole = self._arguments()
                complete = state == "tail" and whole
                out.append(ToolCallEnd(value, complete))
                if complete:
                    self.calls += 1
        self._state, self._buffer, self._raw = "text", "", ""
        return out
