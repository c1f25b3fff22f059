"""Every dialect against its family's real chat template (../shared/fixtures/chat-templates).

The round trip: the template renders a conversation with an assistant tool call in its
history; our parser reads that call back into the same name and input, our grammar (run by
llama.cpp's own grammar sampler) accepts the same text, and rejects it when one parameter has
the wrong type. Detection by probe renders picks the same dialect from the template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pensieved.engine.dialects import DIALECTS, by_name
from pensieved.engine.dialects.base import ParsedText
from pensieved.engine.dialects.detect import choose, detect
from pensieved.engine.grammar import tool_call_grammar
from pensieved.engine.grammar_cache import parse_grammar
from pensieved.engine.prompt import render_plain
from pensieved.engine.types import (
    ChatMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolSpec,
)

TEMPLATES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "chat-templates"
if not TEMPLATES.is_dir():
    TEMPLATES = Path("/work/shared/fixtures/chat-templates")

TOOL = ToolSpec(
    "get_weather",
    "Weather for a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "detailed": {"type": "boolean"},
            "units": {"type": "string", "enum": ["metric", "imperial"]},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
ARGS: dict[str, Any] = {"city": "Paris, France", "days": 3, "detailed": True, "units": "metric"}
WRONG: dict[str, Any] = {**ARGS, "days": "three"}

# (template file, dialect, what ends the assistant's turn in that template)
TABLE = [
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "hermes", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B.jinja", "hermes", "<|im_end|>"),
    ("Qwen3-Coder.jinja", "qwen3-xml", "<|im_end|>"),
    ("Qwen3.5-4B.jinja", "qwen3-xml", "<|im_end|>"),
    ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", "qwen3-xml", "<|im_end|>"),
    ("ByteDance-Seed-OSS.jinja", "seed-oss", "<seed:eos>"),
    ("GLM-4.6.jinja", "glm", "<|observation|>"),
    ("GLM-4.7-Flash.jinja", "glm", "<|observation|>"),
    ("MiniMax-M2.jinja", "minimax", "[e~["),
    ("MiniMax-M3.jinja", "minimax-m3", "[e~["),
    ("openai-gpt-oss-120b.jinja", "harmony", "<|start|>functions"),
    ("unsloth-mistral-Devstral-Small-2507.jinja", "mistral", "[TOOL_RESULTS]"),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", "mistral", "[TOOL_RESULTS]"),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral", "[TOOL_RESULTS]"),
    ("deepseek-ai-DeepSeek-V3.1.jinja", "deepseek", "<｜end▁of▁sentence｜>"),  # noqa: RUF001
    ("deepseek-ai-DeepSeek-V3.2.jinja", "deepseek-v3.2", "<｜end▁of▁sentence｜>"),  # noqa: RUF001
    ("deepseek-ai-DeepSeek-V4.jinja", "deepseek-v4", "<｜end▁of▁sentence｜>"),  # noqa: RUF001
    ("deepseek-ai-DeepSeek-V4-Flash-0731.jinja", "deepseek-v4", "<｜end▁of▁sentence｜>"),  # noqa: RUF001
    ("moonshotai-Kimi-K2.jinja", "kimi-k2", "<|im_end|>"),
    ("Kimi-K2-Instruct.jinja", "kimi-k2", "<|im_end|>"),
    ("Kimi-K2-Thinking.jinja", "kimi-k2", "<|im_end|>"),
    ("google-gemma-4-31B-it.jinja", "gemma4", "<|tool_response>"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "llama3", "<|eot_id|>"),
]
IDS = [row[0].removesuffix(".jinja") for row in TABLE]


def test_every_dialect_is_in_the_table() -> None:
    assert {d.name for d in DIALECTS} == {row[1] for row in TABLE}


def rendered_call(template: str, dialect: str, end: str, args: dict[str, Any]) -> str:
    """The template's own text for an assistant turn that calls TOOL with `args`."""
    source = (TEMPLATES / template).read_text()
    asked = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather in Paris?")]
    # The id as Mistral Small 3.2's template insists (nine letters and digits; the daemon
    # hands it such ids, see test_prompt).
    call = ChatMessage("assistant", "", tool_calls=(ToolCall("call00001", TOOL.name, args),))
    result = ChatMessage("tool", "sunny", tool_call_id="call00001", name=TOOL.name)
    before = render_plain(source, asked, tools=[TOOL])
    after = render_plain(source, [*asked, call, result], tools=[TOOL])
    assert before is not None and after is not None
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    # The generation prompt may begin as the call does (Gemma 4's `<|channel>` and
    # `<|tool_call>` share `<|`): the call starts no later than its trigger.
    trigger = by_name(dialect).syntax.trigger
    at = after.find(trigger, max(common - len(trigger) + 1, 0))
    if 0 <= at < common:
        common = at
    return after[common : after.index(end, common)]


