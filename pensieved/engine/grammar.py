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
* bounds llama.cpp cannot take safely (see `MAX_REPETITION`, `MAX_INT_DIGITS`) are dropped:
  `minLength`/`maxLength`/`minItems`/`maxItems` and regex quantifiers above the limit become
  unbounded repetition, integer bounds of too many digits are not enforced.
* a schema the converter still fails on, or whose rules break the grammar limits below,
  falls back to "any JSON object" for that tool: the output is then valid JSON of the right
  shape, though not checked against every constraint.

Every grammar is checked (`grammar_problem`) before llama.cpp sees it: a grammar past the
limits is replaced by the loosest one of the right shape, or by none.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

# The converter writes a bounded repetition (`maxLength`, `maxItems`, a regex `{m,n}`) as one
# nested optional group per allowed repetition, and llama.cpp's GBNF parser recurses twice per
# nesting level: Claude Code's `maxLength: 524288` made a 4.2 MB grammar nested 524,288 deep,
# which overflowed the parsing thread's stack (SIGSEGV). Bounds up to this stay enforced (the
# largest in Claude Code's own tools are 256); larger ones are dropped, so the repetition is
# unbounded, which only loosens the grammar.
MAX_REPETITION = 256
# Integer bounds become digit-by-digit alternatives whose size grows with the square of the
# digit count; 16 digits covers JavaScript's safe integers (9007199254740991), which is what
# tool schemas use for "no real limit".
MAX_INT_DIGITS = 16

# What any grammar may be before llama.cpp parses it (`grammar_problem`).
# Nesting: llama.cpp's recursive descent parser takes ~450 bytes of stack per level of ( )
# (a 1 MB thread stack overflowed between 2,000 and 2,500 levels). 512 levels need ~230 KB,
# inside the smallest default thread stack we run on (512 KB, macOS); the deepest grammar the
# bounds above allow is MAX_REPETITION plus a few levels.
MAX_GRAMMAR_DEPTH = 512
# Size: parsing is linear but every request copies the parsed rules, and a parse failure
# makes llama.cpp print the whole text to stderr. Claude Code's 25 tools come to ~93 KB.
MAX_GRAMMAR_BYTES = 2_000_000
# Rules llama.cpp creates: one per named rule, group and `*`/`+`/`?`, and one per optional
# repetition of a GBNF `{m,n}` (llama-grammar.cpp expands those itself). Each is a vector
# copied into every request's grammar; Claude Code's tools need ~8,000.
MAX_GRAMMAR_RULES = 100_000
# llama.cpp treats a `{m,n}` upper bound above this as unbounded (MAX_REPETITION_THRESHOLD).
_LLAMA_REPETITION_THRESHOLD = 2000
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


_QUANTIFIER = re.compile(r"\{(\d*)(,(\d*))?\}")


def _loosen_quantifiers(pattern: str) -> tuple[str, list[str]]:
    """`pattern` with every `{m,n}` bound above MAX_REPETITION dropped, and notes on each."""
    out: list[str] = []
    notes: list[str] = []
    i = 0
    in_class = False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif (
            char == "{"
            and (match := _QUANTIFIER.match(pattern, i))
            and (match.group(1) or match.group(2))
        ):
            low = int(match.group(1) or 0)
            high = low if match.group(2) is None else int(match.group(3) or -1)
            if low > MAX_REPETITION or high > MAX_REPETITION:
                kept = low if low <= MAX_REPETITION else 0
                out.append(f"{{{kept},}}")
                notes.append(f"pattern quantifier {match.group(0)}")
                i = match.end()
                continue
        out.append(char)
        i += 1
    return "".join(out), notes


