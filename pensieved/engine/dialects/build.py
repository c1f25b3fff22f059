"""GBNF for tool calls in a dialect's own syntax, from the tools' JSON schemas.

JSON arguments use the schema rules of `grammar.py` as they are. Tagged parameters (XML-style
dialects) take each property in the schema's order, required ones always and optional ones
when the model chooses: a string property's value is raw text that cannot contain the
closing tag, any other type is JSON valid against the property's schema. The same
normalisation and bounds apply as for JSON, except that a raw string's length, pattern and
format are not enforced (its value is not JSON). A notation of a family's own (Gemma 4's)
is written by that dialect's rule from the normalised schema, under the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pensieved.engine.dialects.base import NotationArgs, Syntax, XmlArgs
from pensieved.engine.gbnf import escape_literal
from pensieved.engine.llama import SchemaConverter
from pensieved.engine.schema import normalise
from pensieved.engine.types import ToolSpec

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# GBNF of a key the schema does not name (its text is not quoted, so it is kept plain).
ANY_KEY = "[a-zA-Z0-9_.-]+"
# GBNF of a number and a boolean written as in JSON, for notations that are not JSON.
NUMBER = '"-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?'
BOOLEAN = '"true" | "false"'


def text_without(delimiter: str) -> str:
    """GBNF for any text that does not contain `delimiter` (which must not repeat its first
    character): each character but the first, or a proper prefix of it followed by a
    character that breaks it off."""
    first = delimiter[0]
    parts = [f"[^{_class_char(first)}]"]
    for length in range(1, len(delimiter)):
        breaker = delimiter[length]
        exclude = _class_char(breaker) + ("" if breaker == first else _class_char(first))
        parts.append(f"{escape_literal(delimiter[:length])} [^{exclude}]")
    return "( " + " | ".join(parts) + " )*"


def _class_char(char: str) -> str:
    if char in "]\\^-":
        return "\\" + char
    if char == "\n":
        return "\\n"
    return char


def _rule_safe(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]", "-", text) or "x"


def _string_only(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "string":
        return True
    values: list[Any] = schema.get("enum", [schema["const"]] if "const" in schema else [])
    return bool(values) and all(isinstance(v, str) for v in values)


# Templates that write values with Jinja's `string` filter spell booleans as Python does
# (Qwen3-Coder's), and a model copies what its template shows it.
_BOOLEAN = '( "true" | "false" | "True" | "False" )'


def _value_rule(
    converter: SchemaConverter, schema: dict[str, Any], name: str, args: XmlArgs
) -> str:
    """The GBNF of one parameter's value (raw text for strings, JSON otherwise)."""
    from pensieved.engine.grammar import convert_normalised

    if _string_only(schema):
        if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
            return "( " + " | ".join(escape_literal(v) for v in schema["enum"]) + " )"
        if isinstance(schema.get("const"), str):
            return escape_literal(schema["const"])
        return converter.add_rule(f"{name}-raw", text_without(args.value_close))
    if (
        isinstance(schema, dict)
        and schema.get("type") == "boolean"
        and set(schema)
        <= {
            "type",
            "description",
            "title",
        }
    ):
        return _BOOLEAN
    return convert_normalised(converter, schema or {}, name)


def _key_close(args: XmlArgs, raw: bool) -> str:
    """GBNF of what closes a parameter's key, for a value written raw or as JSON."""
    if args.typed_key_close is not None:
        return escape_literal(args.typed_key_close[0 if raw else 1])
    return args.key_close_gbnf or escape_literal(args.key_close)


def xml_args_rule(
    converter: SchemaConverter, schema: dict[str, Any], name: str, args: XmlArgs
) -> tuple[str, list[str]]:
    """A rule for a call's tagged parameters; returns (rule, what was loosened)."""
    normalised, loosened = normalise(schema)
    props = normalised.get("properties") if normalised.get("type") == "object" else None
    sep = f"{escape_literal(args.separator)}?" if args.separator else ""

    def param(key_gbnf: str, value: str, raw: bool) -> str:
        nl = '"\\n"?' if args.newline_values else ""
        return (
            f"{escape_literal(args.key_open)} {key_gbnf} {_key_close(args, raw)} "
            f"{nl} {value} {nl} {escape_literal(args.value_close)} {sep}"
        )

    if not isinstance(props, dict) or not props:
        key = ANY_KEY
        value = converter.add_rule(f"{name}-raw", text_without(args.value_close))
        body = f"( {param(key, value, True)} )*"
        return converter.add_rule(f"{name}-args", body), [*loosened, "any parameters"]
    required = set(normalised.get("required", []))
    parts = []
    for index, (key, prop) in enumerate(props.items()):
        value = _value_rule(converter, prop, f"{name}-p{index}-{_rule_safe(key)}", args)
        item = param(escape_literal(key), value, _string_only(prop))
        parts.append(f"( {item} )" if key in required else f"( {item} )?")
    return converter.add_rule(f"{name}-args", " ".join(parts)), loosened


def calls_root(
    syntax: Syntax,
    tools: Sequence[ToolSpec],
    converter: SchemaConverter,
    *,
    lazy: bool,
    only: str | None,
    parallel: bool,
) -> tuple[dict[str, str], list[str]]:
    """The rules (root included) for calls of `tools` in `syntax`."""
    from pensieved.engine.grammar import schema_rule

    bodies: list[str] = []
    loosened: list[str] = []
    for index, tool in enumerate(tools):
        if only is not None and tool.name != only:
            continue
        schema = tool.parameters or ANY_OBJECT
        rule = f"tool{index}"
        if isinstance(syntax.args, XmlArgs):
            args, notes = xml_args_rule(converter, schema, rule, syntax.args)
        elif isinstance(syntax.args, NotationArgs):
            args, notes = syntax.args.rule(converter, schema, rule)
        else:
            args, notes = schema_rule(converter, schema, rule)
        loosened += [f"{tool.name}: {n}" for n in notes]
        bodies.append(f"{syntax.head(tool.name)} {args}")
    if not bodies:
        raise ValueError("no tool to build a grammar for")
    call = "( " + " | ".join(f"( {b} )" for b in bodies) + f" ) {syntax.close_gbnf}"
    calls = f"tool-call ( {syntax.separator} tool-call )*" if parallel else "tool-call"
    if syntax.block_open:
        calls = (
            f"{escape_literal(syntax.block_open)} [ \\n]* {calls} [ \\n]* "
            f"{escape_literal(syntax.block_close)}"
        )
    lead = f"( {syntax.lead} )? " if syntax.lead and not lazy else ""
    return {"tool-call": call, "root": f"{lead}{calls}"}, loosened
