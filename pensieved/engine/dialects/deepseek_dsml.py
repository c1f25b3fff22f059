# ruff: noqa: RUF001, RUF002  (DeepSeek's markup token has full-width bars)
"""DeepSeek V3.2 and V4: calls in DSML, tags led by DeepSeek's `｜DSML｜` token,

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">value</｜DSML｜parameter>
    <｜DSML｜parameter name="N" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

a parameter's `string` attribute saying whether its value is raw text (`true`) or JSON. V4
names the block `tool_calls`; otherwise the two are the same, so each is one row built here.
Reasoning is in `<think>`, switched by the templates' `thinking` (V4's generation prompt
without thinking is a bare `</think>`, V3.2's an empty `<think></think>`); the call block may
begin inside it, unclosed, which ends the reasoning (as llama.cpp's parser reads it).
"""

from __future__ import annotations

import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, Reasoning, Syntax, XmlArgs
from pensieved.engine.dialects.xml import param_text
from pensieved.engine.gbnf import escape_literal

_DSML = "｜DSML｜"
_ARGS = XmlArgs(
    key_open=f'<{_DSML}parameter name="',
    key_close='" string="true">',
    value_close=f"</{_DSML}parameter>",
    param_re=re.compile(
        f'<{_DSML}parameter name="(?P<key>[^"]+)"(?:\\s+string="(?:true|false)")?\\s*>'
        f"(?P<value>.*?)</{_DSML}parameter>",
        re.DOTALL,
    ),
    typed_key_close=('" string="true">', '" string="false">'),
)


def _dsml(name: str, block: str) -> Dialect:
    """The dialect whose calls sit in a `block` element (`function_calls`, `tool_calls`)."""
    block_open, block_close = f"<{_DSML}{block}>", f"</{_DSML}{block}>"

    def render(tool: str, arguments: dict[str, Any]) -> str:
        params = "".join(
            f'<{_DSML}parameter name="{key}" string="{str(isinstance(value, str)).lower()}">'
            f"{param_text(value)}</{_DSML}parameter>\n"
            for key, value in arguments.items()
        )
        return (
            f'{block_open}\n<{_DSML}invoke name="{tool}">\n{params}</{_DSML}invoke>\n{block_close}'
        )

    return Dialect(
        name=name,
        syntax=Syntax(
            trigger=block_open,
            block_open=block_open,
            block_close=block_close,
            head=lambda tool: escape_literal(f'<{_DSML}invoke name="{tool}">') + ' "\\n"?',
            head_re=re.compile(f'<{_DSML}invoke\\s+name="(?P<name>[^"]+)"\\s*>'),
            args=_ARGS,
            call_close=f"</{_DSML}invoke>",
            render=render,
        ),
        reasoning=Reasoning(ends=(block_open,)),
    )


DEEPSEEK_V32 = _dsml("deepseek-v3.2", "function_calls")
DEEPSEEK_V4 = _dsml("deepseek-v4", "tool_calls")
