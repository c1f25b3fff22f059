"""Rendering a conversation into prompt tokens with the model's own chat template.

The template (Jinja, from the GGUF metadata) decides the wire format the model was trained on.
User-supplied text must never become control tokens: a user who types `<|im_start|>system`
must not be able to open a system turn. So content strings are replaced by markers before
rendering; afterwards the template's own text is tokenized with special tokens enabled and the
content between the markers with special tokens disabled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from pensieved.engine.dialects.detect import GENERIC, PROBE_CALL_ID, DialectChoice, choose
from pensieved.engine.tools import to_generic_messages
from pensieved.engine.types import ChatMessage, GenerationRequest, ToolCall, ToolSpec
from pensieved.errors import ChatTemplateError

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

Tokenizer = Callable[[str, bool, bool], list[int]]  # (text, special, add_bos) -> tokens


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template rejected the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # Sorted keys: tool schemas and call arguments render the same on every turn, whatever
    # order the client sent them in, so consecutive prompts share their prefix.
    return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=True)


class _GenerationBlock(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}`: it marks the assistant's text
    for training masks (`return_assistant_tokens_mask`); rendering keeps the text as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # `break`/`continue` (loopcontrols) are on in Hugging Face's and llama.cpp's renderers.
    # Lists and dicts may be changed (Kimi K2's templates queue call ids with `append` and
    # `pop`): each render gets its own copy of the context, see `render_text`.
    env = jinja2.sandbox.SandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
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
        # Empty content stays empty: templates test it (`{% if message.content %}`) to decide
        # what to write before tool calls, and a marker would always pass that test.
        content = marked.mark(message.content) if message.content else ""
        item: dict[str, Any] = {"role": message.role, "content": content}
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


def _date_variables() -> dict[str, str]:
    """Today, in the spellings templates read it. A day, never a clock time: the date sits in
    the system prompt, and a time there would change the prompt's start on every request, so
    no cached prefix would ever be reused."""
    today = datetime.now()
    return {
        "date_string": today.strftime("%d %b %Y"),  # Llama 3.x
        "datetime": today.strftime("%b %d %Y"),  # firefunction-v2
        "current_date": today.strftime("%Y-%m-%d"),
    }


def render_text(
    template_source: str | None,
    messages: Sequence[ChatMessage],
    *,
    bos_text: str,
    eos_text: str,
    tools: Sequence[ToolSpec] = (),
    extra: dict[str, Any] | None = None,
    continued: str | None = None,
) -> tuple[str, list[str]]:
    """Render to text with content markers; returns (rendered, original content strings).

    `extra` adds template variables (e.g. `enable_thinking`, which Qwen3's template reads).
    `continued`: text the reply continues (a prefill), after the generation prompt, as content.
    """
    if not template_source:
        raise ChatTemplateError(
            "the model has no chat template in its GGUF metadata (tokenizer.chat_template), "
            "so Pensieve cannot format a conversation for it: use an instruction-tuned model"
        )
    marked = _Marked()
    listed = [
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
    context: dict[str, Any] = {
        "messages": _template_messages(messages, marked),
        "add_generation_prompt": True,
        "bos_token": bos_text,
        "eos_token": eos_text,
        # firefunction-v2 reads the tool list as one JSON string, empty when there is none.
        "functions": _tojson(listed, indent=2) if listed else "",
        **_date_variables(),
        **(extra or {}),
    }
    if listed:
        context["tools"] = listed
    try:
        # A deep copy: the context shares the request's tool schemas and call arguments (the
        # grammar is built from them), which a template that mutates must not reach.
        rendered = _compile(template_source).render(**copy.deepcopy(context))
    except ChatTemplateError:
        raise
    except Exception as exc:  # a template is foreign code: any failure is its failure
        raise ChatTemplateError(f"the model's chat template failed to render: {exc}") from exc
    if continued:
        rendered += marked.mark(continued)
    return rendered, marked.texts


def tokenize_rendered(
    rendered: str,
    contents: list[str],
    tokenize: Tokenizer,
    *,
    add_bos: bool,
    bos_text: str,
    content_ends: list[int] | None = None,
) -> list[int]:
    """Tokenize template text with specials on and content text with specials off.

    `content_ends`, if given, gets the token position where each content string ends (a
    message's end, near where a client puts `cache_control`)."""
    if add_bos and bos_text and rendered.startswith(bos_text):
        rendered = rendered[len(bos_text) :]  # the tokenizer adds the BOS token itself
    tokens: list[int] = tokenize("", True, True) if add_bos else []
    position = 0
    for match in _MARK_RE.finditer(rendered):
        tokens += tokenize(rendered[position : match.start()], True, False)
        index = int(match.group(1))
        tokens += tokenize(contents[index] if index < len(contents) else "", False, False)
        if content_ends is not None:
            content_ends.append(len(tokens))
        position = match.end()
    tokens += tokenize(rendered[position:], True, False)
    return tokens


# ---- what a template can take --------------------------------------------------------------

_PROBE = "pensieve-probe-7f3a"


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template accepts, found by rendering small probe conversations."""

    tools: bool  # renders `tools`, and calls in a dialect we read (or were told)
    system_mid: bool  # renders a system message after the conversation has started
    system_first: bool = True  # renders a system message that opens the conversation
    # Why it cannot render a system prompt and a user turn even with system text folded in
    # (None: it can); reported when the model loads.
    error: str | None = None
    dialect: DialectChoice = GENERIC  # the tool-call syntax, and how it was chosen
    # Renders a user message right after tool results (Mistral's insists on an assistant).
    user_after_tool: bool = True
    # Takes only call ids of nine letters and digits (Mistral Small 3.2's and Nemo's).
    short_ids: bool = False


def render_plain(source: str, messages: list[ChatMessage], **kwargs: Any) -> str | None:
    """The template's text for `messages` with the contents in place; None if it fails."""
    rendered = _renders(source, messages, **kwargs)
    return rendered if isinstance(rendered, str) else None


def _renders(source: str, messages: list[ChatMessage], **kwargs: Any) -> str | ChatTemplateError:
    """The probe's rendered text with contents in place, or the template's error."""
    try:
        rendered, contents = render_text(source, messages, bos_text="", eos_text="", **kwargs)
    except ChatTemplateError as exc:
        return exc
    return _MARK_RE.sub(lambda m: contents[int(m.group(1))], rendered)


def _shows(rendered: str | ChatTemplateError, text: str) -> bool:
    return isinstance(rendered, str) and text in rendered


@lru_cache(maxsize=8)
def template_caps(source: str | None, tool_dialect: str = "auto") -> TemplateCaps:
    """What `source` takes; `tool_dialect` is the `tool_dialect` setting (`auto`: detect)."""
    dialect = choose(source, tool_dialect)
    if not source:
        return TemplateCaps(tools=False, system_mid=False, dialect=dialect)
    with_tools = _renders(source, [ChatMessage("user", "hi")], tools=[_probe_tool()])
    # A template whose calls no dialect reads gets our generic tool section instead, written
    # in hermes, which our parser and grammar speak.
    tools = _shows(with_tools, _PROBE) and dialect.source != "generic"
    # Gemma 2 raises "System role not supported"; a template that silently drops the
    # system text refuses it just as much.
    opening = ChatMessage("system", "pensieve-opening-2c9e")
    system_first = _shows(_renders(source, [opening, ChatMessage("user", "hi")]), opening.content)
    # A later system message is accepted only if the first one stays too: DeepSeek-R1's and
    # RWKV's templates keep the last system message and drop the others.
    later = [ChatMessage("user", "a"), ChatMessage("assistant", "b")]
    later += [ChatMessage("system", _PROBE), ChatMessage("user", "c")]
    mid = _renders(source, [opening, *later] if system_first else later)
    system_mid = _shows(mid, _PROBE) and (not system_first or _shows(mid, opening.content))
    user_after_tool = not tools or _renders_user_after_tool(source)
    short_ids = tools and _refuses_other_ids(source)
    caps = TemplateCaps(tools, system_mid, system_first, None, dialect, user_after_tool, short_ids)
    plain = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    rendered = _renders(source, conversation_for_template(caps, plain, ())[0])
    if isinstance(rendered, ChatTemplateError):
        return replace(caps, error=str(rendered))
    return caps


def _call_and_result(call_id: str) -> list[ChatMessage]:
    call = ToolCall(call_id, _PROBE, {})
    return [
        ChatMessage("user", "a"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "b", tool_call_id=call_id, name=_PROBE),
    ]


def _renders_user_after_tool(source: str) -> bool:
    messages = [*_call_and_result(PROBE_CALL_ID), ChatMessage("user", _PROBE)]
    return _shows(_renders(source, messages, tools=[_probe_tool()]), _PROBE)


def _refuses_other_ids(source: str) -> bool:
    """Whether the template refuses a call id like Anthropic's (it took the probe's)."""
    rendered = _renders(source, _call_and_result("toolu_01"), tools=[_probe_tool()])
    return isinstance(rendered, ChatTemplateError)


_ID_CHARACTERS = string.ascii_letters + string.digits


def short_id(call_id: str) -> str:
    """`call_id` as nine letters and digits, always the same for the same id (so that each
    turn renders the history as the one before did)."""
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    letters = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_CHARACTERS))
        letters.append(_ID_CHARACTERS[digit])
    return "".join(letters)


