"""GLM-4.5/4.6/4.7, Ling 3.0, Spark 2.5: the name after `<tool_call>`, then key/value pairs:

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>value</arg_value>
    </tool_call>

(GLM-4.7 writes it without the line breaks; both are read and allowed.)
"""

from __future__ import annotations

import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, Syntax, XmlArgs
from pensieved.engine.dialects.xml import param_text
from pensieved.engine.gbnf import escape_literal

_ARGS = XmlArgs(
    key_open="<arg_key>",
    key_close="</arg_key><arg_value>",
    key_close_gbnf='"</arg_key>" "\\n"? "<arg_value>"',
    value_close="</arg_value>",
    param_re=re.compile(
        r"<arg_key>(?P<key>.*?)</arg_key>\s*<arg_value>(?P<value>.*?)</arg_value>", re.DOTALL
    ),
)


def _render(name: str, arguments: dict[str, Any]) -> str:
    params = "".join(
        f"<arg_key>{k}</arg_key>\n<arg_value>{param_text(v)}</arg_value>\n"
        for k, v in arguments.items()
    )
    return f"<tool_call>{name}\n{params}</tool_call>"


GLM = Dialect(
    name="glm",
    syntax=Syntax(
        trigger="<tool_call>",
        head=lambda name: f'"<tool_call>" {escape_literal(name)} "\\n"?',
        head_re=re.compile(r"<tool_call>\s*(?P<name>[^\s<]+)\s*(?=<arg_key>|</tool_call>)"),
        args=_ARGS,
        call_close="</tool_call>",
        render=_render,
    ),
)
