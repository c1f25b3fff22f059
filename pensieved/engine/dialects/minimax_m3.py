"""MiniMax-M3: every tag led by the namespace token `]<]minimax[>[` (`NS` here), and each
argument an element named after its key, its value expanded into nested elements:

    NS<tool_call>
    NS<invoke name="NAME">NS<city>Paris NS</city>NS<opts>NS<deep>trueNS</deep>NS</opts>NS</invoke>
    NS</tool_call>

(the template's `to_xml` macro, written with no space between the tags: a mapping is one
element per key, a list one `<item>` element per item, booleans as JSON, None left out, and
strings and numbers raw). What a raw value is comes from the tool's schema: a string stays
text, anything else is read as JSON. Reasoning is in `<mm:think>` … `</mm:think>`, switched by
the template's `thinking_mode` (`enabled` opens the block in the generation prompt,
`disabled` closes it there, a bare `</mm:think>`, which every turn without reasoning also
starts with in the history and which the model may write itself: it is dropped from text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pensieved.engine.dialects.base import Dialect, NotationArgs, Reasoning, Syntax
from pensieved.engine.dialects.build import ANY_KEY, ANY_OBJECT, BOOLEAN, NUMBER, text_without
from pensieved.engine.dialects.parser import typed_value
from pensieved.engine.gbnf import escape_literal, integer_range_rule
from pensieved.engine.holdback import held_prefix
from pensieved.engine.llama import SchemaConverter
from pensieved.engine.schema import normalise

NS = "]<]minimax[>["  # the namespace token before every tag
_OPEN, _CLOSE = f"{NS}<tool_call>", f"{NS}</tool_call>"
_INVOKE_CLOSE = f"{NS}</invoke>"
_THINK, _THINK_END = "<mm:think>", "</mm:think>"


# ---- writing: the template's `to_xml` ------------------------------------------------------


def to_xml(value: Any) -> str:
    """`value` as MiniMax-M3's template writes an argument's value."""
    if isinstance(value, dict):
        return "".join(f"{NS}<{k}>{to_xml(v)}{NS}</{k}>" for k, v in value.items() if v is not None)
    if isinstance(value, list | tuple):
        return "".join(f"{NS}<item>{to_xml(v)}{NS}</item>" for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _render(name: str, arguments: dict[str, Any]) -> str:
    return f'{_OPEN}\n{NS}<invoke name="{name}">{to_xml(arguments)}{_INVOKE_CLOSE}\n{_CLOSE}'


# ---- reading: the nested elements as streamed JSON -----------------------------------------

# A tag not closed within this many characters is not the notation.
_TAG_LIMIT = 256


def _may_be_string(schema: Any) -> bool:
    """Whether a value of `schema` is written as text (a union with a string in it is, as
    llama.cpp reads it: text cannot tell the alternatives apart)."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return True
    values = schema.get("enum", [schema["const"]] if "const" in schema else [])
    if values and all(isinstance(v, str) for v in values):
        return True
    alternatives: list[Any] = schema.get("anyOf") or schema.get("oneOf") or []
    return any(_may_be_string(s) for s in alternatives)


