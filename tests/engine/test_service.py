"""Engine._grammar: which grammar a request gets when llama.cpp refuses the schema's; a
Session's events: the activity record and the metrics follow the generation's phases."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pensieve.config import Config
from pensieved.engine.grammar import loosest_grammar, request_grammar
from pensieved.engine.service import Engine, ModelRuntime, Session
from pensieved.engine.types import (
    Event,
    Finished,
    GenerationRequest,
    Heartbeat,
    PreparedPrompt,
    PromptCached,
    TextPiece,
    ToolChoice,
    ToolSpec,
)

TOOLS = (ToolSpec("alpha", "", {"type": "object", "properties": {"x": {"type": "integer"}}}),)


class Refusing:
    """A model whose llama.cpp refuses the grammars in `refused` (fakes only the parse)."""

    name = "refusing"

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


@dataclass
class ScriptedScheduler:
    """Streams `script`, noting the activity phase each event finds."""

    engine: Engine
    script: list[Event]
    phases: list[str] = field(default_factory=list)

    async def stream(
        self, prepared: Any, deadline: Any, heartbeat_s: float
    ) -> AsyncIterator[Event]:
        for event in self.script:
            self.phases += [e.phase for e in self.engine.activity.entries.values()]
            yield event


@dataclass
class ScriptedRuntime:
    scheduler: ScriptedScheduler
    model: Refusing = field(default_factory=lambda: Refusing(set()))


def test_a_sessions_activity_and_metrics_follow_its_phases() -> None:
    engine = Engine(Config())
    script: list[Event] = [
        Heartbeat(),
        PromptCached(3),
        TextPiece("Hel"),
        TextPiece("lo"),
        Finished("end_turn", None, 10, 2, 3),
    ]
    scheduler = ScriptedScheduler(engine, script)
    runtime = cast(ModelRuntime, ScriptedRuntime(scheduler))
    prepared = PreparedPrompt(request(), tuple(range(10)), 50)
    engine.activity.begin("req_1", "POST /v1/messages", "waiting for a slot (10 prompt tokens)")
    session = Session(engine, "req_1", runtime, prepared)

    async def run() -> list[Event]:
        return [event async for event in session.events()]

    assert asyncio.run(run()) == script
    assert session.input_tokens == 10
    assert scheduler.phases[:2] == ["waiting for a slot (10 prompt tokens)"] * 2
    assert scheduler.phases[2] == "evaluating the prompt (7 new tokens, 3 cached)"
    assert scheduler.phases[-1] == "generating"
    assert engine.metrics.ttft.count(model="refusing") == 1
    assert engine.metrics.queued.count(model="refusing") == 1
    assert engine.metrics.output_tokens.value(model="refusing") == 2
