"""Built-in chat templates and `model.chat_template` files."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pensieve.config import BUILTIN_CHAT_TEMPLATES
from pensieved.engine.prompt import SYSTEM_NOTE, render_request, render_text, template_caps
from pensieved.engine.templates import (
    BUILTIN,
    missing_template_message,
    template_problem,
    template_source,
)
from pensieved.engine.types import ChatMessage, GenerationRequest, ToolSpec
from pensieved.errors import ChatTemplateError

CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hi"),
    ChatMessage("assistant", "Hello"),
    ChatMessage("user", "Bye"),
]


def rendered(name: str, bos: str = "<bos>") -> str:
    text, contents = render_text(BUILTIN[name], CONVERSATION, bos_text=bos, eos_text="<eos>")
    for index, content in enumerate(contents):
        text = text.replace(f"\ue000{index}\ue001", content)
    return text


def test_the_config_knows_every_builtin_and_only_those() -> None:
    assert tuple(BUILTIN) == BUILTIN_CHAT_TEMPLATES


def test_chatml() -> None:
    assert rendered("chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma_folds_the_system_prompt_into_the_first_user_turn() -> None:
    assert rendered("gemma") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_llama3() -> None:
    assert rendered("llama3", bos="<|begin_of_text|>") == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_builtins_take_tools_in_the_generic_format(name: str) -> None:
    # None of them speaks <tool_call>: tools are folded into the system prompt instead.
    assert template_caps(BUILTIN[name]).tools is False


def test_a_jinja_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert template_source(str(path)) == path.read_text()
    assert template_source("gemma") == BUILTIN["gemma"]


def test_an_unreadable_file_is_a_template_error(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="cannot read the chat template file"):
        template_source(str(tmp_path / "gone.jinja"))


def test_the_missing_template_message_names_the_key_and_the_choices() -> None:
    message = missing_template_message(Path("/m/base.gguf"), "model.aliases.x*.chat_template")
    assert "base.gguf" in message and "model.aliases.x*.chat_template" in message
    assert all(name in message for name in BUILTIN_CHAT_TEMPLATES)


# ---- what makes foreign templates render ---------------------------------------------------


def plain(source: str, request: GenerationRequest) -> str:
    text, contents = render_request(source, request, bos_text="", eos_text="")
    for index, content in enumerate(contents):
        text = text.replace(f"\ue000{index}\ue001", content)
    return text


def ask(*messages: ChatMessage, **fields: Any) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=1, **fields)


ROLES = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def test_loop_controls_work() -> None:
    source = "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}"
    source += "{{ m.content }};{% endfor %}"
    request = ask(ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c"))
    assert plain(source, request) == "a;"


def test_the_generation_block_renders_its_body() -> None:
    source = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    source += "<{{ m.content }}>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    # (An assistant turn in the history: a final one would be a prefill, continued as text.)
    history = ask(ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c"))
    assert plain(source, history) == "a<b>c"


@pytest.mark.parametrize(
    "source",
    [
        # Gemma 2's way: it raises.
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + ROLES,
        # Or the system text silently goes nowhere.
        "{% for m in messages %}{% if m.role != 'system' %}[{{ m.role }}] {{ m.content }}\n"
        "{% endif %}{% endfor %}",
    ],
    ids=["raises", "drops"],
)
def test_a_refused_first_system_message_opens_the_first_user_turn(source: str) -> None:
    caps = template_caps(source)
    assert (caps.system_first, caps.error) == (False, None)
    text = plain(source, ask(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")))
    assert text == f"[user] {SYSTEM_NOTE}\nBe brief.\n\nHi\n"


def test_a_template_keeping_only_the_last_system_message_gets_later_ones_folded() -> None:
    # DeepSeek-R1's and RWKV's templates: a later system message would replace the first.
    source = "{% set ns = namespace(s='') %}{% for m in messages %}{% if m.role == 'system' %}"
    source += "{% set ns.s = m.content %}{% endif %}{% endfor %}{{ ns.s }}\n"
    source += "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}\n{% endif %}"
    source += "{% endfor %}"
    caps = template_caps(source)
    assert (caps.system_first, caps.system_mid) == (True, False)
    request = ask(
        ChatMessage("system", "first"),
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("system", "later"),
        ChatMessage("user", "c"),
    )
    assert plain(source, request) == f"first\na\nb\n{SYSTEM_NOTE}\nlater\n\nc\n"


def test_functions_is_the_tool_list_as_json_or_empty() -> None:
    source = "{{ '(' + functions + ')' }}{% if tools %}{{ tools | length }}{% endif %}"
    source += "{# <tool_call> #}"  # so that the template renders tools itself
    weather = ToolSpec("get_weather", "Weather.", {"type": "object"})
    text = plain(source, ask(ChatMessage("user", "x"), tools=(weather,)))
    assert '"name": "get_weather"' in text and text.endswith(")1")
    assert plain(source, ask(ChatMessage("user", "x"))) == "()"


def test_dates_are_today() -> None:
    source = "{{ date_string }}|{{ datetime }}|{{ current_date }}"
    today = datetime.now()
    expected = [today.strftime(f) for f in ("%d %b %Y", "%b %d %Y", "%Y-%m-%d")]
    assert plain(source, ask(ChatMessage("user", "x"))).split("|") == expected


# Like Hunyuan's: any other value raises.
HY3 = (
    "{% if reasoning_effort is defined and reasoning_effort not in ['no_think', 'low', 'high'] %}"
    "{{ raise_exception('reasoning_effort error') }}{% endif %}"
    "{{ reasoning_effort | default('unset') }}/{{ enable_thinking }}/{{ thinking }}"
)


@pytest.mark.parametrize(
    ("thinking", "effort", "expected"),
    [
        (True, "high", "high/True/True"),
        (True, "max", "high/True/True"),  # the nearest the template takes
        (True, "medium", "high/True/True"),
        (True, "minimal", "unset/True/True"),  # refused: the template's own default
        (True, None, "unset/True/True"),
        (False, "high", "low/False/False"),  # thinking off: the least reasoning
    ],
)
def test_reasoning_effort_is_one_the_template_accepts(
    thinking: bool, effort: str | None, expected: str
) -> None:
    request = ask(ChatMessage("user", "x"), thinking=thinking, effort=effort)
    assert plain(HY3, request) == expected


def test_a_working_template_has_no_problem() -> None:
    model = Path("/m/chat.gguf")
    assert template_problem(model, None, BUILTIN["chatml"], "model.chat_template") is None
    assert template_problem(model, "gemma", None, "model.chat_template") is None


def test_a_template_that_cannot_render_is_a_problem_naming_its_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}")
    key = "model.aliases.x*.chat_template"
    problem = template_problem(Path("/m/chat.gguf"), str(path), None, key)
    assert problem is not None
    assert str(path) in problem and "no_such_filter" in problem
    assert "requests to chat.gguf will fail" in problem and key in problem
    own = template_problem(Path("/m/chat.gguf"), None, "{{ raise_exception('nope') }}", key)
    assert own is not None and "chat.gguf's own chat template" in own and "nope" in own


def test_a_missing_or_unreadable_template_is_a_problem(tmp_path: Path) -> None:
    model = Path("/m/base.gguf")
    missing = template_problem(model, None, None, "model.chat_template")
    assert missing == missing_template_message(model, "model.chat_template")
    gone = template_problem(model, str(tmp_path / "gone.jinja"), None, "model.chat_template")
    assert gone is not None and "cannot read the chat template file" in gone
