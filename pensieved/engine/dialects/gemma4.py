"""Gemma 4: a call's arguments in a JSON-like notation of its own,

    <|tool_call>call:NAME{city:<|"|>Paris<|"|>,days:3,opts:{deep:true,tags:[<|"|>a<|"|>]}}<tool_call|>

keys unquoted and in sorted order (the template writes them with `dictsort`), strings between
`<|"|>` delimiters with nothing escaped, numbers and `true`/`false` as JSON, null as Python's
`None`. Reasoning sits in a `<|channel>thought\n` … `<channel|>` block, switched on by the
template's `enable_thinking` (a `<|think|>` line in the system turn; off, the generation
prompt closes an empty thought block itself). After its answer the model may write another
empty thought block or a lone `<channel|>` (llama.cpp's parser allows both): those are dropped
from the visible text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, NotationArgs, Reasoning, Syntax
from pensieved.engine.dialects.build import ANY_KEY, ANY_OBJECT, BOOLEAN, NUMBER, text_without
from pensieved.engine.gbnf import escape_literal, integer_range_rule
from pensieved.engine.holdback import held_prefix
from pensieved.engine.llama import SchemaConverter
from pensieved.engine.schema import normalise

QUOTE = '<|"|>'  # the string delimiter, a token of Gemma 4's own
_OPEN, _CLOSE = "<|tool_call>", "<tool_call|>"
_THOUGHT, _THOUGHT_END = "<|channel>thought", "<channel|>"
_CLOSERS = {"{": "}", "[": "]"}


# ---- writing: the template's `format_argument` ---------------------------------------------


def write(value: Any) -> str:
    """`value` in Gemma 4's notation, as its template writes a call's arguments."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "None"  # Jinja prints Python's None
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{write(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(write(v) for v in value) + "]"
    return json.dumps(value)


def _render(name: str, arguments: dict[str, Any]) -> str:
    return f"{_OPEN}call:{name}{write(arguments)}{_CLOSE}"


# ---- reading: the notation as streamed JSON ------------------------------------------------

# Values outside strings are JSON numbers, or words the template or llama.cpp may write.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_WORDS = {"true": "true", "false": "false", "null": "null", "None": "null"}
_WORDS |= {"True": "true", "False": "false"}
_TOKEN_END = re.compile(r"[,}\]]")
# A key or bare value that has not ended within this many characters is not the notation.
_TOKEN_LIMIT = 256


def _json_chars(text: str) -> str:
    """`text` escaped for the inside of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _bare(token: str) -> str:
    """A value written without delimiters, as JSON (one the model left bare that is no
    number or word is taken as the string it evidently meant)."""
    if token in _WORDS:
        return _WORDS[token]
    if _NUMBER.fullmatch(token):
        return token
    return json.dumps(token, ensure_ascii=False)


class Gemma4Reader:
    """Translates one arguments object from Gemma 4's notation into JSON as it streams: a
    string's text as it arrives, a key at its colon, a number or word at what ends it."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self.done = False  # (the notation types its values itself: `schema` is not needed)
        self.failed = False
        self._open: list[str] = []  # the brackets open, innermost last
        self._expect = "value"  # value | key | string | next (a comma or a close)
        self._fresh = False  # just after an opening bracket, where it may close at once

    def read(self, text: str) -> tuple[str, int]:
        out: list[str] = []
        at = 0
        while at < len(text) and not (self.done or self.failed):
            used = self._step(text, at, out)
            if not used:
                break  # what is left needs more text to decide
            at += used
        return "".join(out), at

    def _step(self, text: str, at: int, out: list[str]) -> int:
        """Read one piece at `at`; how many characters it used (0: wait for more)."""
        if self._expect == "string":
            end = text.find(QUOTE, at)
            if end < 0:
                cut = len(text) - held_prefix(text[at:], QUOTE)
                out.append(_json_chars(text[at:cut]))
                return cut - at
            out.append(_json_chars(text[at:end]) + '"')
            self._expect = "next"
            return end + len(QUOTE) - at
        char = text[at]
        if char.isspace():
            return 1
        if self._fresh and self._open and char == _CLOSERS[self._open[-1]]:
            return self._close(char, out)
        self._fresh = False
        if self._expect == "key":
            return self._key(text, at, out)
        if self._expect == "value":
            return self._value(text, at, out)
        if char == ",":
            out.append(",")
            self._expect = "key" if self._open[-1] == "{" else "value"
            return 1
        if char == _CLOSERS[self._open[-1]]:
            return self._close(char, out)
        self.failed = True
        return 0

    def _close(self, char: str, out: list[str]) -> int:
        self._open.pop()
        out.append(char)
        self._fresh = False
        self._expect = "next"
        self.done = not self._open
        return 1

    def _key(self, text: str, at: int, out: list[str]) -> int:
        colon = text.find(":", at)
        if colon < 0:
            self.failed = len(text) - at > _TOKEN_LIMIT
            return 0
        key = text[at:colon].strip().removeprefix(QUOTE).removesuffix(QUOTE)
        if not key or any(c in key for c in ",{}[]"):
            self.failed = True
            return 0
        out.append(json.dumps(key, ensure_ascii=False) + ":")
        self._expect = "value"
        return colon + 1 - at

    def _value(self, text: str, at: int, out: list[str]) -> int:
        if text.startswith(QUOTE, at):
            out.append('"')
            self._expect = "string"
            return len(QUOTE)
        if QUOTE.startswith(text[at:]):
            return 0  # perhaps a delimiter, cut off
        char = text[at]
        if char in _CLOSERS:
            self._open.append(char)
            out.append(char)
            self._fresh = True
            self._expect = "key" if char == "{" else "value"
            return 1
        end = _TOKEN_END.search(text, at)
        if end is None:
            self.failed = len(text) - at > _TOKEN_LIMIT
            return 0
        token = text[at : end.start()].strip()
        if not token:
            self.failed = True
            return 0
        out.append(_bare(token))
        self._expect = "next"
        return end.start() - at


# ---- the grammar: the notation typed from a schema -----------------------------------------

_Q = escape_literal(QUOTE)
# Any value, for schemas that leave a value open (the names are shared by every tool).
_ANY = {
    "gemma4-value": (
        "gemma4-string | gemma4-number | gemma4-object | gemma4-array | gemma4-boolean "
        "| gemma4-null"
    ),
    "gemma4-string": f"{_Q} gemma4-text {_Q}",
    "gemma4-text": text_without(QUOTE),
    "gemma4-number": NUMBER,
    "gemma4-boolean": BOOLEAN,
    "gemma4-null": '"None" | "null"',
    "gemma4-member": f'{ANY_KEY} ":" gemma4-value',
    "gemma4-object": '"{" ( gemma4-member ( "," gemma4-member )* )? "}"',
    "gemma4-array": '"[" ( gemma4-value ( "," gemma4-value )* )? "]"',
}


class _Notation:
    """Adds the GBNF of values in Gemma 4's notation, typed from normalised schemas. A
    string's text is raw, so its length, pattern and format are not enforced (as in the
    XML-style dialects); everything else is, as in the JSON grammar."""

    def __init__(self, converter: SchemaConverter) -> None:
        self._converter = converter
        for name, body in _ANY.items():
            converter.add_rule(name, body)

    def value(self, schema: dict[str, Any], name: str) -> str:
        """A rule name or a literal for values valid against `schema`."""
        if not schema:
            return "gemma4-value"
        if "const" in schema:
            return escape_literal(write(schema["const"]))
        if "enum" in schema:
            return self._rule(name, " | ".join(escape_literal(write(v)) for v in schema["enum"]))
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
            return self._object(schema, name)
        return f"gemma4-{kind}"  # string, number, boolean, null: as in any value

    def _rule(self, name: str, body: str) -> str:
        return self._converter.add_rule(name, body)

    def _array(self, schema: dict[str, Any], name: str) -> str:
        if "prefixItems" in schema:
            each = [self.value(s, f"{name}-{i}") for i, s in enumerate(schema["prefixItems"])]
            return self._rule(name, '"[" ' + ' "," '.join(each) + ' "]"')
        item = self.value(schema.get("items", {}), f"{name}-item")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high == 0:
            return self._rule(name, '"[" "]"')
        if high is None and low <= 1:
            more = "*"
        else:
            more = f"{{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
        items = f'{item} ( "," {item} ){more}'
        return self._rule(name, f'"[" {items if low else f"( {items} )?"} "]"')

    def _object(self, schema: dict[str, Any], name: str) -> str:
        if "properties" not in schema:
            return "gemma4-object"
        props: dict[str, Any] = schema["properties"]
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties", False)
        # Members in sorted order, as the template writes them (keys the schema leaves open
        # come after them). `after` is the members from one on when one is written already
        # (so each starts with its comma), `first` when none is: a rule each where two places
        # use it, which keeps optional members at linear size. Before the first required
        # member every path goes through it, so `first` is needed from there on only.
        keys = sorted(props)
        needed = next((i for i, key in enumerate(keys) if key in required), len(keys))
        rest = "" if extra is False else f'{ANY_KEY} ":" {self.value(extra, f"{name}-extra")}'
        after = self._rule(f"{name}-more", f'( "," {rest} )*') if rest else ""
        first = f"( {rest} {after} )?" if rest else ""
        for index in range(len(keys) - 1, -1, -1):
            key = keys[index]
            member = f"{escape_literal(key + ':')} {self.value(props[key], f'{name}-{index}')}"
            if key in required:
                first, step = _seq(member, after), _seq('","', member, after)
            else:
                step = _seq(f'( "," {member} )?', after)
                if index < needed:
                    alone = self._rule(f"{name}-first{index + 1}", first) if first else ""
                    itself = _seq(member, after)
                    first = f"{itself} | {alone}" if alone else f"( {itself} )?"
            after = self._rule(f"{name}-after{index}", step) if index else ""
        return self._rule(name, _seq('"{"', f"( {first} )" if first else "", '"}"'))


def _seq(*parts: str) -> str:
    """GBNF of `parts` one after another (empty ones left out)."""
    return " ".join(part for part in parts if part)


def _args_rule(
    converter: SchemaConverter, schema: dict[str, Any], name: str
) -> tuple[str, list[str]]:
    normalised, loosened = normalise(schema)
    # A schema that says nothing still takes an object, as a call's arguments are one.
    return _Notation(converter).value(normalised or ANY_OBJECT, f"{name}-args"), loosened


GEMMA4 = Dialect(
    name="gemma4",
    syntax=Syntax(
        trigger=_OPEN,
        head=lambda name: escape_literal(f"{_OPEN}call:{name}"),
        head_re=re.compile(re.escape(_OPEN) + r"\s*call:(?P<name>[^{\s<]+)(?=\s*\{)"),
        args=NotationArgs(reader=Gemma4Reader, rule=_args_rule),
        call_close=_CLOSE,
        render=_render,
        drop=(f"{_THOUGHT}\n{_THOUGHT_END}", _THOUGHT_END),
    ),
    reasoning=Reasoning(open=_THOUGHT, close=_THOUGHT_END),
)