def parse(dialect: str, text: str, chunk: int) -> list[Any]:
    parser = by_name(dialect).new_parser([TOOL])
    out: list[Any] = []
    for start in range(0, len(text), chunk):
        out += parser.feed(text[start : start + chunk])
    return out + parser.finish()


@pytest.mark.parametrize(("template", "dialect", "end"), TABLE, ids=IDS)
@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_the_templates_call_parses_back(template: str, dialect: str, end: str, chunk: int) -> None:
    events = parse(dialect, rendered_call(template, dialect, end, ARGS), chunk)
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == [TOOL.name]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert ends == [ToolCallEnd(ARGS, True)]
    deltas = [e.partial_json for e in events if isinstance(e, ToolCallDelta)]
    assert json.loads("".join(deltas)) == ARGS
    if chunk == 1:  # the arguments stream: more than one delta before the end
        assert len(deltas) > 1
    # Only layout (and an empty reasoning block the template writes) is left as text.
    text = "".join(e.text for e in events if isinstance(e, ParsedText))
    assert TOOL.name not in text and "Paris" not in text


@pytest.mark.parametrize(("template", "dialect", "end"), TABLE, ids=IDS)
def test_detected_from_the_template(template: str, dialect: str, end: str) -> None:
    source = (TEMPLATES / template).read_text()
    found = detect(source)
    assert found is not None and found.name == dialect
    assert choose(source).source == "detected"
    assert choose(source, "glm") == choose(source, "glm")
    assert choose(source, "glm").source == "configured"


