"""Schema → GBNF: llama.cpp accepts every grammar we build, and ranges mean what they say."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pensieve.paths import bundled_model_path
from pensieved.engine import gbnf
from pensieved.engine import grammar as grammar_module
from pensieved.engine.gbnf import MAX_GRAMMAR_DEPTH, grammar_problem, grammar_size
from pensieved.engine.grammar import (
    json_output_grammar,
    loosest_grammar,
    request_grammar,
    tool_call_grammar,
)
from pensieved.engine.grammar_cache import parse_grammar
from pensieved.engine.llama import Vocab
from pensieved.engine.types import GenerationRequest, ToolChoice, ToolSpec
from tests.claude_code_captures import FIXTURES, capture_files, load
from tests.engine.test_gbnf import nested_grammar

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


def grammar_parses(vocab: Vocab, grammar: str, *, lazy: bool = False) -> bool:
    """Whether llama.cpp's parser accepts `grammar` (it says why on stderr when not)."""
    parsed = parse_grammar(vocab, grammar, lazy=lazy)
    if parsed is None:
        return False
    parsed.close()
    return True


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


# ---- limits: no schema may produce a grammar llama.cpp cannot parse safely ------------------

WORKFLOW_LIKE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "script": {"type": "string", "maxLength": 524288, "description": "the workflow"},
        "name": {"type": "string", "pattern": "^wf_[a-z0-9-]{6,}$"},
    },
    "required": ["script"],
    "additionalProperties": False,
}


def _args_schema(schema: dict[str, Any]) -> tuple[str, list[str]]:
    return tool_call_grammar([ToolSpec("t", "", schema)], parallel=False)


def test_workflow_max_length_is_dropped_and_noted(vocab: Any) -> None:
    grammar, loosened = _args_schema(WORKFLOW_LIKE)
    size = grammar_size(grammar)
    assert grammar_problem(grammar) is None
    assert size.depth < 50 and size.byte_count < 20_000, size
    assert "t: maxLength 524288 (over 256)" in loosened
    assert grammar_parses(vocab, grammar)


HUGE_BOUNDS: list[tuple[dict[str, Any], str]] = [
    ({"type": "string", "minLength": 1_000_000}, "minLength 1000000"),
    ({"type": "string", "minLength": 2, "maxLength": 10**9}, "maxLength 1000000000"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 500_000}, "maxItems 500000"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 300}, "minItems 300"),
    ({"type": "integer", "minimum": -(10**40), "maximum": 10**40}, "minimum -1" + "0" * 40),
    ({"type": "integer", "maximum": 1e300}, f"maximum {int(1e300)}"),
    ({"type": "integer", "minimum": 0, "maximum": json.loads("1e999")}, ""),
    ({"type": "integer", "minimum": 3, "maximum": 2**80}, f"maximum {2**80}"),
    ({"type": "string", "pattern": "^a{1,100000}$"}, "pattern quantifier {1,100000}"),
    ({"type": "string", "pattern": "^(ab|cd){0,99999}x$"}, "pattern quantifier {0,99999}"),
    ({"type": "string", "pattern": "^[a-z]{5000}$"}, "pattern quantifier {5000}"),
    ({"type": "string", "pattern": "^x{,300}$"}, "pattern quantifier {,300}"),
]


@pytest.mark.parametrize(("schema", "note"), HUGE_BOUNDS)
def test_huge_bounds_become_unbounded(vocab: Any, schema: dict[str, Any], note: str) -> None:
    wrapped = {"type": "object", "properties": {"v": schema}, "required": ["v"]}
    grammar, loosened = _args_schema(wrapped)
    size = grammar_size(grammar)
    assert size.depth < 50 and size.byte_count < 20_000, size
    assert all("whole schema" not in n for n in loosened), loosened  # only the bound went
    if note:
        assert any(n.startswith(f"t: {note} ") for n in loosened), loosened
    assert grammar_parses(vocab, grammar)
    output, _ = json_output_grammar(schema)
    assert grammar_problem(output) is None
    assert grammar_parses(vocab, output)


def test_nothing_past_the_limits_reaches_llama_cpp(vocab: Any) -> None:
    assert parse_grammar(vocab, nested_grammar(MAX_GRAMMAR_DEPTH * 10), lazy=False) is None


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    grammar_module._tool_grammar_cached.cache_clear()
    grammar_module._output_grammar_cached.cache_clear()
    yield
    grammar_module._tool_grammar_cached.cache_clear()
    grammar_module._output_grammar_cached.cache_clear()


def _forced(tools: tuple[ToolSpec, ...]) -> GenerationRequest:
    return GenerationRequest(
        messages=(), max_tokens=1, tools=tools, tool_choice=ToolChoice("any", parallel=False)
    )


