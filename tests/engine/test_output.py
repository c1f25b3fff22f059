"""OutputRouter: generated pieces in, events and the stop out (one table, one driver)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pensieved.engine.output import OutputRouter
from pensieved.engine.types import (
    Event,
    GenerationRequest,
    PreparedPrompt,
    StopReason,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolChoice,
    ToolSpec,
)

WEATHER = ToolSpec("get_weather", "", {"type": "object"})
OPEN = '<tool_call>\n{"name": "get_weather", "arguments": '
CALL = OPEN + '{"city": "Paris"}}\n</tool_call>'
PARIS = [ToolCallStart("get_weather"), ToolCallDelta('{"city": "Paris"}')]
PARIS_END = ToolCallEnd({"city": "Paris"}, True)


@dataclass(frozen=True)
class Case:
    pieces: list[str]
    events: list[Event]
    stop: StopReason = "end_turn"
    stop_sequence: str | None = None
    stopped_at: int | None = None  # the piece after which `feed` said stop
    end_of_turn: bool = True  # the model ended its turn after the last piece
    request: dict[str, Any] = field(default_factory=dict)
    thinking_open: bool = False


CASES = {
    "text": Case(["Hello", ", world"], [TextPiece("Hello, world")]),
    "max tokens": Case(["Hello"], [TextPiece("Hello")], stop="max_tokens", end_of_turn=False),
    "stop sequence split across pieces": Case(
        ["say ST", "OP and more", "never seen"],
        [TextPiece("say ")],
        stop="stop_sequence",
        stop_sequence="STOP",
        stopped_at=1,
        request={"stop_sequences": ("STOP",)},
    ),
    "a stop sequence's start that does not complete it": Case(
        ["a ST", "ART"], [TextPiece("a START")], request={"stop_sequences": ("STOP",)}
    ),
    "thinking shown, tags split across pieces": Case(
        ["<thi", "nk>\nhmm</th", "ink>\n\nAnswer"],
        [ThinkingPiece("hmm"), TextPiece("Answer")],
        request={"thinking": True},
    ),
    "thinking hidden": Case(["<think>hmm</think>Answer"], [TextPiece("Answer")]),
    "thinking opened by the prompt": Case(
        ["plan</think>ok"],
        [ThinkingPiece("plan"), TextPiece("ok")],
        request={"thinking": True},
        thinking_open=True,
    ),
    "thinking cut short stays thinking": Case(
        ["<think>still going"],
        [ThinkingPiece("still going")],
        stop="max_tokens",
        end_of_turn=False,
        request={"thinking": True},
    ),
    "tool call, marker split across pieces": Case(
        ["Let me check.\n<tool_", CALL[len("<tool_") :]],
        [TextPiece("Let me check.\n"), *PARIS, PARIS_END],
        stop="tool_use",
        request={"tools": (WEATHER,)},
    ),
    "text after parallel calls loses the line breaks between them": Case(
        [CALL, "\n", CALL, "\n\nDone"],
        [*PARIS, PARIS_END, *PARIS, PARIS_END, TextPiece("Done")],
        stop="tool_use",
        request={"tools": (WEATHER,)},
    ),
    "one call only: the reply stops after it": Case(
        [CALL, "\nmore text"],
        [*PARIS, PARIS_END],
        stop="tool_use",
        stopped_at=0,
        request={"tools": (WEATHER,), "tool_choice": ToolChoice(parallel=False)},
    ),
    "tool_choice none: the reply ends where a call starts": Case(
        ["Sure. <tool_", "call>", CALL[len("<tool_call>") :]],
        [TextPiece("Sure. ")],
        stopped_at=1,
        request={"tools": (WEATHER,), "tool_choice": ToolChoice("none")},
    ),
    "an unknown tool is text": Case(
        ['<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'],
        [TextPiece('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')],
        request={"tools": (WEATHER,)},
    ),
    "a stop sequence inside arguments does not cut the call": Case(
        [CALL],
        [*PARIS, PARIS_END],
        stop="tool_use",
        request={"tools": (WEATHER,), "stop_sequences": ("Paris",)},
    ),
    "a call cut short by max_tokens": Case(
        [OPEN + '{"city": "Par'],
        [
            ToolCallStart("get_weather"),
            ToolCallDelta('{"city": "Par'),
            ToolCallEnd({"city": "Par"}, False),
        ],
        stop="max_tokens",
        end_of_turn=False,
        request={"tools": (WEATHER,)},
    ),
    "structured output: tool markers are plain text": Case(
        [CALL],
        [TextPiece(CALL)],
        request={"tools": (WEATHER,), "output_schema": {"type": "object"}},
    ),
}


def _merged(events: list[Event]) -> list[Event]:
    """Adjacent pieces of one kind joined: how text is cut into pieces is not the contract."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextPiece) and isinstance(last, TextPiece):
            out[-1] = TextPiece(last.text + event.text)
        elif isinstance(event, ThinkingPiece) and isinstance(last, ThinkingPiece):
            out[-1] = ThinkingPiece(last.text + event.text)
        elif isinstance(event, ToolCallDelta) and isinstance(last, ToolCallDelta):
            out[-1] = ToolCallDelta(last.partial_json + event.partial_json)
        else:
            out.append(event)
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_output_router(case: Case) -> None:
    request = GenerationRequest(messages=(), max_tokens=100, **case.request)
    prepared = PreparedPrompt(
        request=request, tokens=(1,), max_tokens=100, thinking_open=case.thinking_open
    )
    events: list[Event] = []
    router = OutputRouter(prepared, events.append)
    stopped_at = None
    for index, piece in enumerate(case.pieces):
        if router.feed(piece):  # as Generation.accept: the generation ends here
            stopped_at = index
            break
    if stopped_at is None and case.end_of_turn:
        router.end_of_turn()
    router.finish()
    assert _merged(events) == case.events
    assert (router.stop_reason, router.stop_sequence) == (case.stop, case.stop_sequence)
    assert stopped_at == case.stopped_at
    assert router.done == (stopped_at is not None or case.end_of_turn)