def grammar_accepts(vocab: Any, vocab_model: Any, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write exactly `text`, then stop."""
    sampler = parse_grammar(vocab, grammar, lazy=False)
    assert sampler is not None, "llama.cpp refused the grammar"
    try:
        for token in vocab_model.tokenize(text.encode(), add_bos=False, special=False):
            if not sampler.allows(token):
                return False
            sampler.accept(token)
        return sampler.allows(vocab_model.token_eos())
    finally:
        sampler.close()


def from_trigger(dialect: str, text: str) -> str:
    """The call as the grammar produces it: from the dialect's trigger on."""
    trigger = by_name(dialect).syntax.trigger
    return text[text.index(trigger) :].rstrip()


@pytest.mark.parametrize(("template", "dialect", "end"), TABLE, ids=IDS)
def test_the_grammar_accepts_the_templates_call(
    vocab: Any, vocab_model: Any, template: str, dialect: str, end: str
) -> None:
    grammar, _ = tool_call_grammar([TOOL], dialect=by_name(dialect))
    good = from_trigger(dialect, rendered_call(template, dialect, end, ARGS))
    assert grammar_accepts(vocab, vocab_model, grammar, good), good
    wrong = from_trigger(dialect, rendered_call(template, dialect, end, WRONG))
    assert wrong != good
    assert not grammar_accepts(vocab, vocab_model, grammar, wrong), wrong


@pytest.mark.parametrize("dialect", [d.name for d in DIALECTS])
def test_our_own_rendering_parses_and_is_grammatical(
    vocab: Any, vocab_model: Any, dialect: str
) -> None:
    """For templates that know no tools: calls in the history are written in the dialect."""
    syntax = by_name(dialect).syntax
    text = syntax.render(TOOL.name, ARGS)
    assert [e for e in parse(dialect, text, 3) if isinstance(e, ToolCallEnd)] == [
        ToolCallEnd(ARGS, True)
    ]
    grammar, _ = tool_call_grammar([TOOL], dialect=by_name(dialect))
    assert grammar_accepts(vocab, vocab_model, grammar, text), text


@pytest.mark.parametrize("dialect", [d.name for d in DIALECTS if d.name != "hermes"])
def test_a_call_of_an_unknown_tool_is_text(dialect: str) -> None:
    text = "Sure. " + by_name(dialect).syntax.render("rm_rf", {"path": "/"})
    events = parse(dialect, text, 2)
    assert not [e for e in events if isinstance(e, ToolCallStart | ToolCallEnd)]
    assert "".join(e.text for e in events if isinstance(e, ParsedText)).startswith("Sure. ")


# ---- reasoning and visible text through the output router ------------------------------


def route(
    dialect: str,
    pieces: list[str],
    *,
    tools: bool = True,
    thinking: bool = True,
    thinking_open: bool = False,
) -> list[Any]:
    from pensieved.engine.output import OutputRouter
    from pensieved.engine.types import GenerationRequest, PreparedPrompt

    request = GenerationRequest(
        messages=(ChatMessage("user", "hi"),),
        max_tokens=100,
        tools=(TOOL,) if tools else (),
        thinking=thinking,
    )
    events: list[Any] = []
    prepared = PreparedPrompt(request, (1,), 100, thinking_open=thinking_open, tool_dialect=dialect)
    router = OutputRouter(prepared, events.append)
    for piece in pieces:
        router.feed(piece)
    router.end_of_turn()
    router.finish()
    return events


def pieces_of(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize(
    ("dialect", "reply"),
    [
        ("harmony", "<|channel|>analysis<|message|>Need weather.<|end|>"),
        ("seed-oss", "<seed:think>Need weather.</seed:think>"),
        ("mistral", "[THINK]Need weather.[/THINK]"),
        ("glm", "<think>Need weather.</think>"),
        ("gemma4", "<|channel>thought\nNeed weather.<channel|>"),
        ("deepseek-v4", "<think>Need weather.</think>"),
        ("minimax-m3", "<mm:think>Need weather.</mm:think>"),
    ],
)
def test_reasoning_in_the_familys_markup_is_thinking(dialect: str, reply: str) -> None:
    from pensieved.engine.types import TextPiece, ThinkingPiece

    call = by_name(dialect).syntax.render(TOOL.name, ARGS)
    events = route(dialect, pieces_of(reply + call))
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingPiece))
    assert thinking == "Need weather."
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(ARGS, True)]
    assert not [e for e in events if isinstance(e, TextPiece)]


@pytest.mark.parametrize("dialect", ["deepseek-v3.2", "deepseek-v4"])
def test_a_dsml_call_block_ends_the_reasoning_it_opens_in(dialect: str) -> None:
    """DeepSeek V3.2 and V4 may begin their calls inside `<think>` (the generation prompt
    opened it) without closing it: the block ends the reasoning and is a call."""
    from pensieved.engine.types import TextPiece, ThinkingPiece

    call = by_name(dialect).syntax.render(TOOL.name, ARGS)
    events = route(dialect, pieces_of("Need weather.\n\n" + call), thinking_open=True)
    assert "".join(e.text for e in events if isinstance(e, ThinkingPiece)) == "Need weather."
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(ARGS, True)]
    assert not [e for e in events if isinstance(e, TextPiece)]


def test_harmony_answer_headers_are_not_shown() -> None:
    from pensieved.engine.types import TextPiece, ThinkingPiece

    reply = (
        "<|channel|>analysis<|message|>Greet back.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"
    )
    events = route("harmony", pieces_of(reply, 2), tools=False)
    assert "".join(e.text for e in events if isinstance(e, ThinkingPiece)) == "Greet back."
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == "Hello there!"


