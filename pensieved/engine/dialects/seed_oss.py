"""ByteDance Seed-OSS: Qwen3-Coder's parameters inside `<seed:tool_call>`, values on the
tag's line, and reasoning in `<seed:think>` switched by `thinking_budget` (0: none)."""

from __future__ import annotations

import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, Reasoning, Syntax, XmlArgs
from pensieved.engine.dialects.xml import param_text
from pensieved.engine.gbnf import escape_literal

_ARGS = XmlArgs(
    key_open="<parameter=",
    key_close=">",
    value_close="</parameter>",
    param_re=re.compile(r"<parameter=(?P<key>[^>\n]+)>(?P<value>.*?)</parameter>", re.DOTALL),
)


def _render(name: str, arguments: dict[str, Any]) -> str:
    params = "".join(f"<parameter={k}>{param_text(v)}</parameter>\n" for k, v in arguments.items())
    return f"<seed:tool_call>\n<function={name}>\n{params}</function>\n</seed:tool_call>"


def _switches(thinking: bool) -> dict[str, Any]:
    return {"thinking_budget": -1 if thinking else 0}


SEED_OSS = Dialect(
    name="seed-oss",
    syntax=Syntax(
        trigger="<seed:tool_call>",
        head=lambda name: (
            f'"<seed:tool_call>" "\\n"? {escape_literal(f"<function={name}>")} "\\n"?'
        ),
        head_re=re.compile(r"<seed:tool_call>\s*<function=(?P<name>[^>\n]+)>"),
        args=_ARGS,
        call_close="</seed:tool_call>",
        call_close_gbnf='"</function>" "\\n"? "</seed:tool_call>"',
        close_re=re.compile(r"</function>\s*</seed:tool_call>"),
        render=_render,
    ),
    reasoning=Reasoning(open="<seed:think>", close="</seed:think>", switches=_switches),
)
