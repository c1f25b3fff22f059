"""The tool-call parser, the generic tool format and how conversations reach the template."""

from __future__ import annotations

import json

import pytest

from pensieved.engine.markers import TOOL_CALL_OPEN
from pensieved.engine.prompt import (
    SYSTEM_NOTE,
    TemplateCaps,
    conversation_for_template,
    render_text,
    template_caps,
)
from pensieved.engine.tools import (
    ParsedText,
    ToolCallParser,
    render_call,
    repair_partial_json,
    to_generic_messages,
    tools_system_text,
)
from pensieved.engine.types import (
    ChatMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolSpec,
)

WEATHER = ToolSpec(
    "get_weather",
    "Weather for a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def parse(text: str, *, chunk: int = 1, known: tuple[str, ...] | None = ("get_weather",)) -> list:
    parser = ToolCallParser(known)
    out = []
    for start in range(0, len(text), chunk):
        out += parser.feed(text[start : start + chunk])
    return out + parser.finish()


def texts(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, ParsedText))


def args_json(events: list) -> str:
    return "".join(e.partial_json for e in events if isinstance(e, ToolCallDelta))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_well_formed_call_after_text(chunk: int) -> None:
    args = {"city": 'Pa}ris "{x"', "nested": {"list": [1, {"a": [2]}]}}
    text = "Let me check.\n" + render_call("get_weather", args)
    events = parse(text, chunk=chunk)
    assert texts(events) == "Let me check.\n"
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [s.name for s in starts] == ["get_weather"]
    assert ends == [ToolCallEnd(args, True)]
    assert json.loads(args_json(events)) == args


def test_several_calls_and_compact_spacing() -> None:
    text = (
        '<tool_call>{"name":"get_weather","arguments":{"city":"A"}}</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "B"}}\n</tool_call>'
    )
    events = parse(text, chunk=2)
    ends = [e.input for e in events if isinstance(e, ToolCallEnd)]
    assert ends == [{"city": "A"}, {"city": "B"}]
    assert texts(events).strip() == ""


def test_text_that_only_looks_like_a_tag_is_released() -> None:
    events = parse("a <tool_c and <tool> and <tool_cal")
    assert texts(events) == "a <tool_c and <tool> and <tool_cal"
    assert not any(isinstance(e, ToolCallStart) for e in events)


def test_partial_call_at_end_is_repaired_and_marked_incomplete() -> None:
    events = parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert isinstance(events[0], ToolCallStart)
    end = events[-1]
    assert end == ToolCallEnd({"city": "Par"}, complete=False)


def test_call_cut_before_the_name_is_returned_as_text() -> None:
    events = parse('ok <tool_call>\n{"na')
    assert texts(events) == 'ok <tool_call>\n{"na'


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        '{"name": "get_weather", "arguments": [1, 2',
        '{"name": "unknown_tool", "arguments": {}}',
        '["get_weather"]',
    ],
)
def test_malformed_calls_become_text(body: str) -> None:
    text = f"x {TOOL_CALL_OPEN}{body}</tool_call> y"
    events = parse(text, chunk=4)
    assert not any(isinstance(e, ToolCallEnd) for e in events)
    assert texts(events) == text


def test_other_key_orders_are_parsed_whole() -> None:
    text = '<tool_call>{"arguments": {"city": "Rome"}, "name": "get_weather"}</tool_call>'
    events = parse(text)
    assert [type(e) for e in events] == [ToolCallStart, ToolCallDelta, ToolCallEnd]
    assert json.loads(args_json(events)) == {"city": "Rome"}


def test_arguments_given_as_a_json_string() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    events = parse(text)
    assert events[-1] == ToolCallEnd({"city": "Oslo"}, True)


def test_repair_partial_json() -> None:
    assert repair_partial_json('{"a": [1, 2') == {"a": [1, 2]}
    assert repair_partial_json('{"a": "x", "b') == {"a": "x"}
    assert repair_partial_json('{"a": {"b": "c\\') == {"a": {"b": "c"}}
    assert repair_partial_json("") is None
    assert repair_partial_json('{"a": [1, {"b": [') == {"a": [1, {"b": []}]}
    assert repair_partial_json('{"a": 1, "b": tr') == {"a": 1}


# ---- the generic format ----------------------------------------------------------------


