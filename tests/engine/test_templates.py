"""Built-in chat templates and `model.chat_template` files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pensieve.config import BUILTIN_CHAT_TEMPLATES
from pensieved.engine.prompt import render_text, template_caps
from pensieved.engine.templates import BUILTIN, missing_template_message, template_source
from pensieved.engine.types import ChatMessage
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
