"""Tool calls in the prompt and in the model's output.

One syntax serves both directions, the one Qwen2.5/Qwen3, Hermes and many other open models are
trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that takes `tools` and knows this syntax renders the tools and the history
itself. For any other template (the bundled SmolLM2's among them) we render a generic form:
the tool list and instructions go into the system message, earlier calls into the assistant's
text, and tool results into the user turn that follows, inside `<tool_result>` tags. Either
way the grammar (`grammar.py`) makes the model's calls well-formed, and `ToolCallParser` turns
them back into structured calls, incrementally so that streaming can forward them early.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

from pensieved.engine.holdback import held_prefix
from pensieved.engine.markers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from pensieved.engine.types import ChatMessage, ToolCallDelta, ToolCallEnd, ToolCallStart, ToolSpec


def _json(value: Any) -> str:
    # Sorted keys: the same tools and calls always render to the same tokens (prefix caching).
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def render_call(name: str, arguments: dict[str, Any]) -> str:
    """A call exactly as the grammar makes the model write it."""
    body = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {_json(arguments)}}}'
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


RenderCall = Callable[[str, dict[str, Any]], str]


def tools_system_text(tools: Sequence[ToolSpec], render: RenderCall = render_call) -> str:
    """The generic tool section placed at the start of the system message; calls are shown
    as `render` writes them (the dialect's syntax)."""
    lines = [
        "# Tools",
        "",
        "You can call the tools listed below. To call one, write a tool call in exactly this "
        "form (the arguments are a JSON object that matches the tool's input_schema):",
        "",
        render("tool_name", {"argument": "value"}),
        "",
        # The text does not depend on tool_choice: it is part of the prefix every turn shares.
        "You may write a short sentence before a tool call, and make several tool calls one "
        "after another. After your tool calls, stop: the results come back in the next user "
        "message inside <tool_result> tags, and you continue from there. Answer directly, "
        "without a tool call, when no tool is needed.",
        "",
        "Available tools, one JSON object per line:",
    ]
    lines += [_definition(tool) for tool in tools]
    return "\n".join(lines)


def _definition(tool: ToolSpec) -> str:
    return _json(
        {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
    )


def loaded_tool_text(tool: ToolSpec) -> str:
    """What a tool search result says of a tool it loaded: the tool's definition, in the form the
    tool list uses, so the model reads it as one more available tool."""
    return f"Tool {tool.name} is now available. Its definition:\n{_definition(tool)}"


def _result_text(message: ChatMessage) -> str:
    ident = json.dumps(message.tool_call_id or "", ensure_ascii=False)
    return f"<tool_result tool_use_id={ident}>\n{message.content}\n</tool_result>"


def to_generic_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], render: RenderCall = render_call
) -> list[ChatMessage]:
    """Rewrite a conversation with tools for a template that knows nothing of tools.

    Tools come first in the system message, ahead of the client's system text: they are the
    part that stays identical across sessions, so sessions share the longest cached prefix.
    """
    out: list[ChatMessage] = []
    rest = list(messages)
    listed = [tool for tool in tools if not tool.deferred]
    if listed:
        system = tools_system_text(listed, render)
        if rest and rest[0].role == "system":
            system = f"{system}\n\n{rest.pop(0).content}"
        out.append(ChatMessage(role="system", content=system))
    for message in rest:
        if message.role == "assistant" and message.tool_calls:
            parts = [message.content] if message.content else []
            parts += [render(call.name, call.arguments) for call in message.tool_calls]
            out.append(ChatMessage(role="assistant", content="\n".join(parts)))
        elif message.role == "tool":
            text = _result_text(message)
            if out and out[-1].role == "user":
                out[-1] = ChatMessage(role="user", content=f"{out[-1].content}\n{text}")
            else:
                out.append(ChatMessage(role="user", content=text))
        elif message.role == "user" and out and out[-1].role == "user":
            # A user turn that follows tool results: the same turn for the template.
            out[-1] = ChatMessage(role="user", content=f"{out[-1].content}\n{message.content}")
        else:
            out.append(message)
    return out


# ---- parsing the model's output ------------------------------------------------------------


@dataclass(frozen=True)
class ParsedText:
    """Model text outside any tool call (stop sequences are applied to it afterwards)."""

    text: str


# Calls come out as the engine's own events; text is not yet checked for stop sequences.
Parsed = ParsedText | ToolCallStart | ToolCallDelta | ToolCallEnd

_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|input|parameters)"\s*:\s*'
)


class JsonEnd:
    """Finds where a streamed JSON value ends: string and escape state and bracket depth, kept
    across pieces of text."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str, start: int) -> int | None:
        """The index just past the value's closing bracket in `text`, or None if it goes on."""
        for i in range(start, len(text)):
            char = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


def steps_to_rest(
    step: Callable[[list[Parsed]], None], where: Callable[[], object]
) -> list[Parsed]:
    """Run a streaming parser's `step` until it stops moving (`where` the same before and
    after); what the steps emitted."""
    out: list[Parsed] = []
    while True:
        before = where()
        step(out)
        if where() == before:
            return out


