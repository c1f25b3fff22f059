"""JSON schemas rewritten into the subset llama-cpp-python's grammar converter handles.

The converter asserts on schemas it does not understand, so every schema is first normalised,
and what cannot be expressed is loosened, never rejected:

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

Integer bounds come out as `{"type": "integer", "x-range": [low, high]}`, an extension the
grammar builder (`grammar.py`) turns into rules of its own (`gbnf.integer_range_rule`).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

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


def normalise(schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`schema` in the converter's subset, and what was loosened to get there (sorted)."""
    normaliser = _Normaliser(copy.deepcopy(schema))
    return normaliser.visit(normaliser.root), sorted(normaliser.loosened)
