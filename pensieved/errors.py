"""Pensieve's exception types: one per kind of failure, free of any transport.

The HTTP layer maps them to Anthropic error envelopes in exactly one place (`api/errors.py`);
the daemon maps the fatal ones to exit codes. Messages are written for the user: they say what
happened and what to do. Tracebacks go to the log, never into these messages.
"""

from __future__ import annotations


class PensieveError(Exception):
    """Base of every error that carries a user-facing message."""


class InvalidRequestError(PensieveError):
    """The client's request is malformed or asks for something impossible (400)."""

    # The request field at fault, when one is known (OpenAI's envelope reports it).
    param: str | None = None


class PromptTooLongError(InvalidRequestError):
    def __init__(self, prompt_tokens: int, context_size: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size
        super().__init__(f"prompt is too long: {prompt_tokens} tokens > {context_size} maximum")


class UnsupportedContentError(InvalidRequestError):
    """A content type the loaded model cannot take (e.g. images without vision)."""


class UnsupportedParameterError(InvalidRequestError):
    """A request field Pensieve does not implement, or a value of it that it cannot honour
    (OpenAI's `n > 1`, `logprobs`); refused rather than silently ignored."""

    def __init__(self, param: str, message: str, *, value_only: bool = False) -> None:
        self.param = param
        # OpenAI's codes: the field itself is unknown, or only this value of it is.
        self.code = "unsupported_value" if value_only else "unsupported_parameter"
        super().__init__(f"{param}: {message}")


class NotFoundError(PensieveError):
    """An unknown path or model id (404)."""


class ModelUnavailableError(PensieveError):
    """No model is loaded (none configured, failed to load, or still loading): 503."""


class NoChatTemplateError(ModelUnavailableError):
    """The model has no chat template that renders (none in its GGUF and none configured, or
    one that fails on a plain conversation): 503 until the config names one that renders."""


class ModelLoadError(PensieveError):
    """A model file that cannot be loaded; the message names the file and the cause."""


class LoadCancelledError(ModelLoadError):
    """A model load abandoned part-way because the daemon is stopping."""


class ChatTemplateError(PensieveError):
    """The model has no usable chat template, or the template rejected the conversation."""


class GrammarError(PensieveError):
    """llama.cpp refused a constraining grammar Pensieve built (a bug in Pensieve, not the
    client's fault; schemas it cannot express are loosened before this can happen)."""


class EngineError(PensieveError):
    """llama.cpp failed while evaluating a batch (out of memory, a backend error); the
    traceback is in the log, and the slots involved start cold on their next request."""


class OverloadedError(PensieveError):
    """Too many requests are running or queued (529)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class KvCacheFullError(OverloadedError):
    """Running requests alone fill the model's KV cache; the newest one is ended (529, so a
    client retries once another has finished)."""

    def __init__(self, cells: int, running: int) -> None:
        super().__init__(
            f"the model's KV cache is full: {running} running requests hold all of its "
            f"{cells} token cells, so this one was ended; retry when another has finished, or "
            "give the cache more room (model.memory_budget_mb, model.kv_cache_type q8_0, or a "
            "smaller model.context_size)",
            retry_after_s=5,
        )


class RequestTimeoutError(PensieveError):
    """The request waited plus ran longer than `server.request_timeout_ms`."""


class ShuttingDownError(PensieveError):
    """The daemon is draining for a stop and takes no new work."""


class AuthenticationError(PensieveError):
    """Missing or wrong API key (401)."""


class PermissionDeniedError(PensieveError):
    """A request the server refuses on principle, e.g. a foreign Host header (403)."""


class RequestTooLargeError(PensieveError):
    """Body or structure beyond the configured limits (413)."""


class LlamaBuildError(ModelLoadError):
    """The installed llama.cpp dies on this CPU: it was built for instructions the machine
    traps (AMX on Intel Xeons). Only a rebuild helps; no model can be loaded meanwhile."""


class UpstreamError(PensieveError):
    """An upstream server (a `model.upstreams` route) failed, answered with an error, or could
    not be reached (502); the message names the route and the URL, never its key."""


class UpstreamRejectedError(InvalidRequestError):
    """The upstream refused the request as invalid (its 4xx); the message passes its reason on."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class UpstreamTimeoutError(RequestTimeoutError):
    """The upstream took longer than its route's `timeout_ms` (504)."""


class UpstreamOverloadedError(OverloadedError):
    """The upstream said it is overloaded or rate-limited (429, 503, 529), or the route
    already has `max_concurrent_requests` requests in flight (529)."""
