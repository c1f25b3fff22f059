"""Hermes JSON: `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`.

Hermes 2/3, Qwen2.5 and Qwen3, Granite 4, Bielik, MiMo-VL, Apriel, and our generic tool
section for templates that know no tools at all. Its parser (`tools.ToolCallParser`) also
takes calls that are JSON in another order or with the arguments as a string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pensieved.engine.dialects.base import CallParser, Dialect, JsonArgs, Syntax
from pensieved.engine.gbnf import escape_literal
from pensieved.engine.markers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from pensieved.engine.tools import ToolCallParser, render_call
from pensieved.engine.types import ToolSpec


def _head(name: str) -> str:
    quoted = escape_literal(f'{{"name": "{name}", "arguments": ')
    return f'{escape_literal(TOOL_CALL_OPEN)} "\\n"? {quoted}'


def _parser(tools: Sequence[ToolSpec] | None) -> CallParser:
    return ToolCallParser([t.name for t in tools] if tools is not None else None)


HERMES = Dialect(
    name="hermes",
    syntax=Syntax(
        trigger=TOOL_CALL_OPEN,
        head=_head,
        head_re=re.compile(
            r'<tool_call>\s*\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:'
        ),
        args=JsonArgs(),
        call_close=TOOL_CALL_CLOSE,
        call_close_gbnf=f'"}}" "\\n"? {escape_literal(TOOL_CALL_CLOSE)}',
        render=render_call,
    ),
    parser=_parser,
)
