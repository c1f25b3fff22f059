"""Mistral (Devstral, Ministral 3, Mistral Small 3.2, Magistral): `[TOOL_CALLS]NAME[ARGS]{…}`
per call, reasoning in `[THINK]…[/THINK]`. Mistral Small 3.2's template writes the call's id
too, `[TOOL_CALLS]NAME[CALL_ID]a1b2c3d4e[ARGS]{…}` (nine letters and digits; the model may
write one, which is read past: the client gets an id of ours)."""

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
        head=lambda name: (
            f'"[TOOL_CALLS]" {escape_literal(name)} ( "[CALL_ID]" [a-zA-Z0-9]{{9}} )? "[ARGS]"'
        ),
        head_re=re.compile(
            r"\[TOOL_CALLS\]\s*(?P<name>[^\s\[]+)\s*(?:\[CALL_ID\]\s*[a-zA-Z0-9]*\s*)?\[ARGS\]"
        ),
        args=JsonArgs(),
        call_close="",
        render=_render,
        separator='"\\n"?',
        markup=("[CALL_ID]",),
    ),
    reasoning=Reasoning(open="[THINK]", close="[/THINK]"),
)
