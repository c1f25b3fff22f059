"""Converting between Anthropic wire shapes and the engine's request and event types."""

from __future__ import annotations

import secrets
from typing import Any

from pensieved.api.tool_search import ToolTable
from pensieved.engine.tools import loaded_tool_text
from pensieved.engine.types import (
    ChatMessage,
    GenerationRequest,
    Sampling,
    ToolCall,
    ToolChoice,
)
from pensieved.errors import InvalidRequestError, UnsupportedContentError
from pensieved.wire.anthropic import (
    ContentBlock,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    OtherBlock,
    SearchResultBlock,
    TextBlock,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolUseBlock,
    _PromptFields,
)

# Claude Code puts per-session client metadata first in `system`; it is no instruction, and
# keeping it would make every session's prompt prefix differ (no KV reuse across sessions).
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _system_text(system: str | list[TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    parts = [b.text for b in system if not b.text.startswith(BILLING_HEADER_PREFIX)]
    return "\n\n".join(parts)


def _unsupported(block: ImageBlock | DocumentBlock, where: str) -> UnsupportedContentError:
    kind = "images" if isinstance(block, ImageBlock) else "documents"
    return UnsupportedContentError(
        f"{where}: the loaded model does not accept {kind} (it has no vision support); "
        "send text only or configure a multimodal model"
    )


def _refused(block: OtherBlock, where: str) -> InvalidRequestError:
    return InvalidRequestError(f'{where}: block type "{block.type}" is not supported')


def _search_result_text(block: SearchResultBlock) -> str:
    body = "\n".join(part.text for part in block.content)
    return f"{block.title}\n{block.source}\n{body}"


def _tool_result_text(block: ToolResultBlock, where: str, tools: ToolTable) -> str:
    if block.content is None:
        return ""
    if isinstance(block.content, str):
        return block.content
    texts = []
    for index, part in enumerate(block.content):
        at = f"{where}.content.{index}"
        if isinstance(part, TextBlock):
            texts.append(part.text)
        elif isinstance(part, SearchResultBlock):
            texts.append(_search_result_text(part))
        elif isinstance(part, ToolReferenceBlock):
            texts.append(loaded_tool_text(tools.loaded(part.tool_name)))
        elif isinstance(part, OtherBlock):
            raise _refused(part, at)
        else:
            raise _unsupported(part, at)
    return "\n".join(texts)


def _convert_message(index: int, message: InputMessage, tools: ToolTable) -> list[ChatMessage]:
    """One wire message becomes one or more template messages (tool results are their own)."""
    where = f"messages.{index}"
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    block: ContentBlock
    for number, block in enumerate(message.content):
        at = f"{where}.content.{number}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, SearchResultBlock):
            texts.append(_search_result_text(block))
        elif isinstance(block, ImageBlock | DocumentBlock):
            raise _unsupported(block, at)
        elif isinstance(block, ToolUseBlock):
            calls.append(ToolCall(id=block.id, name=block.name, arguments=block.input))
        elif isinstance(block, ToolResultBlock):
            text = _tool_result_text(block, at, tools)
            if block.is_error:
                text = f"Error: {text}"
            results.append(ChatMessage(role="tool", content=text, tool_call_id=block.tool_use_id))
        elif isinstance(block, OtherBlock):
            raise _refused(block, at)
        # earlier reasoning (thinking, redacted_thinking) is not replayed to the model
    out = list(results)
    if texts or calls or not results:
        out.append(
            ChatMessage(role=message.role, content="\n".join(texts), tool_calls=tuple(calls))
        )
    return out


def to_engine_messages(request: _PromptFields, tools: ToolTable) -> tuple[ChatMessage, ...]:
    messages: list[ChatMessage] = []
    system = _system_text(request.system)
    if system:
        messages.append(ChatMessage(role="system", content=system))
    for index, message in enumerate(request.messages):
        messages.extend(_convert_message(index, message, tools))
    return tuple(messages)


def to_engine_tool_choice(request: _PromptFields, tools: ToolTable) -> ToolChoice:
    choice = request.tool_choice
    if choice is None:
        return ToolChoice()
    if choice.type in ("any", "tool") and not tools.callable:
        raise InvalidRequestError(
            f"tool_choice.type: '{choice.type}' requires `tools` with at least one tool"
        )
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequestError("tool_choice.name: required when tool_choice.type is 'tool'")
        tools.check_choice(choice.name)
    # Forced calls are one call: a small model told "call a tool" otherwise keeps calling.
    parallel = choice.type == "auto" and not choice.disable_parallel_tool_use
    return ToolChoice(mode=choice.type, name=choice.name, parallel=parallel)


def output_schema(request: _PromptFields) -> dict[str, Any] | None:
    fmt = request.output_config.format if request.output_config else None
    fmt = fmt or request.output_format
    return fmt.schema_ if fmt is not None else None


def messages_request(body: MessagesRequest) -> GenerationRequest:
    """A Messages request as the engine's request: its prompt and its sampling settings."""
    return to_generation_request(
        body,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop_sequences=body.stop_sequences,
    )


def to_generation_request(
    request: _PromptFields,
    *,
    max_tokens: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop_sequences: list[str] | None = None,
) -> GenerationRequest:
    sampling = Sampling(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
    )
    tools = ToolTable(request)
    return GenerationRequest(
        messages=to_engine_messages(request, tools),
        max_tokens=max_tokens,
        sampling=sampling,
        stop_sequences=tuple(stop_sequences or ()),
        tools=tools.callable,
        tool_choice=to_engine_tool_choice(request, tools),
        output_schema=output_schema(request),
        thinking=request.thinking is not None and request.thinking.type != "disabled",
        effort=request.output_config.effort if request.output_config else None,
    )
