# ruff: noqa: RUF001, RUF002  (DeepSeek's special tokens are full-width bars)
"""DeepSeek V3.1: calls in a block of its own full-width special tokens,

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{…}<｜tool▁call▁end｜>
    <｜tool▁calls▁end｜>

with reasoning in `<think>` switched by the template's `thinking`."""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, JsonArgs, Syntax
from pensieved.engine.gbnf import escape_literal

_BEGIN, _END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_CALL, _SEP, _CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def _render(name: str, arguments: dict[str, Any]) -> str:
    args = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    return f"{_BEGIN}{_CALL}{name}{_SEP}{args}{_CALL_END}{_END}"


DEEPSEEK = Dialect(
    name="deepseek",
    syntax=Syntax(
        trigger=_BEGIN,
        block_open=_BEGIN,
        block_close=_END,
        head=lambda name: escape_literal(f"{_CALL}{name}{_SEP}"),
        head_re=re.compile(re.escape(_CALL) + r"\s*(?P<name>[^<｜\s]+)\s*" + re.escape(_SEP)),
        args=JsonArgs(),
        call_close=_CALL_END,
        render=_render,
        separator='"\\n"?',
    ),
)