@pytest.mark.parametrize("thinking", [True, False])
def test_gemma4_thought_channel_over_its_template(thinking: bool) -> None:
    """The request's `thinking` sets Gemma 4's switch (`enable_thinking`: a `<|think|>` line in
    the system turn; off, the generation prompt closes an empty thought block), and the model's
    thought channel is a thinking block. The empty block or lone `<channel|>` it may write after
    its answer is not shown."""
    from pensieved.engine.prompt import render_request
    from pensieved.engine.thinking import prompt_opens_thinking
    from pensieved.engine.types import GenerationRequest, TextPiece, ThinkingPiece

    source = (TEMPLATES / GEMMA4).read_text()
    asked = (ChatMessage("system", "Be brief."), ChatMessage("user", "Weather in Paris?"))
    request = GenerationRequest(asked, max_tokens=100, tools=(TOOL,), thinking=thinking)
    rendered, _ = render_request(source, request, bos_text="", eos_text="")
    assert ("<|think|>" in rendered) == thinking
    closed = "" if thinking else "<|channel>thought\n<channel|>"
    assert rendered.endswith("<|turn>model\n" + closed)
    opened = prompt_opens_thinking(rendered, by_name("gemma4").reasoning.open)
    assert not opened

    thought = "<|channel>thought\nParis, three days.\n<channel|>" if thinking else ""
    stray = "<channel|><|channel>thought\n<channel|>"
    reply = f"{thought}Let me look.{stray}" + by_name("gemma4").syntax.render(TOOL.name, ARGS)
    events = route("gemma4", pieces_of(reply), thinking=thinking, thinking_open=opened)
    shown = "".join(e.text for e in events if isinstance(e, ThinkingPiece))
    assert shown == ("Paris, three days." if thinking else "")
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == "Let me look."
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(ARGS, True)]
    # Without tools too: the stray markup is dropped from an answer.
    events = route("gemma4", pieces_of(f"{thought}Sunny.{stray}", 2), tools=False)
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == "Sunny."


# ---- Gemma 4's notation: nested values, streaming, the override --------------------------

GEMMA4 = "google-gemma-4-31B-it.jinja"
NESTED = ToolSpec(
    "plan_trip",
    "Plan a trip.",
    {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "stops": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "nights": {"type": "integer", "minimum": 1},
                        "note": {"type": ["string", "null"]},
                    },
                    "required": ["city", "nights"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 4,
            },
            "budget": {"type": "number"},
            "flexible": {"type": "boolean"},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["title", "stops"],
        "additionalProperties": False,
    },
)
NESTED_ARGS: dict[str, Any] = {
    "title": 'Two "cities",\n{one} week: <b>',
    "stops": [
        {"city": "Lyon", "nights": 2, "note": None},
        {"city": "Nice", "nights": 5, "note": "by the sea"},
    ],
    "budget": 1250.5,
    "flexible": False,
    "tags": {"season": "spring", "with": "kids"},
}


def nested_rendering(template: str, args: dict[str, Any]) -> str:
    """`template`'s rendering of a conversation with a call of NESTED with `args`."""
    source = (TEMPLATES / template).read_text()
    messages = [
        ChatMessage("user", "Plan it."),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", NESTED.name, args),)),
        ChatMessage("tool", "ok", tool_call_id="call_1", name=NESTED.name),
    ]
    rendered = render_plain(source, messages, tools=[NESTED])
    assert rendered is not None
    return rendered


def gemma4_call(args: dict[str, Any]) -> str:
    """Gemma 4's template's own text for a call of NESTED with `args`."""
    rendered = nested_rendering(GEMMA4, args)
    return rendered[rendered.index("<|tool_call>") : rendered.index("<|tool_response>")]


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_gemma4_nested_values_are_typed_as_the_template_wrote_them(chunk: int) -> None:
    text = gemma4_call(NESTED_ARGS)
    assert 'title:<|"|>Two "cities",\n{one} week: <b><|"|>' in text  # raw, as it was
    assert "note:None" in text and "budget:1250.5" in text and "flexible:false" in text
    parser = by_name("gemma4").new_parser([NESTED])
    events: list[Any] = []
    for start in range(0, len(text), chunk):
        events += parser.feed(text[start : start + chunk])
    events += parser.finish()
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(NESTED_ARGS, True)]
    deltas = "".join(e.partial_json for e in events if isinstance(e, ToolCallDelta))
    assert json.loads(deltas) == NESTED_ARGS
    assert not [e for e in events if isinstance(e, ParsedText)]


def test_gemma4_streams_a_string_as_it_arrives() -> None:
    parser = by_name("gemma4").new_parser([NESTED])
    parser.feed('<|tool_call>call:plan_trip{title:<|"|>Two ci')
    # The text so far is out; a delimiter cut short is held until it is decided.
    assert parser.feed("ties<|") == [ToolCallDelta("ties")]
    assert parser.feed('"|>,') == [ToolCallDelta('",')]