def _with_short_ids(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    out = []
    for message in messages:
        calls = tuple(replace(call, id=short_id(call.id)) for call in message.tool_calls)
        answered = message.tool_call_id
        out.append(
            replace(
                message,
                tool_calls=calls,
                tool_call_id=short_id(answered) if answered is not None else None,
            )
        )
    return out


def _probe_tool() -> ToolSpec:
    return ToolSpec(name=_PROBE, description="probe", parameters={"type": "object"})


def _user_into_results(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """A user message right after tool results joins the last result's text (an Anthropic
    user turn holds both; some templates take no user turn before the assistant's)."""
    out: list[ChatMessage] = []
    for message in messages:
        last = out[-1] if out else None
        if message.role == "user" and last is not None and last.role == "tool":
            joined = f"{last.content}\n\n{message.content}"
            out[-1] = ChatMessage("tool", joined, tool_call_id=last.tool_call_id, name=last.name)
        else:
            out.append(message)
    return out


SYSTEM_NOTE = "[System message]"


def _fold_system(caps: TemplateCaps, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Fold the system messages the template refuses where they stand (the first, or any
    later one) into the next user turn, clearly marked."""
    out: list[ChatMessage] = []
    pending: list[str] = []
    for index, message in enumerate(messages):
        kept = caps.system_first if index == 0 else caps.system_mid
        if message.role == "system" and not kept:
            pending.append(f"{SYSTEM_NOTE}\n{message.content}")
            continue
        if pending and message.role == "user":
            message = ChatMessage("user", "\n\n".join([*pending, message.content]))
            pending = []
        out.append(message)
    if pending:  # system text after the last user turn: a user turn of its own
        if out and out[-1].role == "user":
            joined = "\n\n".join([out[-1].content, *pending])
            out[-1] = ChatMessage("user", joined)
        else:
            out.append(ChatMessage("user", "\n\n".join(pending)))
    return out


def conversation_for_template(
    caps: TemplateCaps,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolSpec],
) -> tuple[list[ChatMessage], tuple[ToolSpec, ...]]:
    """The messages and tools to hand the template, in a form it accepts.

    Returns the tools the template itself should render (empty when they were folded into
    the system message in our generic format).
    """
    template_tools: tuple[ToolSpec, ...] = ()
    has_tool_history = any(m.tool_calls or m.role == "tool" for m in messages)
    if caps.tools:
        out = list(messages)
        template_tools = tuple(tool for tool in tools if not tool.deferred)
    elif tools or has_tool_history:
        out = to_generic_messages(messages, tools, caps.dialect.dialect.syntax.render)
    else:
        out = list(messages)
    out = _fold_system(caps, out)
    if caps.tools and not caps.user_after_tool:
        out = _user_into_results(out)
    if caps.short_ids:
        out = _with_short_ids(out)
    return out, template_tools


# ---- the variables a request sets ----------------------------------------------------------

# The nearest value to try when a template refuses the one asked for: Anthropic's `max` for
# templates that stop at high, and `medium` for those with only low and high (Hunyuan's).
_EFFORT_FALLBACK = {"max": "high", "medium": "high"}


@lru_cache(maxsize=64)
def _accepts(source: str, name: str, value: str) -> bool:
    """Whether the template renders with `name` set to `value` (Hunyuan's raises on a
    reasoning_effort outside its own list; gpt-oss takes low, medium and high)."""
    probe = _renders(source, [ChatMessage("user", "hi")], extra={name: value})
    return isinstance(probe, str)


def _reasoning_effort(source: str, request: GenerationRequest) -> str | None:
    # With thinking off the reasoning is dropped anyway: the least of it costs the least time.
    wanted = request.effort if request.thinking else "low"
    if wanted is None or "reasoning_effort" not in source:
        return None
    for value in (wanted, _EFFORT_FALLBACK.get(wanted)):
        if value is not None and _accepts(source, "reasoning_effort", value):
            return value
    return None  # the template's own default


def request_variables(source: str, request: GenerationRequest) -> dict[str, Any]:
    """The template switches that follow from the request: thinking on or off (Qwen3's
    `enable_thinking`, DeepSeek's and Granite's `thinking`) and the reasoning effort."""
    variables: dict[str, Any] = {"enable_thinking": request.thinking, "thinking": request.thinking}
    effort = _reasoning_effort(source, request)
    if effort is not None:
        variables["reasoning_effort"] = effort
    return variables


def render_request(
    source: str | None,
    request: GenerationRequest,
    *,
    bos_text: str,
    eos_text: str,
    tool_dialect: str = "auto",
) -> tuple[str, list[str]]:
    """The request's prompt in the template `source`, with content markers (render_text);
    `tool_dialect` is the setting that picks the tool dialect (`auto`: detected)."""
    caps = template_caps(source, tool_dialect)
    given, prefill = split_prefill(request.messages)
    messages, template_tools = conversation_for_template(caps, given, request.tools)
    extra = None
    if source:
        switches = caps.dialect.dialect.reasoning.switches(request.thinking)
        extra = {**switches, **request_variables(source, request)}
    return render_text(
        source,
        messages,
        bos_text=bos_text,
        eos_text=eos_text,
        tools=template_tools,
        extra=extra,
        continued=prefill,
    )


def split_prefill(
    messages: Sequence[ChatMessage],
) -> tuple[Sequence[ChatMessage], str | None]:
    """The conversation before a final assistant turn the reply is to continue (the Messages
    API's prefill: text only, no tool calls), and that turn's text; (messages, None) when the
    conversation does not end with one."""
    if messages and messages[-1].role == "assistant" and not messages[-1].tool_calls:
        return messages[:-1], messages[-1].content
    return messages, None
