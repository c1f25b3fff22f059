"""GBNF grammars that make tool calls and structured output valid by construction.

The JSON-schema part comes from llama-cpp-python's converter (`llama_cpp.llama_grammar`). That
converter asserts on schemas it does not understand, so every schema is first normalised into
the subset it handles, and what cannot be expressed is loosened, never rejected:

* enforced: `type` (including lists of types), `properties`, `required`,
  `additionalProperties` (false, true or a schema), `enum`, `const`, `anyOf`/`oneOf`,
  `allOf` of objects, `items`/`prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`,
  local `$ref`s (`#/$defs/...`, `#/definitions/...`, inlined; recursive ones become "any
  value"), `format` date / time / date-time / uuid, integer `minimum`/`maximum`/
  `exclusiveMinimum`/`exclusiveMaximum`, and `pattern` when it is a regular expression whose
  matches cannot contain a quote, a backslash or a control character (no `.`, no negated
  classes, no `\\S`/`\\W`/`\\D`); an unanchored pattern is anchored, which only narrows it.
* accepted but not enforced: `propertyNames`, `not`, `if`/`then`/`else`, `uniqueItems`,
  `multipleOf`, `dependentRequired`, bounds on non-integer numbers, other `format`s (`uri`,
  `email`, ...), remote `$ref`s and patterns outside the subset above.
* a schema the converter still fails on falls back to "any JSON object" for that tool: the
  output is then valid JSON of the right shape, though not checked against every constraint.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from pensieved.engine.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from pensieved.engine.types import GenerationRequest, ToolSpec

log = logging.getLogger("pensieved.engine")

# The converter's own `char` admits raw control characters, which strict JSON parsers reject.
_STRICT_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_KNOWN_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
_MAX_DEPTH = 24
# Regex features whose matches might include `"`, `\` or control characters (which would break
# the JSON string the pattern lives in), or which the converter cannot translate: negated
# classes, letter/digit escapes (\d, \s, \w, ...), group modifiers, lazy quantifiers, quotes.
_UNSAFE_PATTERN = re.compile(r"\[\^|\\[A-Za-z0-9\\]|\(\?|\"|[*+?}]\?")


def _dot_outside_class(pattern: str) -> bool:
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "." and not in_class:
            return True
    return False


def _class_range_unsafe(pattern: str) -> bool:
    """A class range such as `[ -~]` that spans `"`, `\\` or control characters."""
    for body in re.findall(r"\[([^\]]*)\]", pattern):
        for low, high in re.findall(r"(.)-(.)", body):
            if low <= "\\" <= high or low <= '"' <= high or low < " ":
                return True
    return False


_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    out = []
    for char in text:
        if char in _GBNF_ESCAPES:
            out.append(_GBNF_ESCAPES[char])
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class _Normaliser:
    """Rewrites a schema into the subset the converter handles (see the module docstring)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.loosened: set[str] = set()

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#/"):
            self.loosened.add(f"$ref {ref}")
            return None
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                self.loosened.add(f"$ref {ref}")
                return None
            target = target[part]
        return target

    def visit(self, schema: Any, depth: int = 0, refs: tuple[str, ...] = ()) -> dict[str, Any]:
        if schema is True or schema is None or not isinstance(schema, dict):
            return {}
        if depth > _MAX_DEPTH:
            self.loosened.add("deep nesting")
            return {}
        self._note_unenforced(schema)
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or ref in refs:
                self.loosened.add("recursive $ref")
                return {}
            target = self._resolve(ref)
            if target is None:
                return {}
            merged = {k: v for k, v in schema.items() if k != "$ref"}
            merged = {**target, **merged} if isinstance(target, dict) else merged
            return self.visit(merged, depth + 1, (*refs, ref))
        out: dict[str, Any] = {}
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k in _KNOWN_TYPES]
            if len(kinds) == 1:
                kind = kinds[0]
            elif kinds:
                alternatives = []
                for k in kinds:
                    alternatives.append(self.visit({**schema, "type": k}, depth + 1, refs))
                return {"anyOf": alternatives}
            else:
                kind = None
        if kind is not None and kind not in _KNOWN_TYPES:
            kind = None
        if "const" in schema:
            return {"const": schema["const"]}
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return {"enum": list(schema["enum"])}
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                alternatives = []
                for option in options:
                    combined = {**base, **option} if isinstance(option, dict) else base
                    alternatives.append(self.visit(combined, depth + 1, refs))
                return {"anyOf": alternatives}
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict) and "$ref" in part:
                    part = self._resolve(part["$ref"]) or {}
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.visit(merged, depth + 1, refs)
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return {}
        out["type"] = kind
        if kind == "object":
            self._object(schema, out, depth, refs)
        elif kind == "array":
            self._array(schema, out, depth, refs)
        elif kind == "string":
            return self._string(schema, out)
        elif kind == "integer":
            return self._integer(schema, out)
        elif kind == "number" and any(k in schema for k in ("minimum", "maximum")):
            self.loosened.add("number bounds")
        return out

    def _note_unenforced(self, schema: dict[str, Any]) -> None:
        for key in ("propertyNames", "not", "if", "uniqueItems", "multipleOf", "dependentRequired"):
            if key in schema:
                self.loosened.add(key)

    def _object(
        self, schema: dict[str, Any], out: dict[str, Any], depth: int, refs: tuple[str, ...]
    ) -> None:
        properties = schema.get("properties")
        if isinstance(properties, dict):
            out["properties"] = {
                str(name): self.visit(sub, depth + 1, refs) for name, sub in properties.items()
            }
            required = schema.get("required")
            if isinstance(required, list):
                out["required"] = [r for r in required if r in out["properties"]]
        extra = schema.get("additionalProperties")
        if extra is False:
            out["additionalProperties"] = False
            out.setdefault("properties", {})
        elif isinstance(extra, dict):
            out["additionalProperties"] = self.visit(extra, depth + 1, refs)
            out.setdefault("properties", {})
        elif "properties" in out:
            # JSON Schema allows extra keys by default; the grammar does not add them, which
            # only narrows the output (it still validates).
            pass

    def _array(
        self, schema: dict[str, Any], out: dict[str, Any], depth: int, refs: tuple[str, ...]
    ) -> None:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(prefix, list) and prefix:
            out["prefixItems"] = [self.visit(p, depth + 1, refs) for p in prefix]
            return
        item = self.visit(items, depth + 1, refs) if isinstance(items, dict) else {}
        if not item:
            return  # the converter's plain array: any values, any length
        out["items"] = item
        for key in ("minItems", "maxItems"):
            if isinstance(schema.get(key), int) and schema[key] >= 0:
                out[key] = schema[key]

    def _string(self, schema: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            anchored = _anchor(pattern)
            if anchored is not None:
                out["pattern"] = anchored
                return out
            self.loosened.add("pattern")
        fmt = schema.get("format")
        if fmt in ("date", "time", "date-time", "uuid"):
            out["format"] = fmt
            return out
        if fmt is not None:
            self.loosened.add(f"format {fmt}")
        for key in ("minLength", "maxLength"):
            if isinstance(schema.get(key), int) and schema[key] >= 0:
                out[key] = schema[key]
        return out

    def _integer(self, schema: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        low, high = _int_bounds(schema)
        if low is None and high is None:
            return out
        return {"type": "integer", "x-range": [low, high]}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if key == "properties" and isinstance(value, dict):
            merged["properties"] = {**merged.get("properties", {}), **value}
        elif key == "required" and isinstance(value, list):
            merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
        else:
            merged.setdefault(key, value)
    return merged


def _anchor(pattern: str) -> str | None:
    """Anchor a regex to the whole string (a strengthening), or None if it is not safe."""
    if (
        _UNSAFE_PATTERN.search(pattern)
        or _dot_outside_class(pattern)
        or _class_range_unsafe(pattern)
    ):
        return None
    body = pattern
    if body.startswith("^"):
        body = body[1:]
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    if "|" in body:
        body = f"({body})"
    try:
        re.compile(body)
    except re.error:
        return None
    return f"^{body}$"


def _int_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    import math

    def number(key: str) -> float | None:
        value = schema.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    low: int | None = None
    high: int | None = None
    if (v := number("minimum")) is not None:
        low = math.ceil(v)
    if (v := number("exclusiveMinimum")) is not None:
        candidate = math.floor(v) + 1
        low = candidate if low is None else max(low, candidate)
    elif schema.get("exclusiveMinimum") is True and low is not None:  # draft 4
        low += 1
    if (v := number("maximum")) is not None:
        high = math.floor(v)
    if (v := number("exclusiveMaximum")) is not None:
        candidate = math.ceil(v) - 1
        high = candidate if high is None else min(high, candidate)
    elif schema.get("exclusiveMaximum") is True and high is not None:
        high -= 1
    return low, high


# ---- integer ranges as grammar -------------------------------------------------------------


def _digits_between(a: str, b: str) -> str:
    """GBNF matching every digit string of len(a) between a and b (same length, a <= b)."""
    if not a:
        return ""
    if a == b:
        return _escape_literal(a)
    if a[0] == b[0]:
        return f'"{a[0]}" ({_digits_between(a[1:], b[1:])})'
    rest = len(a) - 1
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"[{a[0]}-{b[0]}]" + " [0-9]" * rest
    parts = []
    parts.append(f'"{a[0]}" ({_digits_between(a[1:], "9" * rest)})' if rest else f'"{a[0]}"')
    if int(b[0]) - int(a[0]) > 1:
        parts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + " [0-9]" * rest)
    parts.append(f'"{b[0]}" ({_digits_between("0" * rest, b[1:])})' if rest else f'"{b[0]}"')
    return " | ".join(f"({p})" for p in parts)


_MAX_DIGITS = 16  # the converter's own integers stop at 16 digits


def _nonneg_range(low: int, high: int | None) -> str:
    """Non-negative integers in [low, high] (high None: unbounded), no leading zeros."""
    alternatives = []
    top = len(str(high)) if high is not None else len(str(low))
    if high is None and top < _MAX_DIGITS:
        alternatives.append(f"[1-9] [0-9]{{{top},{_MAX_DIGITS - 1}}}")
    for length in range(len(str(low)), top + 1):
        first = max(low, 10 ** (length - 1) if length > 1 else 0)
        last = min(high, 10**length - 1) if high is not None else 10**length - 1
        if first > last:
            continue
        alternatives.append(f"({_digits_between(str(first), str(last))})")
    return " | ".join(alternatives) if alternatives else '"0"'


def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF alternative matching exactly the integers in [low, high] (None: unbounded)."""
    parts = []
    if high is None or high >= 0:
        parts.append(_nonneg_range(max(low or 0, 0), high))
    if low is None or low < 0:
        neg_low = 1 if high is None or high >= 0 else -high
        neg_high = None if low is None else -low
        parts.append(f'"-" ({_nonneg_range(neg_low, neg_high)})')
    return " | ".join(f"({p})" for p in parts)


# ---- assembling grammars -------------------------------------------------------------------


def _convert(converter: Any, schema: dict[str, Any], name: str) -> str:
    """Visit a normalised schema, handling our integer-range extension; returns a rule name."""
    extensions: dict[str, str] = {}

    def replace(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if "x-range" in node:
                low, high = node["x-range"]
                key = f"xrange{len(extensions)}{name}".replace("-", "")
                extensions[key] = integer_range_rule(low, high)
                return {"const": key}  # placeholder, swapped for the rule below
            return {k: replace(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v, path) for v in node]
        return node

    prepared = replace(schema, name)
    rule = str(converter.visit(prepared, name))
    for key, body in extensions.items():
        placeholder = converter._format_literal(json.dumps(key))
        rule_name = converter._add_rule(f"{name}-int", f"({body}) space")
        for rule_key, content in list(converter._rules.items()):
            if placeholder in content:
                converter._rules[rule_key] = content.replace(placeholder, rule_name)
    return rule


def _new_converter() -> Any:
    import importlib

    converter: Any = importlib.import_module("llama_cpp.llama_grammar").SchemaConverter
    return converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def schema_rule(converter: Any, schema: dict[str, Any], name: str) -> tuple[str, list[str]]:
    """Add rules for `schema` to `converter`; returns (rule name, what was loosened)."""
    normaliser = _Normaliser(copy.deepcopy(schema))
    normalised = normaliser.visit(normaliser.root)
    loosened = sorted(normaliser.loosened)
    snapshot = dict(converter._rules)
    try:
        return _convert(converter, normalised, name), loosened
    except Exception as exc:  # the converter asserts on shapes it cannot express
        converter._rules = snapshot
        log.warning("schema %s is not expressible as a grammar (%s); using any object", name, exc)
        return _convert(converter, _ANY_OBJECT, name), [*loosened, "whole schema"]


def _finish(converter: Any, rules: dict[str, str]) -> str:
    if "char" in converter._rules:
        converter._rules["char"] = _STRICT_CHAR
    converter._rules.update(rules)
    return str(converter.format_grammar())


def _rule_name(index: int) -> str:
    return f"tool{index}"


def tool_call_grammar(
    tools: Sequence[ToolSpec], *, only: str | None = None, parallel: bool = True
) -> tuple[str, list[str]]:
    """GBNF for one or more tool calls in the format `tools.py` renders and parses.

    Returns the grammar and a list of schema features that were loosened (for the log).
    """
    converter = _new_converter()
    bodies = []
    loosened: list[str] = []
    for index, tool in enumerate(tools):
        if only is not None and tool.name != only:
            continue
        args, notes = schema_rule(converter, tool.parameters or _ANY_OBJECT, _rule_name(index))
        loosened += [f"{tool.name}: {n}" for n in notes]
        head = _escape_literal(f'{json.dumps(tool.name, ensure_ascii=False)}, "arguments": ')
        bodies.append(f"{head} {args}")
    if not bodies:
        raise ValueError("no tool to build a grammar for")
    call = (
        f'{_escape_literal(TOOL_CALL_OPEN)} "\\n"? "{{\\"name\\": " tool-body "}}" "\\n"? '
        f"{_escape_literal(TOOL_CALL_CLOSE)}"
    )
    rules = {
        "tool-body": " | ".join(f"( {b} )" for b in bodies),
        "tool-call": call,
        "root": 'tool-call ( "\\n"? tool-call )*' if parallel else "tool-call",
    }
    return _finish(converter, rules), loosened


def json_output_grammar(schema: dict[str, Any]) -> tuple[str, list[str]]:
    """GBNF for a reply that is JSON valid against `schema` (structured output)."""
    converter = _new_converter()
    value, loosened = schema_rule(converter, schema, "output")
    return _finish(converter, {"root": value}), loosened


# ---- per request ---------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _tool_grammar_cached(tools_key: str, only: str | None, parallel: bool) -> tuple[str, str]:
    tools = [ToolSpec(t["name"], "", t["schema"]) for t in json.loads(tools_key)]
    grammar, loosened = tool_call_grammar(tools, only=only, parallel=parallel)
    return grammar, "; ".join(loosened)


@lru_cache(maxsize=32)
def _output_grammar_cached(schema_key: str) -> tuple[str, str]:
    grammar, loosened = json_output_grammar(json.loads(schema_key))
    return grammar, "; ".join(loosened)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def request_grammar(request: GenerationRequest) -> tuple[str | None, bool]:
    """(grammar, lazy) for a request: structured output, forced or optional tool calls.

    Claude Code sends the same ~20 tools on every turn, so grammars are cached by content.
    """
    if request.output_schema is not None:
        grammar, loosened = _output_grammar_cached(_key(request.output_schema))
        if loosened:
            log.info("output_config.format: not enforced by the grammar: %s", loosened)
        return grammar, False
    choice = request.tool_choice
    if not request.tools or choice.mode == "none":
        return None, False
    key = _key([{"name": t.name, "schema": t.parameters} for t in request.tools])
    only = choice.name if choice.mode == "tool" else None
    grammar, loosened = _tool_grammar_cached(key, only, choice.parallel)
    if loosened:
        log.debug("tool schemas: not enforced by the grammar: %s", loosened)
    return grammar, choice.mode == "auto"


def loosest_grammar(request: GenerationRequest) -> str:
    """The fallback when llama.cpp refuses a schema-derived grammar: right shape, any values."""
    if request.output_schema is not None:
        return json_output_grammar(_ANY_OBJECT)[0]
    tools = [ToolSpec(t.name, "", _ANY_OBJECT) for t in request.tools]
    only = request.tool_choice.name if request.tool_choice.mode == "tool" else None
    return tool_call_grammar(tools, only=only, parallel=request.tool_choice.parallel)[0]


def grammar_parses(vocab: Any, grammar: str) -> bool:
    """Whether llama.cpp's GBNF parser accepts `grammar` (it logs why when it does not)."""
    from llama_cpp import llama_cpp

    pointer = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not pointer:
        return False
    llama_cpp.llama_sampler_free(pointer)
    return True
