"""Failures → OpenAI's statuses and envelopes: the map's table, and the codes clients test."""

from __future__ import annotations

import pytest

from pensieved import errors as e
from pensieved.api.errors import classify
from pensieved.api.openai.errors import openai_error


@pytest.mark.parametrize(
    ("exc", "status", "error_type", "code"),
    [
        (e.InvalidRequestError("bad"), 400, "invalid_request_error", None),
        (e.PromptTooLongError(3000, 2047), 400, "invalid_request_error", "context_length_exceeded"),
        (
            e.UnsupportedParameterError("n", "one"),
            400,
            "invalid_request_error",
            "unsupported_parameter",
        ),
        (e.UnsupportedContentError("img"), 400, "invalid_request_error", "unsupported_content"),
        (e.AuthenticationError("key"), 401, "invalid_request_error", "invalid_api_key"),
        (e.PermissionDeniedError("host"), 403, "permission_error", None),
        (e.NotFoundError("x"), 404, "invalid_request_error", "not_found"),
        (e.RequestTooLargeError("big"), 413, "invalid_request_error", "request_too_large"),
        # OpenAI clients back off on 429; Anthropic's 529 means nothing to them.
        (e.OverloadedError("busy"), 429, "rate_limit_error", "server_busy"),
        (e.ModelUnavailableError("loading"), 503, "server_error", "model_not_available"),
        (e.RequestTimeoutError("slow"), 504, "server_error", "timeout"),
        (e.EngineError("oom"), 500, "server_error", None),
    ],
)
def test_each_failure_maps_to_openais_status_type_and_code(
    exc: e.PensieveError, status: int, error_type: str, code: str | None
) -> None:
    known = classify(exc)
    assert known is not None
    got_status, envelope = openai_error(known[0], known[2], exc)
    assert got_status == status
    assert envelope.error.type == error_type
    assert envelope.error.code == code
    assert envelope.error.message == str(exc)


def test_context_overflow_names_messages_and_refusals_name_their_field() -> None:
    _, overflow = openai_error(400, "long", e.PromptTooLongError(3000, 2047))
    assert overflow.error.param == "messages"
    _, refused = openai_error(400, "n", e.UnsupportedParameterError("n", "x", value_only=True))
    assert (refused.error.param, refused.error.code) == ("n", "unsupported_value")


def test_the_envelope_always_has_all_four_keys() -> None:
    _, envelope = openai_error(500, "internal")
    assert set(envelope.model_dump()["error"]) == {"message", "type", "param", "code"}
