"""The engine's own request and event types: what the API layer hands in and gets back.

They know nothing of HTTP or Anthropic's JSON; the API layer converts to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pensieved.engine.grammar_cache import ParsedGrammar

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
    # Loaded by tool search: callable, but its definition stands in the tool result that loaded
    # it, not in the tool list, so that the prompt before that result is unchanged.
    deferred: bool = False


ToolChoiceMode = Literal["auto", "any", "tool", "none"]


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; any: some tool; tool: the one named; none: no tool call."""

    mode: ToolChoiceMode = "auto"
    name: str | None = None
    parallel: bool = True  # several calls in one reply


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
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    # A JSON schema the reply must satisfy (structured output); None: free text.
    output_schema: dict[str, Any] | None = None
    # Return `<think>` reasoning as thinking events (True) or drop it (False).
    thinking: bool = False
    # The client's effort (Anthropic's output_config.effort: low, medium, high, max), which
    # sets a template's `reasoning_effort` where it has one; None: the template's default.
    effort: str | None = None


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenized prompt that is known to fit, with its effective output budget."""

    request: GenerationRequest
    tokens: tuple[int, ...]
    max_tokens: int  # after clamping to the context and the configured ceiling
    # The grammar constraining the output, parsed for the model (lazy: it applies from the
    # first `<tool_call>` on); each generation samples with a copy of it.
    grammar: ParsedGrammar | None = None
    thinking_open: bool = False  # the prompt ends inside a `<think>` block

    @property
    def input_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class _Piece:
    text: str


@dataclass(frozen=True)
class TextPiece(_Piece):
    """Text the client may see now (never part of a possible stop sequence, never half a char)."""


@dataclass(frozen=True)
class ThinkingPiece(_Piece):
    """Reasoning text (from `<think>` blocks), when the request enabled thinking."""


@dataclass(frozen=True)
class ToolCallStart:
    """The model began a call of tool `name`; its arguments follow as deltas."""

    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of the arguments JSON; the fragments of one call concatenate to it."""

    partial_json: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The call is over; `input` is its parsed arguments (`complete` False: cut short)."""

    input: dict[str, Any]
    complete: bool = True


@dataclass(frozen=True)
class PromptCached:
    """The prompt has a slot: `cache_read_tokens` of it are reused from the KV cache.

    Sent once, before prompt evaluation, so a stream's `message_start` can report the split.
    """

    cache_read_tokens: int


@dataclass(frozen=True)
class Heartbeat:
    """Nothing new for a while (a long prompt is being evaluated), but the request is alive."""


@dataclass(frozen=True)
class Finished:
    stop_reason: StopReason
    stop_sequence: str | None
    input_tokens: int  # the whole prompt, cached part included
    output_tokens: int
    cache_read_tokens: int


@dataclass(frozen=True)
class Failed:
    """Generation ended by an error after it had started; `error` is a PensieveError."""

    error: Exception


Event = (
    PromptCached
    | Heartbeat
    | TextPiece
    | ThinkingPiece
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | Finished
    | Failed
)