class ToolCallParser:
    """Splits streamed model text into plain text and tool calls.

    Feed it text as it is generated; it returns what can be forwarded now. Text that might be
    the start of `<tool_call>` is held back until it is decided. A call's name is reported as
    soon as it is complete and its arguments are forwarded as raw JSON fragments whose
    concatenation is the arguments object. Output that opens a call but is not a well-formed
    call of a known tool is returned as text, unchanged.
    """

    def __init__(self, known_names: Sequence[str] | None = None) -> None:
        self._known = set(known_names) if known_names is not None else None
        self._state = "text"  # text | head | args | tail | raw
        self._buffer = ""  # undecided text of the current state
        self._raw = ""  # the whole current call as written, for falling back to text
        self._args = ""  # argument JSON forwarded so far
        self._json = JsonEnd()
        self._started_args = False
        self.calls = 0  # complete calls so far

    @property
    def in_call(self) -> bool:
        return self._state != "text"

    def feed(self, text: str) -> list[Parsed]:
        self._buffer += text
        return steps_to_rest(self._step, lambda: (self._state, len(self._buffer)))

    def _step(self, out: list[Parsed]) -> None:
        if self._state == "text":
            at = self._buffer.find(TOOL_CALL_OPEN)
            if at >= 0:
                if at:
                    out.append(ParsedText(self._buffer[:at]))
                self._raw = TOOL_CALL_OPEN
                self._buffer = self._buffer[at + len(TOOL_CALL_OPEN) :]
                self._state = "head"
                return
            keep = held_prefix(self._buffer, TOOL_CALL_OPEN)
            cut = len(self._buffer) - keep
            if cut > 0:
                out.append(ParsedText(self._buffer[:cut]))
                self._buffer = self._buffer[cut:]
        elif self._state == "head":
            match = _HEADER.match(self._buffer)
            if match is not None:
                # Report the call only once its arguments open as an object; anything else
                # is judged whole at the closing tag (and may turn out to be text).
                after = self._buffer[match.end() :].lstrip()
                if not after:
                    return
                if not after.startswith("{"):
                    self._state = "raw"
                    return
                try:
                    name = json.loads(f'"{match.group(1)}"')
                except json.JSONDecodeError:
                    name = None
                if isinstance(name, str) and (self._known is None or name in self._known):
                    self._raw += match.group(0)
                    self._buffer = self._buffer[match.end() :]
                    self._state = "args"
                    self._args, self._json = "", JsonEnd()
                    self._started_args = False
                    out.append(ToolCallStart(name))
                    return
                self._state = "raw"
                return
            if TOOL_CALL_CLOSE in self._buffer:
                self._state = "raw"
        elif self._state == "args":
            self._scan_args(out)
        elif self._state == "tail":
            at = self._buffer.find(TOOL_CALL_CLOSE)
            if at >= 0:
                self._buffer = self._buffer[at + len(TOOL_CALL_CLOSE) :]
                out.append(self._end(complete=True))
                self.calls += 1
                self._state = "text"
        elif self._state == "raw":
            at = self._buffer.find(TOOL_CALL_CLOSE)
            if at >= 0:
                body = self._buffer[:at]
                whole = self._raw + body + TOOL_CALL_CLOSE
                self._buffer = self._buffer[at + len(TOOL_CALL_CLOSE) :]
                self._state = "text"
                out.extend(self._parse_whole(body, whole))

    def _scan_args(self, out: list[Parsed]) -> None:
        text = self._buffer
        i = 0
        if not self._started_args:
            while i < len(text) and text[i].isspace():
                i += 1
            if i == len(text):
                self._raw += text
                self._buffer = ""
                return
            self._started_args = True
            self._raw += text[:i]
            text = text[i:]
            i = 0
        end = self._json.scan(text, i)
        chunk = text[:end] if end is not None else text
        if chunk:
            self._args += chunk
            self._raw += chunk
            out.append(ToolCallDelta(chunk))
        self._buffer = text[end:] if end is not None else ""
        if end is not None:
            self._state = "tail"

    def _parse_whole(self, body: str, whole: str) -> list[Parsed]:
        """A call that did not follow the streaming shape: accept it if it is valid JSON."""
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return [ParsedText(whole)]
        if not isinstance(data, dict):
            return [ParsedText(whole)]
        name = data.get("name")
        args: Any = next((data[k] for k in ("arguments", "input", "parameters") if k in data), {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return [ParsedText(whole)]
        known = self._known is None or name in self._known
        if not isinstance(name, str) or not isinstance(args, dict) or not known:
            return [ParsedText(whole)]
        self.calls += 1
        encoded = json.dumps(args, ensure_ascii=False)
        return [ToolCallStart(name), ToolCallDelta(encoded), ToolCallEnd(args, True)]

    def _end(self, *, complete: bool) -> ToolCallEnd:
        value: Any = None
        try:
            value = json.loads(self._args) if self._args else {}
        except json.JSONDecodeError:
            value = repair_partial_json(self._args)
            complete = False
        if not isinstance(value, dict):
            value, complete = {}, False
        return ToolCallEnd(value, complete)

    def finish(self) -> list[Parsed]:
        """The output ended: release held text, close a call cut short."""
        out: list[Parsed] = []
        if self._state == "text":
            if self._buffer:
                out.append(ParsedText(self._buffer))
        elif self._state in ("head", "raw"):
            out.append(ParsedText(self._raw + self._buffer))
        elif self._state in ("args", "tail"):
            end = self._end(complete=self._state == "tail")
            # A call whose arguments finished but whose close tag never came is still whole.
            out.append(end)
            if end.complete:
                self.calls += 1
        self._state, self._buffer, self._raw = "text", "", ""
        return out


def repair_partial_json(text: str) -> Any:
    """Best-effort value of JSON cut off mid-way (a string cut short keeps what it has);
    None when nothing of it is a value."""
    try:
        return from_json(text, allow_partial="trailing-strings")
    except ValueError:
        return None
