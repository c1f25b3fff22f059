"""The one place where an upstream's failures become Pensieve's exceptions.

`api/errors.py` then maps those to HTTP statuses like every other error. Messages name the
route (its pattern) and the URL; they never carry the upstream's key, and an upstream's own
error text is passed on only for its 4xx (the client's request was at fault).
"""

from __future__ import annotations

import json
from typing import Any

from pensieved.errors import (
    PensieveError,
    UpstreamError,
    UpstreamOverloadedError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
)
from pensieved.upstream.transport import Failure

# Statuses that say "too busy, retry later": the client hears 529 overloaded_error.
OVERLOAD_STATUSES = frozenset({429, 503, 529})
# Failures after which a URL is skipped for the route's back-off period.
_BACKOFF_STATUSES = frozenset({500, 502, 504})
_MESSAGE_LIMIT = 500


def error_text(body: bytes) -> str:
    """The message in an Anthropic or OpenAI error body, else the start of the body."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body[:_MESSAGE_LIMIT].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_MESSAGE_LIMIT]
        if isinstance(error, str):
            return error[:_MESSAGE_LIMIT]
        if isinstance(data.get("detail"), str):  # FastAPI servers
            return str(data["detail"])[:_MESSAGE_LIMIT]
    return json.dumps(data)[:_MESSAGE_LIMIT]


def backs_off(status: int) -> bool:
    return status in _BACKOFF_STATUSES


def from_status(
    route: str, url: str, status: int, body: bytes, retry_after: str | None
) -> PensieveError:
    """The error for an upstream's non-2xx reply."""
    where = f"upstream {url} (route {route!r})"
    text = error_text(body)
    if status in OVERLOAD_STATUSES:
        seconds = int(retry_after) if retry_after and retry_after.isdigit() else 1
        return UpstreamOverloadedError(
            f"{where} is overloaded ({status}): {text}; retry shortly", retry_after_s=seconds
        )
    if status in (401, 403):
        return UpstreamError(
            f"{where} refused pensieved's credentials ({status}): check the route's api_key "
            "or api_key_file in model.upstreams"
        )
    if 400 <= status < 500:
        return UpstreamRejectedError(f"{where} refused the request ({status}): {text}", status)
    if status == 504:
        return UpstreamTimeoutError(f"{where} timed out ({status}): {text}")
    return UpstreamError(f"{where} failed ({status}): {text}")


def from_failure(route: str, url: str, failure: Failure, timeout_s: float) -> PensieveError:
    """The error for a request that got no complete reply (refused, reset, timed out)."""
    where = f"upstream {url} (route {route!r})"
    if failure.timed_out and not failure.during_connect:
        return UpstreamTimeoutError(
            f"{where} did not finish within the route's timeout_ms ({timeout_s * 1000:.0f} ms)"
        )
    if failure.timed_out:
        return UpstreamError(f"{where} could not be reached: connecting timed out")
    reason = failure.error
    detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    if not failure.connected:
        return UpstreamError(f"{where} could not be reached: {detail}")
    return UpstreamError(f"{where} closed the connection before the reply ended: {detail}")


def unreachable(route: str, tried: list[str], last: PensieveError) -> PensieveError:
    """Every URL of the route failed to connect: say so, with the last reason."""
    if len(tried) <= 1:
        return last
    return UpstreamError(
        f"no upstream of route {route!r} could be reached ({', '.join(tried)}): {last}"
    )
