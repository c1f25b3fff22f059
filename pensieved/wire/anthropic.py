"""Anthropic Messages API wire shapes (pydantic), for requests we accept and replies we send.

Requests ignore fields we do not act on (Anthropic adds fields often; clients send them), but
every field we do read is validated, and errors name the field path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

# ---- request content blocks ----------------------------------------------------------------
#
# Anthropic adds block types often. A block of a type we do not know still parses (as
# `OtherBlock`), so that a request routed to an upstream passes through untouched; the local
# engine's converter then refuses it in one line naming its path and type. Union branches are
# tagged `<name>`: the error formatter drops such tags from the paths it shows.


class _ExtraIgnored(BaseModel):
    """Request shapes: fields we do not act on are dropped, not refused."""

    model_config = ConfigDict(extra="ignore")


class TextBlock(_ExtraIgnored):
    type: Literal["text"]
    text: str = Field(description="The text.")


class ImageBlock(_ExtraIgnored):
    type: Literal["image"]
    source: dict[str, Any] = Field(description="base64, url or file source of the image.")


class DocumentBlock(_ExtraIgnored):
    type: Literal["document"]
    source: dict[str, Any] = Field(description="The document's source.")
    title: str | None = None


class SearchResultBlock(_ExtraIgnored):
    type: Literal["search_result"]
    source: str = Field(description="Where the result came from (a URL or a name).")
    title: str = Field(description="The result's title.")
    content: list[TextBlock] = Field(description="The result's text.")


class ToolReferenceBlock(_ExtraIgnored):
    """Tool search: names a deferred tool (`defer_loading`), whose definition is then loaded."""

    type: Literal["tool_reference"]
    tool_name: str = Field(min_length=1, description="The tool whose definition is loaded.")


class OtherBlock(_ExtraIgnored):
    """A block type Pensieve does not serve: parsed so that upstream routes pass it on."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="The block's type.")


def _tag_of(known: frozenset[str]) -> Any:
    def tag(value: Any) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return f"<{kind}>" if kind in known else "<other>"

    return Discriminator(tag)


def _str_or_list(value: Any) -> str:
    return "<str>" if isinstance(value, str) else "<list>"


B = TypeVar("B")
# A string or a list of blocks (`content`, `system`): parsed as the value's own kind, so that a
# bad block is reported once, not beside "Input should be a valid string".
StrOrList = Annotated[
    Annotated[str, Tag("<str>")] | Annotated[list[B], Tag("<list>")],
    Discriminator(_str_or_list),
]


ToolResultPart = Annotated[
    Annotated[TextBlock, Tag("<text>")]
    | Annotated[ImageBlock, Tag("<image>")]
    | Annotated[DocumentBlock, Tag("<document>")]
    | Annotated[SearchResultBlock, Tag("<search_result>")]
    | Annotated[ToolReferenceBlock, Tag("<tool_reference>")]
    | Annotated[OtherBlock, Tag("<other>")],
    _tag_of(frozenset({"text", "image", "document", "search_result", "tool_reference"})),
]


class ToolUseBlock(_ExtraIgnored):
    type: Literal["tool_use"]
    id: str = Field(description="The tool call's id, referenced by the tool_result.")
    name: str = Field(description="The tool that was called.")
    input: dict[str, Any] = Field(description="Arguments of the call.")


class ToolResultBlock(_ExtraIgnored):
    type: Literal["tool_result"]
    tool_use_id: str = Field(description="The id of the tool_use this answers.")
    content: StrOrList[ToolResultPart] | None = Field(
        None,
        description="A string, or blocks: text, image, document, search_result, and "
        "tool_reference (tool search).",
    )
    is_error: bool = False


class ThinkingBlock(_ExtraIgnored):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_ExtraIgnored):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("<text>")]
    | Annotated[ImageBlock, Tag("<image>")]
    | Annotated[DocumentBlock, Tag("<document>")]
    | Annotated[SearchResultBlock, Tag("<search_result>")]
    | Annotated[ToolUseBlock, Tag("<tool_use>")]
    | Annotated[ToolResultBlock, Tag("<tool_result>")]
    | Annotated[ThinkingBlock, Tag("<thinking>")]
    | Annotated[RedactedThinkingBlock, Tag("<redacted_thinking>")]
    | Annotated[OtherBlock, Tag("<other>")],
    _tag_of(
        frozenset(
            {
                "text",
                "image",
                "document",
                "search_result",
                "tool_use",
                "tool_result",
                "thinking",
                "redacted_thinking",
            }
        )
    ),
]

# user and assistant are the documented roles; a system message mid-conversation is served too
# (Claude Code sends them, and Anthropic documents mid-conversation system messages).
ROLES = ("user", "assistant", "system")


