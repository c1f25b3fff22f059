"""Llama 3.1/3.2/3.3: a call is the bare JSON object `{"name": …, "parameters": {…}}`."""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, JsonArgs, Syntax
from pensieved.engine.gbnf import escape_literal


def _render(name: str, arguments: dict[str, Any]) -> str:
    args = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": {args}}}'


LLAMA3 = Dialect(
    name="llama3",
    syntax=Syntax(
        trigger='{"name"',
        head=lambda name: escape_literal(f'{{"name": "{name}", "parameters": '),
        head_re=re.compile(r'\{"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"parameters"\s*:'),
        args=JsonArgs(),
        call_close="}",
        render=_render,
        lead='"<|python_tag|>"',
    ),
)
