"""OpenAI harmony (gpt-oss): every part of a reply is a message on a channel.

Reasoning is the `analysis` channel, the answer the `final` channel, and a call a
`commentary` message addressed to the tool:

    <|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>commentary
    to=functions.NAME <|constrain|>json<|message|>{…}<|call|>

The template writes earlier calls with the recipient first (` to=functions.NAME<|channel|>
commentary json<|message|>`); both orders are read and allowed. The message headers of the
answer are dropped from the visible text. Reasoning cannot be switched off, only made short
(`reasoning_effort`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pensieved.engine.dialects.base import Dialect, JsonArgs, Reasoning, Syntax
from pensieved.engine.gbnf import escape_literal


def _head(name: str) -> str:
    return (
        f"{escape_literal(f'to=functions.{name}')} "
        '( "<|channel|>commentary json" | " <|constrain|>json" ) "<|message|>"'
    )


def _render(name: str, arguments: dict[str, Any]) -> str:
    args = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}<|call|>"


HARMONY = Dialect(
    name="harmony",
    syntax=Syntax(
        trigger="to=functions.",
        head=_head,
        head_re=re.compile(
            r"to=functions\.(?P<name>[^\s<]+)\s*(?:<\|channel\|>commentary)?\s*"
            r"(?:<\|constrain\|>)?\s*json\s*<\|message\|>"
        ),
        args=JsonArgs(),
        call_close="<|call|>",
        render=_render,
        separator='"<|start|>assistant" ( "<|channel|>commentary " | " " )?',
        lead='"<|channel|>commentary " | " "',
        drop=(
            "<|start|>assistant",
            "<|channel|>final<|message|>",
            "<|channel|>commentary<|message|>",
            "<|channel|>analysis<|message|>",
            "<|channel|>commentary ",
            "<|return|>",
            "<|end|>",
        ),
    ),
    reasoning=Reasoning(open="<|channel|>analysis<|message|>", close="<|end|>"),
)