@pytest.mark.usefixtures("fresh_caches")
def test_a_schema_past_the_limits_falls_back_to_any_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(400)}}
    small = {"type": "object", "properties": {"q": {"type": "integer"}}}
    monkeypatch.setattr(gbnf, "MAX_GRAMMAR_BYTES", 8_000)
    grammar, loosened = tool_call_grammar([ToolSpec("big", "", big), ToolSpec("small", "", small)])
    assert grammar_problem(grammar) is None
    assert '\\"p1\\"' not in grammar and '\\"q\\"' in grammar  # only the big one went
    assert any(n.startswith("big: whole schema: the grammar is") for n in loosened), loosened


@pytest.mark.usefixtures("fresh_caches")
def test_request_grammar_past_the_limits_uses_the_loosest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tools = tuple(
        ToolSpec(f"tool_{i}", "", {"type": "object", "properties": {"x": {"type": "string"}}})
        for i in range(40)
    )
    full, _ = request_grammar(_forced(tools))
    loosest = loosest_grammar(_forced(tools))
    assert full is not None and loosest is not None and len(loosest) < len(full)
    grammar_module._tool_grammar_cached.cache_clear()
    # Each schema fits alone; all forty together do not, and the loosest still does.
    monkeypatch.setattr(gbnf, "MAX_GRAMMAR_BYTES", (len(full) + len(loosest)) // 2)
    with caplog.at_level(logging.WARNING, logger="pensieved.engine"):
        assert request_grammar(_forced(tools)) == (loosest, False)
    assert "enforcing the JSON shape only" in caplog.text
    grammar_module._tool_grammar_cached.cache_clear()
    caplog.clear()
    monkeypatch.setattr(gbnf, "MAX_GRAMMAR_BYTES", len(loosest) - 1)
    with caplog.at_level(logging.WARNING, logger="pensieved.engine"):
        assert request_grammar(_forced(tools)) == (None, False)
    assert "output is not constrained" in caplog.text
    assert loosest_grammar(_forced(tools)) is None


@pytest.mark.usefixtures("fresh_caches")
def test_loosened_bounds_are_logged_once_per_tool_set(caplog: pytest.LogCaptureFixture) -> None:
    tools = (ToolSpec("Workflow", "", WORKFLOW_LIKE),)
    auto = GenerationRequest(messages=(), max_tokens=1, tools=tools)
    with caplog.at_level(logging.INFO, logger="pensieved.engine"):
        for _ in range(3):
            grammar, lazy = request_grammar(auto)
            assert grammar is not None and lazy
    notes = [r for r in caplog.records if "not enforced by the grammar" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "Workflow: maxLength 524288 (over 256)" in notes[0].getMessage()


# ---- every tool set Claude Code sends ------------------------------------------------------


def _captured_requests() -> list[Any]:
    captures = [load(path) for path in capture_files()]
    if not captures:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixtures in {FIXTURES}"))]
    return [pytest.param(c.body, id=c.id) for c in captures]


@pytest.mark.parametrize("body", _captured_requests())
def test_claude_code_requests_build_grammars_within_limits(vocab: Any, body: Any) -> None:
    tools = [ToolSpec(t["name"], "", t.get("input_schema") or {}) for t in body.get("tools") or []]
    schema = (body.get("output_config") or {}).get("format", {}).get("schema")
    if not tools and schema is None:
        pytest.skip("this request has neither tools nor an output schema")
    grammars = []
    if tools:
        grammars.append((tool_call_grammar(tools), True))
        grammars.append((tool_call_grammar(tools, only=tools[0].name, parallel=False), False))
    if schema is not None:
        grammars.append((json_output_grammar(schema), False))
    for (grammar, loosened), lazy in grammars:
        assert grammar_problem(grammar) is None, grammar_size(grammar)
        assert all("whole schema" not in note for note in loosened), loosened
        assert grammar_parses(vocab, grammar, lazy=lazy)


def test_the_deepest_grammar_allowed_parses_on_a_small_thread_stack() -> None:
    """MAX_GRAMMAR_DEPTH against llama.cpp's real parser, in a child process (a stack overflow
    would take pytest down with it) on a 512 KB thread stack, the smallest we run on."""
    script = (
        "import threading, llama_cpp\n"
        "from pensieve.paths import bundled_model_path\n"
        "from pensieved.engine.grammar_cache import parse_grammar\n"
        "from pensieved.engine.llama import Vocab\n"
        "llm = llama_cpp.Llama(model_path=str(bundled_model_path()), vocab_only=True,"
        " verbose=False)\n"
        f"text = {nested_grammar(MAX_GRAMMAR_DEPTH)!r}\n"
        "threading.stack_size(512 * 1024)\n"
        "ok = []\n"
        "thread = threading.Thread(target=lambda: ok.append(\n"
        "    parse_grammar(Vocab(llm._model.vocab), text, lazy=False) is not None))\n"
        "thread.start(); thread.join()\n"
        "assert ok == [True], ok\n"
    )
    if bundled_model_path() is None:
        pytest.skip("the bundled model is not installed")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
