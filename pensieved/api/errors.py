"""The one place where failures become HTTP statuses and Anthropic error envelopes."""

from __future__ import annotations

from pensieved import errors as e
from pensieved.wire.anthropic import ErrorDetail, ErrorEnvelope

# Most specific first: the first matching class wins.
_MAP: tuple[tuple[type[Exception], int, str], ...] = (
    (e.InvalidRequestError, 400, "invalid_request_error"),
    (e.AuthenticationError, 401, "authentication_error"),
    (e.PermissionDeniedError, 403, "permission_error"),
    (e.NotFoundError, 404, "not_found_error"),
    (e.RequestTooLargeError, 413, "request_too_large"),
    (e.ModelUnavailableError, 503, "api_error"),
    (e.ShuttingDownError, 503, "api_error"),
    (e.RequestTimeoutError, 504, "timeout_error"),
    (e.OverloadedError, 529, "overloaded_error"),
    (e.ChatTemplateError, 500, "api_error"),
    (e.EngineError, 500, "api_error"),
    (e.ModelLoadError, 503, "api_error"),
    (e.UpstreamError, 502, "api_error"),
)

# Statuses Tornado raises by itself (HTTPError) mapped to Anthropic's types.
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def classify(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, error type, user-facing message) for a known failure, else None."""
    for kind, status, error_type in _MAP:
        if isinstance(exc, kind):
            return status, error_type, str(exc)
    return None


def envelope(error_type: str, message: str) -> ErrorEnvelope:
    return ErrorEnvelope(error=ErrorDetail(type=error_type, message=message))


def internal_message(request_id: str) -> str:
    return f"internal server error; the details are in the pensieved log (request-id {request_id})"
