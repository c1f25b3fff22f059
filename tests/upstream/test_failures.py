"""Every upstream failure becomes one of Pensieve's errors, and so one Anthropic error."""

from __future__ import annotations

import pytest
import tornado.simple_httpclient

from pensieved.api.errors import classify
from pensieved.upstream import failures
from pensieved.upstream.transport import Failure

URL = "http://gpu:8000"


@pytest.mark.parametrize(
    ("status", "body", "http", "error_type", "fragment"),
    [
        (
            529,
            b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}',
            529,
            "overloaded_error",
            "busy",
        ),
        (429, b'{"error":{"message":"slow down"}}', 529, "overloaded_error", "slow down"),
        (503, b"unavailable", 529, "overloaded_error", "unavailable"),
        (
            500,
            b'{"error":{"message":"boom","type":"internal_server_error"}}',
            502,
            "api_error",
            "failed (500): boom",
        ),
        (502, b"<html>bad gateway</html>", 502, "api_error", "bad gateway"),
        (504, b"", 504, "timeout_error", "timed out"),
        (400, b'{"detail":"bad field"}', 400, "invalid_request_error", "bad field"),
        (401, b'{"error":{"message":"key sk-123 is wrong"}}', 502, "api_error", "api_key"),
    ],
)
def test_status_mapping(
    status: int, body: bytes, http: int, error_type: str, fragment: str
) -> None:
    error = failures.from_status("opus-*", URL, status, body, None)
    known = classify(error)
    assert known is not None
    assert known[:2] == (http, error_type)
    assert fragment in known[2] and URL in known[2] and "opus-*" in known[2]
    if status == 401:
        assert "sk-123" not in known[2]  # an upstream's auth complaint is not passed on


def test_retry_after_is_passed_on() -> None:
    error = failures.from_status("r", URL, 429, b"", "7")
    assert getattr(error, "retry_after_s", None) == 7


def test_transport_failures() -> None:
    refused = Failure(ConnectionRefusedError(111, "Connection refused"), False, False, True)
    timeout = tornado.simple_httpclient.HTTPTimeoutError("Timeout during request")
    slow = Failure(timeout, True, True, False)
    reset = Failure(ConnectionResetError(104, "reset"), True, False, False)
    cases = [
        (refused, 502, "could not be reached"),
        (slow, 504, "timeout_ms (1500 ms)"),
        (reset, 502, "closed the connection"),
    ]
    for failure, http, fragment in cases:
        known = classify(failures.from_failure("r", URL, failure, 1.5))
        assert known is not None and known[0] == http and fragment in known[2], known