def test_gemma4_broken_notation_is_an_incomplete_call() -> None:
    # As with JSON arguments, what follows the closed object up to the close is not read.
    parser = by_name("gemma4").new_parser([NESTED])
    events = parser.feed('<|tool_call>call:plan_trip{title:<|"|>x<|"|>}}{<tool_call|>')
    events += parser.finish()
    assert [e.complete for e in events if isinstance(e, ToolCallEnd)] == [True]
    parser = by_name("gemma4").new_parser([NESTED])
    events = parser.feed('<|tool_call>call:plan_trip{title:<|"|>x<|"|>]<tool_call|>')
    events += parser.finish()
    assert [e.complete for e in events if isinstance(e, ToolCallEnd)] == [False]


@pytest.mark.parametrize(
    ("wrong", "why"),
    [
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": "2"}]}, "a number as a string"),
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": 0}]}, "under the minimum"),
        ({**NESTED_ARGS, "stops": []}, "fewer items than minItems"),
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": 1}] * 5}, "more than maxItems"),
        ({**NESTED_ARGS, "tags": {"season": 3}}, "an additional property of the wrong type"),
        ({**NESTED_ARGS, "extra": 1}, "a key the schema does not allow"),
        ({"stops": NESTED_ARGS["stops"]}, "a required key missing"),
        ({**NESTED_ARGS, "flexible": None}, "null for a boolean"),
    ],
)
def test_gemma4_grammar_is_typed_from_the_schema(
    vocab: Any, vocab_model: Any, wrong: dict[str, Any], why: str
) -> None:
    grammar, loosened = tool_call_grammar([NESTED], dialect=by_name("gemma4"))
    assert loosened == []
    assert grammar_accepts(vocab, vocab_model, grammar, gemma4_call(NESTED_ARGS))
    assert not grammar_accepts(vocab, vocab_model, grammar, gemma4_call(wrong)), why


def test_gemma4_configured_for_a_template_that_knows_no_tools() -> None:
    """`model.tool_dialect: gemma4` over a generic template: earlier calls are shown in
    Gemma 4's syntax, which its parser reads back."""
    from pensieve.config import Config
    from pensieved.engine.prompt import render_request
    from pensieved.engine.templates import BUILTIN
    from pensieved.engine.types import GenerationRequest

    config = Config.model_validate({"model": {"tool_dialect": "gemma4"}}, strict=True)
    assert config.model.tool_dialect == "gemma4"
    source = BUILTIN["chatml"]
    assert choose(source).source == "generic"
    assert choose(source, "gemma4") == choose(source, "gemma4")
    assert (choose(source, "gemma4").dialect.name, choose(source, "gemma4").source) == (
        "gemma4",
        "configured",
    )
    request = GenerationRequest(
        messages=(
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", TOOL.name, ARGS),)),
            ChatMessage("tool", "sunny", tool_call_id="call_1", name=TOOL.name),
        ),
        max_tokens=10,
        tools=(TOOL,),
    )
    _, contents = render_request(source, request, bos_text="", eos_text="", tool_dialect="gemma4")
    # The assistant's text, where the call is written (the system text shows an example).
    shown = contents[-2]
    assert shown.startswith("<|tool_call>call:get_weather{")
    assert [e for e in parse("gemma4", shown, 4) if isinstance(e, ToolCallEnd)] == [
        ToolCallEnd(ARGS, True)
    ]


# ---- MiniMax-M3: arguments as nested elements ------------------------------------------

MINIMAX_M3 = "MiniMax-M3.jinja"
NS = "]<]minimax[>["