def test_generic_format_is_deterministic_and_puts_tools_first() -> None:
    reordered = ToolSpec(
        WEATHER.name, WEATHER.description, dict(reversed(WEATHER.parameters.items()))
    )
    a = tools_system_text([WEATHER])
    assert a == tools_system_text([reordered])
    messages = to_generic_messages(
        [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")], [WEATHER]
    )
    assert messages[0].role == "system"
    assert messages[0].content.startswith("# Tools")
    assert messages[0].content.endswith("Be brief.")
    assert '"name": "get_weather"' in messages[0].content


def test_generic_format_round_trips_history() -> None:
    history = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage(
            "assistant", "Checking.", (ToolCall("toolu_1", "get_weather", {"city": "Paris"}),)
        ),
        ChatMessage("tool", "Sunny, 21C", tool_call_id="toolu_1"),
        ChatMessage("tool", "Error: timeout", tool_call_id="toolu_2"),
        ChatMessage("user", "Thanks, and tomorrow?"),
    ]
    out = to_generic_messages(history, [WEATHER])
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[2].content == "Checking.\n" + render_call("get_weather", {"city": "Paris"})
    assert '<tool_result tool_use_id="toolu_1">\nSunny, 21C\n</tool_result>' in out[3].content
    assert "Error: timeout" in out[3].content
    assert out[3].content.endswith("Thanks, and tomorrow?")
    # What the model reads for its own earlier call is what the parser understands.
    events = parse(render_call("get_weather", {"city": "Paris"}))
    assert events[-1] == ToolCallEnd({"city": "Paris"}, True)


# ---- templates -------------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small template in the style of Qwen2.5's: it takes tools and renders calls and results.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    'Call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first and tools %}"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    '{% for c in m.tool_calls %}\n<tool_call>\n{"name": "{{ c.function.name }}", '
    '"arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Like Gemma's or Mistral's: no system role except first, strict alternation.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('System role only at the start') }}{% endif %}"
    "[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
)


def rendered(source: str, messages: list[ChatMessage], tools: list[ToolSpec]) -> str:
    caps = template_caps(source)
    out, template_tools = conversation_for_template(caps, messages, tools)
    text, contents = render_text(source, out, bos_text="", eos_text="", tools=template_tools)
    for index, content in enumerate(contents):
        text = text.replace(f"\ue000{index}\ue001", content)
    return text


def test_caps_are_detected() -> None:
    assert template_caps(CHATML) == TemplateCaps(tools=False, system_mid=True)
    caps = template_caps(TOOLS_TEMPLATE)
    assert (caps.tools, caps.system_mid, caps.dialect.source) == (True, True, "detected")
    assert caps.dialect.dialect.name == "hermes"
    assert template_caps(STRICT_TEMPLATE) == TemplateCaps(tools=False, system_mid=False)


def test_template_with_tools_renders_them_itself() -> None:
    history = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", (ToolCall("toolu_1", "get_weather", {"city": "Oslo"}),)),
        ChatMessage("tool", "Rain", tool_call_id="toolu_1"),
    ]
    text = rendered(TOOLS_TEMPLATE, history, [WEATHER])
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert "# Tools\n\nYou can call" not in text  # our generic section is not added
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert "<tool_response>\nRain\n</tool_response>" in text


def test_template_without_tools_gets_the_generic_format() -> None:
    text = rendered(CHATML, [ChatMessage("user", "Weather?")], [WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools")


def test_mid_conversation_system_is_merged_when_the_template_refuses_it() -> None:
    history = [
        ChatMessage("system", "first"),
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("system", "remember X"),
        ChatMessage("user", "c"),
    ]
    text = rendered(STRICT_TEMPLATE, history, [])
    assert text.startswith("[system] first\n")
    assert f"[user] {SYSTEM_NOTE}\nremember X\n\nc\n" in text
    # A template that accepts it keeps it as a system turn.
    assert "<|im_start|>system\nremember X<|im_end|>" in rendered(CHATML, history, [])


def test_tool_schemas_render_identically_whatever_the_key_order() -> None:
    reordered = ToolSpec(
        WEATHER.name, WEATHER.description, dict(reversed(WEATHER.parameters.items()))
    )
    messages = [ChatMessage("user", "hi")]
    assert rendered(TOOLS_TEMPLATE, messages, [WEATHER]) == rendered(
        TOOLS_TEMPLATE, messages, [reordered]
    )