def _kind(schema: Any) -> str | None:
    """`object` or `array` when `schema` says the value is one, else None."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    return kind if kind in ("object", "array") else None


@dataclass
class _Container:
    """An object or array being read: the element it is the value of (None: the arguments)."""

    array: bool
    schema: Any
    tag: str | None
    count: int = 0

    def child(self, name: str) -> Any:
        if not isinstance(self.schema, dict):
            return None
        if self.array:
            return self.schema.get("items")
        return self.schema.get("properties", {}).get(name)


@dataclass
class M3Reader:
    """Translates one call's arguments from MiniMax-M3's elements into JSON as they stream:
    a member's key at its opening tag, a string's text as it arrives, another value when
    its closing tag does."""

    schema: dict[str, Any] | None = None
    done: bool = False
    failed: bool = False
    _open: list[_Container] = field(default_factory=list)
    _value: tuple[str, Any] | None = None  # the element whose value is read: tag, schema
    _string: bool = False  # that value is text (its schema says so), streamed as it comes

    def read(self, text: str) -> tuple[str, int]:
        out: list[str] = []
        if not self._open:
            self._open.append(_Container(False, self.schema, None))
            out.append("{")
        at = 0
        while at < len(text) and not (self.done or self.failed):
            used = self._step(text, at, out)
            if not used:
                break  # what is left needs more text to decide
            at += used
        return "".join(out), at

    def _step(self, text: str, at: int, out: list[str]) -> int:
        if self._value is None:
            return self._members(text, at, out)
        tag, schema = self._value
        close = f"{NS}</{tag}>"
        if self._string:
            end = text.find(close, at)
            if end < 0:
                cut = len(text) - held_prefix(text[at:], close)
                out.append(json.dumps(text[at:cut], ensure_ascii=False)[1:-1])
                return cut - at
            out.append(json.dumps(text[at:end], ensure_ascii=False)[1:-1] + '"')
            self._value, self._string = None, False
            return end + len(close) - at
        rest = text[at:].lstrip()
        if not rest or (NS.startswith(rest[: len(NS)]) and len(rest) < len(NS)):
            return 0  # perhaps a tag, cut off
        if rest.startswith(NS + "<") and not rest.startswith(NS + "</"):
            tag_end = rest.find(">", len(NS))
            if tag_end < 0:
                self.failed = len(rest) > _TAG_LIMIT
                return 0
            child = rest[len(NS) + 1 : tag_end]
            kind = _kind(schema) or ("array" if child == "item" else "object")
            out.append("[" if kind == "array" else "{")
            self._open.append(_Container(kind == "array", schema, tag))
            self._value = None
            return self._members(text, at, out)  # the child's tag is the first member
        end = text.find(close, at)
        if end < 0:
            self.failed = len(text) - at > 64 * _TAG_LIMIT
            return 0
        raw = text[at:end]
        empty = {"object": "{}", "array": "[]"}.get(_kind(schema) or "", '""')
        value = json.dumps(typed_value(raw, schema), ensure_ascii=False) if raw else empty
        out.append(value)
        self._value = None
        return end + len(close) - at

    def _members(self, text: str, at: int, out: list[str]) -> int:
        """At a container's next member, or at its closing tag."""
        rest = text[at:].lstrip()
        skipped = len(text) - at - len(rest)
        if not rest:
            return skipped
        if not rest.startswith(NS):
            self.failed = not NS.startswith(rest)
            return skipped
        tag_end = rest.find(">", len(NS))
        if tag_end < 0:
            self.failed = len(rest) > _TAG_LIMIT
            return skipped
        container = self._open[-1]
        if rest.startswith(NS + "</"):
            if container.tag is None:  # the invoke's close: the arguments end
                out.append("}")
                self.done = True
                return skipped
            self._open.pop()
            out.append("]" if container.array else "}")
            return skipped + tag_end + 1
        if not rest.startswith(NS + "<"):
            self.failed = True
            return skipped
        name = rest[len(NS) + 1 : tag_end]
        comma = ", " if container.count else ""
        key = "" if container.array else json.dumps(name, ensure_ascii=False) + ": "
        out.append(comma + key)
        container.count += 1
        self._value = (name, container.child(name))
        self._string = _may_be_string(self._value[1])
        if self._string:
            out.append('"')
        return skipped + tag_end + 1


def _reader(schema: dict[str, Any] | None) -> M3Reader:
    return M3Reader(schema)


# ---- the grammar: the elements typed from a schema -----------------------------------------

_ANY = {
    "m3-any": "m3-element+ | m3-text",
    "m3-element": f'{escape_literal(NS + "<")} {ANY_KEY} ">" m3-any '
    f'{escape_literal(NS + "</")} {ANY_KEY} ">"',
    # Text cannot hold the namespace token (without its first character, which repeats).
    "m3-text": text_without(NS[1:]),
    "m3-number": NUMBER,
    "m3-boolean": BOOLEAN,
    "m3-null": '"null"',
}


def _element(key: str, value: str) -> str:
    return f"{escape_literal(f'{NS}<{key}>')} {value} {escape_literal(f'{NS}</{key}>')}"


