"""Qwen3-Coder's XML calls, also Qwen3.5/3.6, Nemotron 3 and StepFun 3.5:

<tool_call>
<function=NAME>
<parameter=KEY>
value
</parameter>
</function>
</tool_call>
"""

from __future__ import annotations

import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, Syntax, XmlArgs
from pensieved.engine.dialects.xml import param_text
from pensieved.engine.gbnf import escape_literal

_ARGS = XmlArgs(
    key_open="<parameter=",
    key_close=">",
    value_close="</parameter>",
    param_re=re.compile(r"<parameter=(?P<key>[^>\n]+)>(?P<value>.*?)</parameter>", re.DOTALL),
    newline_values=True,
)


def _render(name: str, arguments: dict[str, Any]) -> str:
    params = "".join(
        f"<parameter={k}>\n{param_text(v)}\n</parameter>\n" for k, v in arguments.items()
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


QWEN3_XML = Dialect(
    name="qwen3-xml",
    syntax=Syntax(
        trigger="<tool_call>",
        head=lambda name: f'"<tool_call>" "\\n"? {escape_literal(f"<function={name}>")} "\\n"?',
        head_re=re.compile(r"<tool_call>\s*<function=(?P<name>[^>\n]+)>"),
        args=_ARGS,
        call_close="</tool_call>",
        close_re=re.compile(r"</function>\s*</tool_call>"),
        call_close_gbnf='"</function>" "\\n"? "</tool_call>"',
        render=_render,
    ),
)
