"""MiniMax-M2: calls as `<invoke>` elements inside one `<minimax:tool_call>` block:

<minimax:tool_call>
<invoke name="NAME">
<parameter name="KEY">value</parameter>
</invoke>
</minimax:tool_call>
"""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, Syntax, XmlArgs
from pensieved.engine.dialects.xml import param_text
from pensieved.engine.gbnf import escape_literal

_ARGS = XmlArgs(
    key_open='<parameter name="',
    key_close='">',
    value_close="</parameter>",
    param_re=re.compile(r'<parameter name="(?P<key>[^"]+)">(?P<value>.*?)</parameter>', re.DOTALL),
)


def _render(name: str, arguments: dict[str, Any]) -> str:
    params = "".join(
        f'<parameter name="{k}">{param_text(v)}</parameter>\n' for k, v in arguments.items()
    )
    return f"<minimax:tool_call>\n<invoke name={json.dumps(name)}>\n{params}</invoke>\n" + (
        "</minimax:tool_call>"
    )


MINIMAX = Dialect(
    name="minimax",
    syntax=Syntax(
        trigger="<minimax:tool_call>",
        block_open="<minimax:tool_call>",
        block_close="</minimax:tool_call>",
        head=lambda name: escape_literal(f'<invoke name="{name}">') + ' "\\n"?',
        head_re=re.compile(r'<invoke name="(?P<name>[^"]+)">'),
        args=_ARGS,
        call_close="</invoke>",
        render=_render,
    ),
)
