"""GBNF grammars that make tool calls and structured output valid by construction.

Each schema is normalised (`schema.py`) and handed to llama-cpp-python's converter; integer
ranges are added as rules of our own (`gbnf.py`). A schema the converter still fails on, or
whose rules break the grammar limits, falls back to "any JSON object" for that tool: the output
is then valid JSON of the right shape, though not checked against every constraint. A whole
grammar past the limits is replaced by the loosest one of the right shape, or by none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from pensieved.engine.dialects import Dialect, by_name, default_dialect
from pensieved.engine.dialects.build import calls_root
from pensieved.engine.gbnf import grammar_problem, integer_range_rule
from pensieved.engine.llama import SchemaConverter
from pensieved.engine.schema import normalise
from pensieved.engine.types import GenerationRequest, ToolSpec

log = logging.getLogger("pensieved.engine")

# The converter's own `char` admits raw control characters, which strict JSON parsers reject.
_STRICT_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


# ---- assembling grammars -------------------------------------------------------------------


def _convert(converter: SchemaConverter, schema: dict[str, Any], name: str) -> str:
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
    rule = converter.visit(prepared, name)
    for key, body in extensions.items():
        placeholder = converter.literal(json.dumps(key))
        rule_name = converter.add_rule(f"{name}-int", f"({body}) space")
        for rule_key, content in list(converter.rules.items()):
            if placeholder in content:
                converter.rules[rule_key] = content.replace(placeholder, rule_name)
    return rule


def schema_rule(
    converter: SchemaConverter, schema: dict[str, Any], name: str
) -> tuple[str, list[str]]:
    """Add rules for `schema` to `converter`; returns (rule name, what was loosened)."""
    normalised, loosened = normalise(schema)
    snapshot = dict(converter.rules)
    try:
        rule = _convert(converter, normalised, name)
    except Exception as exc:  # the converter asserts on shapes it cannot express
        why = f"not expressible ({exc})"
    else:
        added = [f"{k} ::= {v}" for k, v in converter.rules.items() if snapshot.get(k) != v]
        problem = grammar_problem("\n".join(added))
        if problem is None:
            return rule, loosened
        why = problem
    converter.rules = snapshot
    log.warning("schema %s: %s; using any object", name, why)
    return _convert(converter, _ANY_OBJECT, name), [*loosened, f"whole schema: {why}"]


def _finish(converter: SchemaConverter, rules: dict[str, str]) -> str:
    if "char" in converter.rules:
        converter.rules["char"] = _STRICT_CHAR
    converter.rules.update(rules)
    return converter.format()


def convert_normalised(converter: SchemaConverter, schema: dict[str, Any], name: str) -> str:
    """A rule for an already normalised schema; any JSON value when the converter fails."""
    snapshot = dict(converter.rules)
    try:
        return _convert(converter, schema, name)
    except Exception as exc:  # the converter asserts on shapes it cannot express
        log.warning("schema %s: not expressible (%s); using any value", name, exc)
        converter.rules = snapshot
        return _convert(converter, {}, name)


def tool_call_grammar(
    tools: Sequence[ToolSpec],
    *,
    only: str | None = None,
    parallel: bool = True,
    dialect: Dialect | None = None,
    lazy: bool = False,
) -> tuple[str, list[str]]:
    """GBNF for one or more tool calls in `dialect`'s syntax (default: hermes, the generic
    format `tools.py` renders). `lazy`: the grammar starts at the dialect's trigger.

    Returns the grammar and a list of schema features that were loosened (for the log).
    """
    syntax = (dialect or default_dialect()).syntax
    converter = SchemaConverter()
    rules, loosened = calls_root(syntax, tools, converter, lazy=lazy, only=only, parallel=parallel)
    return _finish(converter, rules), loosened


def json_output_grammar(schema: dict[str, Any]) -> tuple[str, list[str]]:
    """GBNF for a reply that is JSON valid against `schema` (structured output)."""
    converter = SchemaConverter()
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


def _loosest_tools(
    names: Sequence[str], only: str | None, parallel: bool, dialect: str, lazy: bool
) -> str:
    tools = [ToolSpec(name, "", _ANY_OBJECT) for name in names]
    found = by_name(dialect)
    return tool_call_grammar(tools, only=only, parallel=parallel, dialect=found, lazy=lazy)[0]


def _loosest_output() -> str:
    return json_output_grammar(_ANY_OBJECT)[0]


# Claude Code sends the same tools on every turn: each distinct tool set (or output schema) is
# built once, and what it loosened is logged once.
@lru_cache(maxsize=32)
def _tool_grammar_cached(
    tools_key: str, only: str | None, parallel: bool, dialect: str, lazy: bool
) -> str | None:
    tools = [ToolSpec(t["name"], "", t["schema"]) for t in json.loads(tools_key)]
    grammar, loosened = tool_call_grammar(
        tools, only=only, parallel=parallel, dialect=by_name(dialect), lazy=lazy
    )
    if loosened:
        log.info("tool schemas: not enforced by the grammar: %s", "; ".join(loosened))
    names = [tool.name for tool in tools]
    return _checked(
        grammar,
        lambda: _loosest_tools(names, only, parallel, dialect, lazy),
        "tool call grammar",
    )


@lru_cache(maxsize=32)
def _output_grammar_cached(schema_key: str) -> str | None:
    grammar, loosened = json_output_grammar(json.loads(schema_key))
    if loosened:
        log.info("output_config.format: not enforced by the grammar: %s", "; ".join(loosened))
    return _checked(grammar, _loosest_output, "output_config.format grammar")


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def request_grammar(
    request: GenerationRequest, dialect: Dialect | None = None
) -> tuple[str | None, bool]:
    """(grammar, lazy) for a request: structured output, forced or optional tool calls, the
    calls in `dialect`'s syntax (default hermes).

    The grammar is within the limits `grammar_problem` checks, so llama.cpp may parse it.
    """
    if request.output_schema is not None:
        return _output_grammar_cached(_key(request.output_schema)), False
    choice = request.tool_choice
    if not request.tools or choice.mode == "none":
        return None, False
    key = _key([{"name": t.name, "schema": t.parameters} for t in request.tools])
    only = choice.name if choice.mode == "tool" else None
    name = (dialect or default_dialect()).name
    lazy = choice.mode == "auto"
    grammar = _tool_grammar_cached(key, only, choice.parallel, name, lazy)
    return grammar, grammar is not None and lazy


def loosest_grammar(request: GenerationRequest, dialect: Dialect | None = None) -> str | None:
    """The fallback when llama.cpp refuses a schema-derived grammar: right shape, any values.

    None when even that is past the limits (thousands of tools with long names).
    """
    if request.output_schema is not None:
        grammar = _loosest_output()
    else:
        choice = request.tool_choice
        only = choice.name if choice.mode == "tool" else None
        name = (dialect or default_dialect()).name
        names = [t.name for t in request.tools]
        grammar = _loosest_tools(names, only, choice.parallel, name, choice.mode == "auto")
    return grammar if grammar_problem(grammar) is None else None
