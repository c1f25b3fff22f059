"""Schema → GBNF: llama.cpp accepts every grammar we build, and ranges mean what they say."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from pensieved.engine.grammar import (
    _anchor,
    grammar_parses,
    integer_range_rule,
    json_output_grammar,
    request_grammar,
    tool_call_grammar,
)
from pensieved.engine.types import GenerationRequest, ToolChoice, ToolSpec
from pensieved.paths import bundled_model_path

CLAUDE_CODE_LIKE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "file_path": {"type": "string", "description": "absolute path"},
        "offset": {"type": "integer", "exclusiveMinimum": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": 2000},
        "mode": {"type": "string", "enum": ["read", "write"]},
        "kind": {"anyOf": [{"const": "a"}, {"const": "b"}]},
        "env": {"type": "object", "propertyNames": {"pattern": "^[A-Z_]+$"}},
        "url": {"type": "string", "format": "uri"},
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "pattern": "^[a-f0-9]{8}$"},
        "loose": {"type": "string", "pattern": "^.*$"},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "todos": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "content": {"type": "string", "minLength": 1},
                    "status": {"enum": ["pending", "in_progress", "completed"]},
                },
                "required": ["content", "status"],
                "additionalProperties": False,
            },
        },
        "ref": {"$ref": "#/$defs/point"},
        "nullable": {"type": ["string", "null"]},
        "anything": {},
        "described": {"description": "no type at all"},
        "not_this": {"not": {"type": "null"}},
    },
    "required": ["file_path"],
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
        }
    },
}

RECURSIVE: dict[str, Any] = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        }
    },
    "$ref": "#/$defs/node",
}

ODD_SCHEMAS: list[Any] = [
    {},
    {"type": "object"},
    {"type": "object", "properties": {}},
    {"type": "weird"},
    {"type": "object", "properties": {"a": True, "b": False}},
    {"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}]},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": "#/missing"},
    {"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 3}]},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
    {"type": "string", "pattern": "(unclosed"},
    {"type": "string", "pattern": "[a-z]+|[0-9]+"},
    {"type": "integer", "minimum": 5.5, "exclusiveMaximum": 10},
    RECURSIVE,
]


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    import llama_cpp

    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm._model.vocab
    llm.close()


def test_claude_code_like_schema_parses(vocab: Any) -> None:
    tools = [ToolSpec("Read", "", CLAUDE_CODE_LIKE), ToolSpec("Other", "", RECURSIVE)]
    grammar, loosened = tool_call_grammar(tools)
    assert grammar_parses(vocab, grammar)
    joined = " ".join(loosened)
    for feature in ("propertyNames", "format uri", "pattern", "number bounds", "not"):
        assert feature in joined
    assert "recursive $ref" in joined


@pytest.mark.parametrize("schema", ODD_SCHEMAS)
def test_odd_schemas_degrade_without_crashing(vocab: Any, schema: Any) -> None:
    grammar, _ = tool_call_grammar([ToolSpec("t", "", schema)], parallel=False)
    assert grammar_parses(vocab, grammar)
    output, _ = json_output_grammar(schema)
    assert grammar_parses(vocab, output)


def test_forced_tool_grammar_names_only_that_tool() -> None:
    tools = [ToolSpec("alpha", "", {}), ToolSpec("beta", "", {})]
    grammar, _ = tool_call_grammar(tools, only="beta", parallel=False)
    assert '\\"beta\\"' in grammar and '\\"alpha\\"' not in grammar
    assert "root ::= tool-call\n" in grammar + "\n"


def test_request_grammar_modes() -> None:
    tools = (ToolSpec("alpha", "", {"type": "object"}),)
    base = GenerationRequest(messages=(), max_tokens=1, tools=tools)
    assert request_grammar(base)[1] is True  # auto: lazy, from the first <tool_call>
    forced = GenerationRequest(
        messages=(), max_tokens=1, tools=tools, tool_choice=ToolChoice("any", parallel=False)
    )
    assert request_grammar(forced)[1] is False
    none = GenerationRequest(messages=(), max_tokens=1, tools=tools, tool_choice=ToolChoice("none"))
    assert request_grammar(none) == (None, False)
    structured = GenerationRequest(messages=(), max_tokens=1, output_schema={"type": "object"})
    assert request_grammar(structured)[0] is not None
    assert request_grammar(GenerationRequest(messages=(), max_tokens=1)) == (None, False)


def _as_regex(rule: str) -> str:
    """The GBNF subset integer_range_rule emits, as a Python regex."""
    return re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")


@pytest.mark.parametrize(
    ("low", "high"),
    [(1, 2000), (0, 0), (-15, 7), (5, None), (None, -3), (None, 42), (37, 1234), (-100, -7)],
)
def test_integer_ranges_match_exactly(low: int | None, high: int | None) -> None:
    pattern = re.compile(_as_regex(integer_range_rule(low, high)))
    for n in range(-2500, 2500):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    assert not pattern.fullmatch("007")
    if high is None:
        assert pattern.fullmatch("123456789012")


@pytest.mark.parametrize(
    ("pattern", "anchored"),
    [
        ("^[a-z]+$", "^[a-z]+$"),
        ("[a-z]+", "^[a-z]+$"),
        ("a|b", "^(a|b)$"),
        ("^.*$", None),
        ("^[a-z*./]{1,24}$", "^[a-z*./]{1,24}$"),
        ("[ -~]+", None),
        ("\\d+", None),
        ('[^"]+', None),
        ("\\s+", None),
        ("(?=x)y", None),
        ("(bad", None),
    ],
)
def test_patterns_are_anchored_or_refused(pattern: str, anchored: str | None) -> None:
    assert _anchor(pattern) == anchored