def _repetition_rules(match: re.Match[str]) -> int:
    """Rules llama.cpp adds for a GBNF `{m}`, `{m,}` or `{m,n}` (llama-grammar.cpp)."""
    if match.group(2) is None:
        return 0  # {m}: the item copied m times, no optional part
    high = match.group(3)
    if high and int(high) <= _LLAMA_REPETITION_THRESHOLD:
        return max(int(high) - int(match.group(1)), 0)  # one rule per optional repetition
    return 1  # unbounded: one recursive rule


@dataclass(frozen=True)
class GrammarSize:
    """What a GBNF text costs llama.cpp to parse."""

    byte_count: int
    depth: int  # deepest nesting of ( groups )
    rules: int  # rules llama.cpp creates for it


# The GBNF tokens that matter for its size: "literals" and [classes] (with their escapes) and
# # comments are matched whole, so brackets and operators inside them do not count.
_GBNF_TOKENS = re.compile(
    r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*|::=|[()*+?]'
    r"|\{\s*(\d+)\s*(,\s*(\d*))?\s*\}"
)


def grammar_size(grammar: str) -> GrammarSize:
    """Measure `grammar` the way llama.cpp's parser will meet it (without parsing it)."""
    depth = deepest = rules = 0
    for match in _GBNF_TOKENS.finditer(grammar):
        token = match.group(0)
        first = token[0]
        if first == "(":
            depth += 1
            deepest = max(deepest, depth)
            rules += 1
        elif first == ")":
            depth -= 1
        elif first == "{":
            rules += _repetition_rules(match)
        elif first in "*+?:":
            rules += 1
    return GrammarSize(len(grammar.encode()), deepest, rules)


