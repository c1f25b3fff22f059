"""Rendering a conversation into prompt tokens with the model's own chat template.

The template (Jinja, from the GGUF metadata) decides the wire format the model was trained on.
User-supplied text must never become control tokens: a user who types `<|im_start|>system`
must not be able to open a system turn. So content strings are replaced by markers before
rendering; afterwards the template's own text is tokenized with special tokens enabled and the
content between the markers with special tokens disabled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox

from pensieved.engine.types import ChatMessage, ToolSpec
from pensieved.errors import ChatTemplateError

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

Tokenizer = Callable[[str, bool, bool], list[int]]  # (text, special, add_bos) -> tokens


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template rejected the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


class _Marked:
    """Replaces content strings with numbered markers and remembers the originals."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        self.texts.append(text)
        return f"{_MARK_OPEN}{len(self.texts) - 1}{_MARK_CLOSE}"


def _template_messages(messages: Sequence[ChatMessage], marked: _Marked) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": marked.mark(message.content)}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            item["name"] = message.name
        out.append(item)
    return out


def render_text(
    template_source: str | None,
    messages: Sequence[ChatMessage],
    *,
    bos_text: str,
    eos_text: str,
    tools: Sequence[ToolSpec] = (),
) -> tuple[str, list[str]]:
    """Render to text with content markers; returns (rendered, original content strings)."""
    if not template_source:
        raise ChatTemplateError(
            "the model has no chat template in its GGUF metadata (tokenizer.chat_template), "
            "so Pensieve cannot format a conversation for it: use an instruction-tuned model"
        )
    marked = _Marked()
    context: dict[str, Any] = {
        "messages": _template_messages(messages, marked),
        "add_generation_prompt": True,
        "bos_token": bos_text,
        "eos_token": eos_text,
    }
    if tools:
        context["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in tools
        ]
    try:
        rendered = _compile(template_source).render(**context)
    except ChatTemplateError:
        raise
    except Exception as exc:  # a template is foreign code: any failure is its failure
        raise ChatTemplateError(f"the model's chat template failed to render: {exc}") from exc
    return rendered, marked.texts


def tokenize_rendered(
    rendered: str, contents: list[str], tokenize: Tokenizer, *, add_bos: bool, bos_text: str
) -> list[int]:
    """Tokenize template text with specials on and content text with specials off."""
    if add_bos and bos_text and rendered.startswith(bos_text):
        rendered = rendered[len(bos_text) :]  # the tokenizer adds the BOS token itself
    tokens: list[int] = tokenize("", True, True) if add_bos else []
    position = 0
    for match in _MARK_RE.finditer(rendered):
        tokens += tokenize(rendered[position : match.start()], True, False)
        index = int(match.group(1))
        tokens += tokenize(contents[index] if index < len(contents) else "", False, False)
        position = match.end()
    tokens += tokenize(rendered[position:], True, False)
    return tokens