class _Elements:
    """Adds the GBNF of values written as MiniMax-M3's elements, typed from normalised
    schemas. Text is raw, so a string's length, pattern and format are not enforced (as in
    the other XML-style dialects); everything else is, as in the JSON grammar."""

    def __init__(self, converter: SchemaConverter) -> None:
        self._converter = converter
        for name, body in _ANY.items():
            converter.add_rule(name, body)

    def _rule(self, name: str, body: str) -> str:
        return self._converter.add_rule(name, body)

    def value(self, schema: dict[str, Any], name: str) -> str:
        """A rule name or a literal for values valid against `schema`."""
        if not schema:
            return "m3-any"
        if "const" in schema:
            return escape_literal(to_xml(schema["const"]))
        if "enum" in schema:
            return self._rule(name, " | ".join(escape_literal(to_xml(v)) for v in schema["enum"]))
        if _may_be_string(schema):
            return "m3-text"
        if "anyOf" in schema:
            options = [self.value(s, f"{name}-{i}") for i, s in enumerate(schema["anyOf"])]
            return self._rule(name, " | ".join(options))
        kind = schema.get("type")
        if kind == "integer":
            low, high = schema.get("x-range", (None, None))
            return self._rule(f"{name}-int", integer_range_rule(low, high))
        if kind == "array":
            return self._array(schema, name)
        if kind == "object":
            return self.members(schema, name)
        if kind in ("number", "boolean", "null"):
            return f"m3-{kind}"
        return "m3-any"

    def _array(self, schema: dict[str, Any], name: str) -> str:
        if "prefixItems" in schema:
            each = [
                _element("item", self.value(s, f"{name}-{i}"))
                for i, s in enumerate(schema["prefixItems"])
            ]
            return self._rule(name, " ".join(each))
        item = self._rule(
            f"{name}-item", _element("item", self.value(schema.get("items", {}), f"{name}-v"))
        )
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high == 0:
            return '""'
        more = f"{{{low},{'' if high is None else high}}}"
        return self._rule(name, f"{item}{more}" if (low, high) != (0, None) else f"{item}*")

    def members(self, schema: dict[str, Any], name: str) -> str:
        """An object's elements, in the schema's order (the required ones always)."""
        if "properties" not in schema:
            return self._rule(name, "m3-element*")
        required = set(schema.get("required", []))
        parts = []
        for index, (key, prop) in enumerate(schema["properties"].items()):
            element = _element(key, self.value(prop, f"{name}-{index}"))
            parts.append(f"( {element} )" if key in required else f"( {element} )?")
        extra = schema.get("additionalProperties", False)
        if extra is not False:
            any_value = self.value(extra if isinstance(extra, dict) else {}, f"{name}-extra")
            parts.append(
                f'( {escape_literal(NS + "<")} {ANY_KEY} ">" {any_value} '
                f'{escape_literal(NS + "</")} {ANY_KEY} ">" )*'
            )
        return self._rule(name, " ".join(parts) or '""')


def _args_rule(
    converter: SchemaConverter, schema: dict[str, Any], name: str
) -> tuple[str, list[str]]:
    normalised, loosened = normalise(schema)
    if normalised.get("type") != "object":
        normalised = ANY_OBJECT
    return _Elements(converter).members(normalised, f"{name}-args"), loosened


def _switches(thinking: bool) -> dict[str, Any]:
    return {"thinking_mode": "enabled" if thinking else "disabled"}


MINIMAX_M3 = Dialect(
    name="minimax-m3",
    syntax=Syntax(
        trigger=_OPEN,
        block_open=_OPEN,
        block_close=_CLOSE,
        head=lambda name: escape_literal(f'{NS}<invoke name="{name}">'),
        head_re=re.compile(re.escape(NS) + r'<invoke name="(?P<name>[^"]+)">'),
        args=NotationArgs(reader=_reader, rule=_args_rule, opens=""),
        call_close=_INVOKE_CLOSE,
        render=_render,
        drop=(_THINK_END,),
    ),
    reasoning=Reasoning(open=_THINK, close=_THINK_END, switches=_switches),
)
