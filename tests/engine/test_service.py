"""Engine._grammar: which grammar a request gets when llama.cpp refuses the schema's."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pensieve.config import Config
from pensieved.engine.grammar import loosest_grammar, request_grammar
from pensieved.engine.service import Engine
from pensieved.engine.types import GenerationRequest, ToolChoice, ToolSpec

TOOLS = (ToolSpec("alpha", "", {"type": "object", "properties": {"x": {"type": "integer"}}}),)


class Refusing:
    """A model whose llama.cpp refuses the grammars in `refused` (fakes only the parse)."""

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused
        self.asked: list[tuple[str, bool]] = []

    def parsed_grammar(self, grammar: str, *, lazy: bool, trigger: str = "") -> Any:
        self.asked.append((grammar, lazy))
        return None if grammar in self.refused else ("parsed", grammar, lazy)


def request(mode: str = "auto") -> GenerationRequest:
    return GenerationRequest(messages=(), max_tokens=1, tools=TOOLS, tool_choice=ToolChoice(mode))


def test_the_schema_grammar_is_parsed_once_asked() -> None:
    model = Refusing(set())
    grammar, lazy = request_grammar(request())
    assert Engine(Config())._grammar(model, request()) == ("parsed", grammar, lazy)
    assert Engine(Config())._grammar(model, request("none")) is None


def test_refused_schema_grammar_falls_back_to_the_loosest(caplog: pytest.LogCaptureFixture) -> None:
    grammar, lazy = request_grammar(request())
    assert grammar is not None and lazy
    loosest = loosest_grammar(request())
    model = Refusing({grammar})
    with caplog.at_level(logging.WARNING, logger="pensieved.engine"):
        parsed = Engine(Config())._grammar(model, request())
    assert parsed == ("parsed", loosest, True)
    assert "enforcing the JSON shape only" in caplog.text


def test_when_even_the_loosest_is_refused_output_is_unconstrained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grammar, _ = request_grammar(request())
    loosest = loosest_grammar(request())
    assert grammar is not None and loosest is not None
    model = Refusing({grammar, loosest})
    with caplog.at_level(logging.WARNING, logger="pensieved.engine"):
        assert Engine(Config())._grammar(model, request()) is None
    assert "output is not constrained" in caplog.text
