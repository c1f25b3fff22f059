"""The engine's own request and event types: what the API layer hands in and gets back.

They know nothing of HTTP or Anthropic's JSON; the API layer converts to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


@dataclass(frozen=True)
class ToolCall:
    """A tool invocation in the conversation history (assistant side)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ChatMessage:
    """One message as the chat template sees it.

    `role` is system, user, assistant or tool; `tool_calls` only on assistant messages,
    `tool_call_id`/`name` only on tool results.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_sequences: tuple[str, ...] = ()
    tools: tuple[ToolSpec, ...] = ()


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenized prompt that is known to fit, with its effective output budget."""

    request: GenerationRequest
    tokens: tuple[int, ...]
    max_tokens: int  # after clamping to the context and the configured ceiling

    @property
    def input_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class TextPiece:
    """Text the client may see now (never part of a possible stop sequence, never half a char)."""

    text: str


@dataclass(frozen=True)
class Finished:
    stop_reason: StopReason
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int


@dataclass(frozen=True)
class Failed:
    """Generation ended by an error after it had started; `error` is a PensieveError."""

    error: Exception


Event = TextPiece | Finished | Failed