def minimax_m3_call(args: dict[str, Any]) -> str:
    """MiniMax-M3's template's own text for a call of NESTED with `args`."""
    rendered = nested_rendering(MINIMAX_M3, args)
    start = rendered.rindex(f"{NS}<tool_call>\n{NS}<invoke")  # not the tool section's example
    return rendered[start : rendered.index("[e~[", start)]


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_minimax_m3_nested_values_are_typed_from_the_schema(chunk: int) -> None:
    text = minimax_m3_call(NESTED_ARGS)
    # Strings and numbers raw, booleans as JSON, lists as <item>s, None left out.
    assert f"<title>{NESTED_ARGS['title']}{NS}</title>" in text
    assert f"<budget>1250.5{NS}</budget>" in text and f"<flexible>false{NS}</" in text
    assert f"{NS}<stops>{NS}<item>{NS}<city>Lyon{NS}</city>{NS}<nights>2{NS}</" in text
    assert "<note>" in text and "None" not in text and "null" not in text
    parser = by_name("minimax-m3").new_parser([NESTED])
    events: list[Any] = []
    for start in range(0, len(text), chunk):
        events += parser.feed(text[start : start + chunk])
    events += parser.finish()
    # The template leaves a None out: the call reads back without that key.
    expected = json.loads(json.dumps(NESTED_ARGS))
    del expected["stops"][0]["note"]
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(expected, True)]
    deltas = "".join(e.partial_json for e in events if isinstance(e, ToolCallDelta))
    assert json.loads(deltas) == expected
    assert not [e for e in events if isinstance(e, ParsedText)]


def test_minimax_m3_streams_a_string_as_it_arrives() -> None:
    parser = by_name("minimax-m3").new_parser([NESTED])
    parser.feed(f'{NS}<tool_call>\n{NS}<invoke name="plan_trip">{NS}<title>Two ci')
    # The text so far is out; a closing tag cut short is held until it is decided.
    assert parser.feed("ties]<]mini") == [ToolCallDelta("ties")]
    assert parser.feed(f"max[>[</title>{NS}<budget>12") == [ToolCallDelta('", "budget": ')]
    assert parser.feed(f"50.5{NS}</budget>") == [ToolCallDelta("1250.5")]


def test_minimax_m3_without_a_schema_reads_the_shape() -> None:
    """A tool whose schema says nothing: `<item>` children are an array, other children an
    object, text is JSON when it parses."""
    spec = ToolSpec("free", "", None)
    parser = by_name("minimax-m3").new_parser([spec])
    text = by_name("minimax-m3").syntax.render("free", {"a": [1, "x"], "b": {"c": True}})
    events = parser.feed(text) + parser.finish()
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [
        ToolCallEnd({"a": [1, "x"], "b": {"c": True}}, True)
    ]


@pytest.mark.parametrize(
    ("wrong", "why"),
    [
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": "two"}]}, "text for an integer"),
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": 0}]}, "under the minimum"),
        ({**NESTED_ARGS, "stops": []}, "fewer items than minItems"),
        ({**NESTED_ARGS, "stops": [{"city": "Lyon", "nights": 1}] * 5}, "more than maxItems"),
        ({**NESTED_ARGS, "tags": {"season": {"a": "b"}}}, "an object for a string"),
        ({**NESTED_ARGS, "extra": 1}, "a key the schema does not allow"),
        ({"stops": NESTED_ARGS["stops"]}, "a required key missing"),
        ({**NESTED_ARGS, "flexible": "yes"}, "text for a boolean"),
    ],
)
def test_minimax_m3_grammar_is_typed_from_the_schema(
    vocab: Any, vocab_model: Any, wrong: dict[str, Any], why: str
) -> None:
    grammar, loosened = tool_call_grammar([NESTED], dialect=by_name("minimax-m3"))
    assert loosened == []
    assert grammar_accepts(vocab, vocab_model, grammar, minimax_m3_call(NESTED_ARGS))
    assert not grammar_accepts(vocab, vocab_model, grammar, minimax_m3_call(wrong)), why


@pytest.mark.parametrize("thinking", [True, False])
def test_minimax_m3_thinking_mode_follows_the_request(thinking: bool) -> None:
    """The request's thinking sets the template's `thinking_mode`: on, the generation prompt
    opens `<mm:think>`; off, it closes it (as every turn without reasoning starts)."""
    from pensieved.engine.thinking import prompt_opens_thinking

    source = (TEMPLATES / MINIMAX_M3).read_text()
    switches = by_name("minimax-m3").reasoning.switches(thinking)
    rendered = render_plain(source, [ChatMessage("user", "hi")], extra=switches)
    assert rendered is not None
    assert rendered.endswith("]~b]ai\n" + ("<mm:think>" if thinking else "</mm:think>"))
    assert prompt_opens_thinking(rendered, "<mm:think>") is thinking
