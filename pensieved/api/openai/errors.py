"""The one place where failures become OpenAI's statuses and error envelopes.

The Anthropic side's map (`api/errors.py`) classifies a failure first; this table restates
its status and type in OpenAI's terms. Two statuses differ on purpose: a full server is 429
(OpenAI clients back off and retry on 429; 529 means nothing to them) and an unavailable model
stays 503. Codes follow OpenAI's where one exists (`context_length_exceeded`,
`unsupported_parameter`, `invalid_api_key`).
"""

from __future__ import annotations

from pensieved import errors as e
from pensieved.wire.openai import ErrorDetail, ErrorEnvelope

# Anthropic-side status → (OpenAI status, type, code).
_BY_STATUS: dict[int, tuple[int, str, str | None]] = {
    400: (400, "invalid_request_error", None),
    401: (401, "invalid_request_error", "invalid_api_key"),
    403: (403, "permission_error", None),
    404: (404, "invalid_request_error", "not_found"),
    405: (405, "invalid_request_error", "method_not_allowed"),
    413: (413, "invalid_request_error", "request_too_large"),
    429: (429, "rate_limit_error", "rate_limit_exceeded"),
    500: (500, "server_error", None),
    503: (503, "server_error", "model_not_available"),
    504: (504, "server_error", "timeout"),
    529: (429, "rate_limit_error", "server_busy"),
}


def openai_error(
    status: int, message: str, exc: BaseException | None = None
) -> tuple[int, ErrorEnvelope]:
    """OpenAI's status and envelope for a failure the Anthropic map gave `status`."""
    new_status, error_type, code = _BY_STATUS.get(
        status, (status, "server_error" if status >= 500 else "invalid_request_error", None)
    )
    param = None
    if isinstance(exc, e.PromptTooLongError):
        code, param = "context_length_exceeded", "messages"
    elif isinstance(exc, e.UnsupportedParameterError):
        code = exc.code
    elif isinstance(exc, e.UnsupportedContentError):
        code = "unsupported_content"
    if isinstance(exc, e.InvalidRequestError) and exc.param is not None:
        param = exc.param
    detail = ErrorDetail(message=message, type=error_type, param=param, code=code)
    return new_status, ErrorEnvelope(error=detail)