def grammar_problem(grammar: str) -> str | None:
    """Why llama.cpp must not parse `grammar` (too big, too deep, too many rules), or None."""
    if len(grammar) > MAX_GRAMMAR_BYTES:  # at least as many bytes: no need to scan it
        return f"the grammar is over {MAX_GRAMMAR_BYTES:,} bytes"
    size = grammar_size(grammar)
    if size.byte_count > MAX_GRAMMAR_BYTES:
        return f"the grammar is {size.byte_count:,} bytes (limit {MAX_GRAMMAR_BYTES:,})"
    if size.depth > MAX_GRAMMAR_DEPTH:
        return f"the grammar nests {size.depth:,} groups deep (limit {MAX_GRAMMAR_DEPTH:,})"
    if size.rules > MAX_GRAMMAR_RULES:
        return f"the grammar makes {size.rules:,} rules (limit {MAX_GRAMMAR_RULES:,})"
    return None


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
        self._bounds(schema, out, ("minItems", "maxItems"))

    def _bounds(self, schema: dict[str, Any], out: dict[str, Any], keys: tuple[str, str]) -> None:
        """Copy repetition bounds; one above MAX_REPETITION is dropped (see there)."""
        for key in keys:
            value = schema.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                continue
            if value > MAX_REPETITION:
                self.loosened.add(f"{key} {value} (over {MAX_REPETITION})")
            else:
                out[key] = value

    def _string(self, schema: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            anchored = _anchor(pattern)
            if anchored is not None:
                loosened, notes = _loosen_quantifiers(anchored)
                self.loosened.update(f"{note} (over {MAX_REPETITION})" for note in notes)
                out["pattern"] = loosened
                return out
            self.loosened.add("pattern")
        fmt = schema.get("format")
        if fmt in ("date", "time", "date-time", "uuid"):
            out["format"] = fmt
            return out
        if fmt is not None:
            self.loosened.add(f"format {fmt}")
        self._bounds(schema, out, ("minLength", "maxLength"))
        return out

    def _integer(self, schema: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        low, high = _int_bounds(schema)
        if low is not None and len(str(abs(low))) > MAX_INT_DIGITS:
            self.loosened.add(f"minimum {low} (over {MAX_INT_DIGITS} digits)")
            low = None
        if high is not None and len(str(abs(high))) > MAX_INT_DIGITS:
            self.loosened.add(f"maximum {high} (over {MAX_INT_DIGITS} digits)")
            high = None
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
    def number(key: str) -> int | float | None:
        value = schema.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON's 1e999 parses as infinity: no bound at all
        return value  # ints stay exact: a float would round bounds past 2**53

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
        rule = _convert(converter, normalised, name)
    except Exception as exc:  # the converter asserts on shapes it cannot express
        why = f"not expressible ({exc})"
    else:
        added = [f"{k} ::= {v}" for k, v in converter._rules.items() if snapshot.get(k) != v]
        problem = grammar_problem("\n".join(added))
        if problem is None:
            return rule, loosened
        why = problem
    converter._rules = snapshot
    log.warning("schema %s: %s; using any object", name, why)
    return _convert(converter, _ANY_OBJECT, name), [*loosened, f"whole schema: {why}"]


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


def _checked(grammar: str, loosest: Callable[[], str], what: str) -> str | None:
    """`grammar` if it is within the limits, else the loosest one of its shape, else None."""
    problem = grammar_problem(grammar)
    if problem is None:
        return grammar
    log.warning("%s: %s; enforcing the JSON shape only", what, problem)
    fallback = loosest()
    problem = grammar_problem(fallback)
    if problem is None:
        return fallback
    log.warning(
        "%s: even the loosest grammar is too big (%s); output is not constrained", what, problem
    )
    return None


def _loosest_tools(names: Sequence[str], only: str | None, parallel: bool) -> str:
    tools = [ToolSpec(name, "", _ANY_OBJECT) for name in names]
    return tool_call_grammar(tools, only=only, parallel=parallel)[0]


def _loosest_output() -> str:
    return json_output_grammar(_ANY_OBJECT)[0]


# Claude Code sends the same tools on every turn: each distinct tool set (or output schema) is
# built once, and what it loosened is logged once.
@lru_cache(maxsize=32)
def _tool_grammar_cached(tools_key: str, only: str | None, parallel: bool) -> str | None:
    tools = [ToolSpec(t["name"], "", t["schema"]) for t in json.loads(tools_key)]
    grammar, loosened = tool_call_grammar(tools, only=only, parallel=parallel)
    if loosened:
        log.info("tool schemas: not enforced by the grammar: %s", "; ".join(loosened))
    names = [tool.name for tool in tools]
    return _checked(grammar, lambda: _loosest_tools(names, only, parallel), "tool call grammar")


@lru_cache(maxsize=32)
def _output_grammar_cached(schema_key: str) -> str | None:
    grammar, loosened = json_output_grammar(json.loads(schema_key))
    if loosened:
        log.info("output_config.format: not enforced by the grammar: %s", "; ".join(loosened))
    return _checked(grammar, _loosest_output, "output_config.format grammar")


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def request_grammar(request: GenerationRequest) -> tuple[str | None, bool]:
    """(grammar, lazy) for a request: structured output, forced or optional tool calls.

    The grammar is within the limits `grammar_problem` checks, so llama.cpp may parse it.
    """
    if request.output_schema is not None:
        return _output_grammar_cached(_key(request.output_schema)), False
    choice = request.tool_choice
    if not request.tools or choice.mode == "none":
        return None, False
    key = _key([{"name": t.name, "schema": t.parameters} for t in request.tools])
    only = choice.name if choice.mode == "tool" else None
    grammar = _tool_grammar_cached(key, only, choice.parallel)
    return grammar, grammar is not None and choice.mode == "auto"


def loosest_grammar(request: GenerationRequest) -> str | None:
    """The fallback when llama.cpp refuses a schema-derived grammar: right shape, any values.

    None when even that is past the limits (thousands of tools with long names).
    """
    if request.output_schema is not None:
        grammar = _loosest_output()
    else:
        choice = request.tool_choice
        only = choice.name if choice.mode == "tool" else None
        grammar = _loosest_tools([t.name for t in request.tools], only, choice.parallel)
    return grammar if grammar_problem(grammar) is None else None
