"""OpenAI Chat Completions wire shapes (pydantic), for both sides of the wire.

It sits beside the layers rather than in one: the API layer (`api/openai/`) serves this
dialect and `upstream/` speaks it to other servers, and neither imports the other.

The daemon parses requests with them and builds its replies from them; a client of an
OpenAI-protocol server (pensieved's upstreams) builds requests with them and parses replies
and chunks. Every model therefore keeps fields it does not declare (`extra="allow"`): real
servers add their own (`system_fingerprint`, `timings`, `reasoning_content`, ...), and the
server side reads a request's undeclared fields from `model_extra` to refuse them by name.
Serialise with `model_dump(exclude_none=True, by_alias=True)` to get the wire JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    """Undeclared fields are kept (see the module docstring); aliases or names both populate."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---- request: content parts ----------------------------------------------------------------


class TextPart(_Wire):
    type: Literal["text"] = "text"
    text: str = Field(description="The text.")


class ImageURL(_Wire):
    url: str = Field(description="An http(s) URL or a `data:` URL with base64 image data.")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="How closely the model should look at the image."
    )


class ImagePart(_Wire):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL = Field(description="The image.")


class InputAudio(_Wire):
    data: str = Field(description="Base64-encoded audio.")
    format: str = Field(description="wav or mp3.")


class AudioPart(_Wire):
    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio = Field(description="The audio clip.")


class FileRef(_Wire):
    file_id: str | None = Field(None, description="An uploaded file's id.")
    file_data: str | None = Field(None, description="Base64 file contents.")
    filename: str | None = Field(None, description="The file's name.")


class FilePart(_Wire):
    type: Literal["file"] = "file"
    file: FileRef = Field(description="The file.")


class RefusalPart(_Wire):
    type: Literal["refusal"] = "refusal"
    refusal: str = Field(description="A refusal the assistant gave earlier.")


UserContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")
]
AssistantContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# ---- request: messages ---------------------------------------------------------------------


class FunctionCall(_Wire):
    name: str = Field(description="The function the model called.")
    arguments: str = Field(description="The call's arguments: a JSON object, as a string.")


class ToolCall(_Wire):
    """A tool call in an assistant message (history in requests, the reply in responses)."""

    id: str = Field(description="The call's id; the `tool` message answering it repeats it.")
    type: Literal["function"] = Field("function", description="Always function.")
    function: FunctionCall = Field(description="Which function, with what arguments.")


class SystemMessage(_Wire):
    role: Literal["system"] = "system"
    content: str | list[TextPart] = Field(description="Instructions for the model.")
    name: str | None = Field(None, description="An optional participant name.")


class DeveloperMessage(_Wire):
    role: Literal["developer"] = "developer"
    content: str | list[TextPart] = Field(
        description="Instructions for the model (the newer name for a system message)."
    )
    name: str | None = Field(None, description="An optional participant name.")


class UserMessage(_Wire):
    role: Literal["user"] = "user"
    content: str | list[UserContentPart] = Field(description="A string or a list of parts.")
    name: str | None = Field(None, description="An optional participant name.")


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | list[AssistantContentPart] | None = Field(
        None, description="The reply's text; null when the turn only called tools."
    )
    tool_calls: list[ToolCall] | None = Field(None, description="Tools the assistant called.")
    refusal: str | None = Field(None, description="A refusal the assistant gave.")
    name: str | None = Field(None, description="An optional participant name.")
    reasoning_content: str | None = Field(
        None, description="Reasoning text, as llama-server, vLLM and DeepSeek return it."
    )


class ToolMessage(_Wire):
    role: Literal["tool"] = "tool"
    content: str | list[TextPart] = Field(description="The tool's result.")
    tool_call_id: str = Field(description="The id of the tool call this answers.")


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# ---- request: tools, formats, options ------------------------------------------------------


class FunctionDefinition(_Wire):
    name: str = Field(min_length=1, max_length=128, description="The function's name.")
    description: str | None = Field(None, description="What it does, for the model.")
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments object; absent: no arguments."
    )
    strict: bool | None = Field(
        None, description="Arguments must match the schema exactly (pensieved always enforces it)."
    )


class Tool(_Wire):
    type: Literal["function"] = Field("function", description="Only function tools exist here.")
    function: FunctionDefinition = Field(description="The function the model may call.")


class NamedFunction(_Wire):
    name: str = Field(description="The function the model must call.")


class NamedToolChoice(_Wire):
    type: Literal["function"] = Field("function", description="Always function.")
    function: NamedFunction = Field(description="The function to call.")


ToolChoiceOption = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormatText(_Wire):
    type: Literal["text"] = Field("text", description="Free text (the default).")


class ResponseFormatJSONObject(_Wire):
    type: Literal["json_object"] = Field(
        "json_object", description="Any JSON object (the older JSON mode)."
    )


class JSONSchemaSpec(_Wire):
    name: str = Field(description="A name for the schema.")
    description: str | None = Field(None, description="What the output is for.")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="The JSON schema the reply must satisfy."
    )
    strict: bool | None = Field(None, description="Follow the schema exactly (always, here).")


class ResponseFormatJSONSchema(_Wire):
    type: Literal["json_schema"] = Field("json_schema", description="Structured output.")
    json_schema: JSONSchemaSpec = Field(description="The schema and its name.")


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class StreamOptions(_Wire):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with no choices and the whole request's usage."
    )