class InputMessage(_ExtraIgnored):
    role: Literal["user", "assistant", "system"] = Field(
        description="user or assistant (system is accepted mid-conversation, as Claude Code "
        "sends it)."
    )
    content: StrOrList[ContentBlock] = Field(description="A string or a list of blocks.")

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ROLES:
            raise PydanticCustomError(
                "role", 'role "{role}" is not supported: use user or assistant', {"role": value}
            )
        return value


class Tool(_ExtraIgnored):
    type: str | None = Field(
        None,
        description="`custom` or absent for a tool the client runs; Anthropic's server tools "
        "(web search, code execution, ...) have a versioned type, and a local model cannot run "
        "them.",
    )
    name: str = Field(min_length=1, max_length=128, description="Tool name.")
    description: str = Field("", description="What the tool does, for the model.")
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON schema of the input."
    )
    defer_loading: bool = Field(
        False,
        description="Tool search: the tool stays out of the prompt until a `tool_reference` "
        "block in a tool result names it; only then can the model call it.",
    )


class ToolChoice(_ExtraIgnored):
    type: Literal["auto", "any", "tool", "none"] = Field(
        description="auto: the model decides; any: it must call some tool; tool: it must call "
        "the tool `name`; none: it must not call a tool."
    )
    name: str | None = Field(None, description="The tool to call, for type `tool`.")
    disable_parallel_tool_use: bool = Field(
        False, description="At most one tool call in the reply."
    )


class ThinkingConfig(_ExtraIgnored):
    type: Literal["enabled", "disabled", "adaptive"] = Field(
        description="enabled/adaptive: return `<think>` reasoning as thinking blocks; "
        "disabled: leave it out."
    )
    budget_tokens: int | None = Field(
        None, description="Accepted; the reasoning shares max_tokens with the answer."
    )


class OutputFormat(_ExtraIgnored):
    type: Literal["json_schema"] = Field(description="Only JSON-schema output is defined.")
    schema_: dict[str, Any] = Field(
        alias="schema", description="The JSON schema the reply's text must satisfy."
    )


class OutputConfig(_ExtraIgnored):
    format: OutputFormat | None = Field(
        None, description="Structured output: the reply is JSON valid against the schema."
    )
    effort: str | None = Field(
        None,
        description="How much effort to spend (low, medium, high, max): sets the reasoning "
        "effort of chat templates that have one (gpt-oss's `reasoning_effort`).",
    )


class _PromptFields(_ExtraIgnored):
    model: str = Field(min_length=1, description="Requested model name; echoed back.")
    messages: list[InputMessage] = Field(min_length=1, description="The conversation.")
    system: StrOrList[TextBlock] | None = Field(
        None, description="System prompt: a string or text blocks."
    )
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = Field(
        None, description="Output options; `format` asks for structured JSON output."
    )
    output_format: OutputFormat | None = Field(
        None, description="The structured-outputs beta's earlier spelling of output_config.format."
    )


class MessagesRequest(_PromptFields):
    max_tokens: int = Field(ge=1, description="Most tokens to generate (clamped to the context).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_PromptFields):
    pass


# ---- replies -------------------------------------------------------------------------------


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class OutTextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class OutToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class OutThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


OutBlock = OutTextBlock | OutToolUseBlock | OutThinkingBlock


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


class ModelInfo(BaseModel):
    """One model, in both SDKs' shapes at once: /v1/models serves Anthropic's and OpenAI's
    clients, and each reads its own fields and ignores the others'."""

    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str
    object: Literal["model"] = Field("model", description="OpenAI's type tag.")
    created: int = Field(description="OpenAI's: created_at as Unix time.")
    owned_by: str = Field("pensieve", description="OpenAI's: who serves the model.")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="OpenAI's type tag.")
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorEnvelope(BaseModel):
    """An error reply's body, and the stream's `error` event."""

    type: Literal["error"] = "error"
    error: ErrorDetail


# ---- stream events (in the order a stream sends them) ---------------------------------------


class MessageStart(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message = Field(description="The reply so far: no content, prompt usage.")


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutBlock = Field(description="The block, still empty.")


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str = Field(description="The next piece of the tool call's JSON input.")


class SignatureDelta(BaseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta | SignatureDelta


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


class StopInfo(BaseModel):
    stop_reason: str | None
    stop_sequence: str | None


class MessageDelta(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: StopInfo
    usage: Usage = Field(description="The whole request's usage.")


class MessageStop(BaseModel):
    type: Literal["message_stop"] = "message_stop"


BlockEvent = ContentBlockStart | ContentBlockDelta | ContentBlockStop
StreamEvent = MessageStart | BlockEvent | Ping | MessageDelta | MessageStop | ErrorEnvelope
