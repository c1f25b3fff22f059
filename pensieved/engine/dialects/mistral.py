"""Mistral (Devstral, Ministral 3, Mistral Small 3.2, Magistral): `[TOOL_CALLS]NAME[ARGS]{…}`
per call, reasoning in `[THINK]…[/THINK]`."""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, JsonArgs, Reasoning, Syntax
from pensieved.engine.gbnf import escape_literal


def _render(name: str, arguments: dict[str, Any]) -> str:
    return f"[TOOL_CALLS]{name}[ARGS]{json.dumps(arguments, ensure_ascii=False, sort_keys=True)}"


MISTRAL = Dialect(
    name="mistral",
    syntax=Syntax(
        trigger="[TOOL_CALLS]",
        head=lambda name: f'"[TOOL_CALLS]" {escape_literal(name)} "[ARGS]"',
        head_re=re.compile(r"\[TOOL_CALLS\]\s*(?P<name>[^\s\[]+)\s*\[ARGS\]"),
        args=JsonArgs(),
        call_close="",
        render=_render,
        separator='"\\n"?',
    ),
    reasoning=Reasoning(open="[THINK]", close="[/THINK]"),
)