class ChatCompletionRequest(_Wire):
    """POST /v1/chat/completions. Fields not declared here land in `model_extra`."""

    model: str = Field(min_length=1, description="Requested model name; echoed back.")
    messages: list[Message] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (clamped to the context)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="The older name of max_completion_tokens."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
    n: int | None = Field(None, ge=1, description="How many choices to generate (only 1 here).")
    stream: bool | None = Field(None, description="Send `chat.completion.chunk` events (SSE).")
    stream_options: StreamOptions | None = Field(None, description="Options for streaming.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: ToolChoiceOption | None = Field(
        None, description="none, auto, required, or a named function the model must call."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Several tool calls in one reply (default true)."
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema (structured output)."
    )
    logprobs: bool | None = Field(None, description="Return log probabilities (not supported).")
    top_logprobs: int | None = Field(None, description="Alternatives per token (not supported).")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty is supported.")
    user: str | None = Field(None, description="An end-user id; accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    reasoning_effort: str | None = Field(
        None, description="Any value but `none`/`minimal` returns reasoning as reasoning_content."
    )


# ---- response ------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class PromptTokensDetails(_Wire):
    cached_tokens: int | None = Field(None, description="Prompt tokens reused from the cache.")
    audio_tokens: int | None = Field(None, description="Audio prompt tokens.")


class CompletionTokensDetails(_Wire):
    reasoning_tokens: int | None = Field(None, description="Tokens spent on reasoning.")
    audio_tokens: int | None = Field(None, description="Audio output tokens.")
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None


class CompletionUsage(_Wire):
    prompt_tokens: int = Field(description="Tokens in the prompt, cached ones included.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="How the prompt's tokens split."
    )
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="How the generated tokens split."
    )


class ResponseMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(None, description="The reply's text; null with only tool calls.")
    refusal: str | None = Field(None, description="A refusal message (never produced here).")
    tool_calls: list[ToolCall] | None = Field(None, description="Tool calls, when any.")
    reasoning_content: str | None = Field(
        None, description="Reasoning text, when the request asked for it (reasoning_effort)."
    )


class Choice(_Wire):
    index: int = Field(0, description="The choice's position (always 0 here: n=1).")
    message: ResponseMessage = Field(description="The assistant's reply.")
    finish_reason: FinishReason | None = Field(description="Why generation stopped.")
    logprobs: dict[str, Any] | None = Field(None, description="Always null here.")


class ChatCompletion(_Wire):
    id: str = Field(description="The completion's id (chatcmpl-...).")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time the completion was created.")
    model: str = Field(description="The model name the request gave.")
    choices: list[Choice] = Field(description="The replies (one).")
    usage: CompletionUsage | None = Field(None, description="Token counts.")
    system_fingerprint: str | None = Field(None, description="The backend configuration.")
    service_tier: str | None = Field(None, description="The tier that served the request.")


# ---- stream chunks -------------------------------------------------------------------------


class ChoiceDeltaFunctionCall(_Wire):
    name: str | None = Field(None, description="The function's name, in the call's first delta.")
    arguments: str | None = Field(
        None, description="The next fragment of the arguments JSON; fragments concatenate."
    )


class ChoiceDeltaToolCall(_Wire):
    index: int = Field(description="Which tool call of the reply this fragment belongs to.")
    id: str | None = Field(None, description="The call's id, in its first delta.")
    type: Literal["function"] | None = Field(None, description="function, in the first delta.")
    function: ChoiceDeltaFunctionCall | None = Field(None, description="Name and/or arguments.")


class ChoiceDelta(_Wire):
    role: Literal["assistant"] | None = Field(None, description="assistant, in the first chunk.")
    content: str | None = Field(None, description="The next piece of the reply's text.")
    refusal: str | None = Field(None, description="The next piece of a refusal.")
    tool_calls: list[ChoiceDeltaToolCall] | None = Field(None, description="Tool-call pieces.")
    reasoning_content: str | None = Field(None, description="The next piece of reasoning.")


class ChunkChoice(_Wire):
    index: int = Field(0, description="The choice this delta extends.")
    delta: ChoiceDelta = Field(description="What is new.")
    finish_reason: FinishReason | None = Field(None, description="Set in the choice's last chunk.")
    logprobs: dict[str, Any] | None = Field(None, description="Always null here.")


class ChatCompletionChunk(_Wire):
    id: str = Field(description="The completion's id; the same in every chunk.")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(description="Unix time the completion was created.")
    model: str = Field(description="The model name the request gave.")
    choices: list[ChunkChoice] = Field(
        description="The deltas; empty in the usage chunk (stream_options.include_usage)."
    )
    usage: CompletionUsage | None = Field(
        None, description="Only in the last chunk, and only with include_usage."
    )
    system_fingerprint: str | None = Field(None, description="The backend configuration.")
    service_tier: str | None = Field(None, description="The tier that served the request.")


# ---- errors and models ---------------------------------------------------------------------


class ErrorDetail(_Wire):
    message: str = Field(description="What went wrong and what to do.")
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error, ...")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: str | None = Field(
        None, description="A machine-readable code, e.g. context_length_exceeded."
    )


class ErrorEnvelope(_Wire):
    """An error reply's body, and a stream's in-band error chunk."""

    error: ErrorDetail = Field(description="The error.")


class Model(_Wire):
    id: str = Field(description="The model's name, as requests give it.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model was created.")
    owned_by: str = Field(description="Who serves it.")


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[Model] = Field(description="The models.")
