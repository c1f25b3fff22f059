"""Kimi K2: numbered calls in a section of special tokens,

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
    <|tool_call_argument_begin|>{…}<|tool_call_end|><|tool_calls_section_end|>

(no line breaks), reasoning in `<think>` (K2 Thinking)."""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, JsonArgs, Syntax
from pensieved.engine.gbnf import escape_literal

_BEGIN, _END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
_CALL, _ARGS, _CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def _render(name: str, arguments: dict[str, Any]) -> str:
    args = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    return f"{_BEGIN}{_CALL}functions.{name}:0{_ARGS}{args}{_CALL_END}{_END}"


KIMI_K2 = Dialect(
    name="kimi-k2",
    syntax=Syntax(
        trigger=_BEGIN,
        block_open=_BEGIN,
        block_close=_END,
        head=lambda name: (
            f"{escape_literal(f'{_CALL}functions.{name}:')} [0-9]{{1,4}} {escape_literal(_ARGS)}"
        ),
        head_re=re.compile(
            re.escape(_CALL) + r"\s*(?:functions\.)?(?P<name>[^:<\s]+):\d+\s*" + re.escape(_ARGS)
        ),
        args=JsonArgs(),
        call_close=_CALL_END,
        render=_render,
        separator='"\\n"?',
    ),
)
