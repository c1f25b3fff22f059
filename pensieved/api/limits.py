"""Limits on what a request may be: header and body size, JSON shape, message and block counts.

Any local process can send the daemon anything, so every limit here is checked *before* the
expensive step it protects (decoding JSON, validating it, rendering and tokenizing a prompt),
and every refusal says which limit was hit and by how much.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from pensieved.errors import InvalidRequestError, RequestTooLargeError

# Headers beyond this get a 413 that says so; beyond HARD_MAX_HEADER_BYTES Tornado drops the
# connection before any handler runs, so the gap between the two is where a clear error is
# still possible.
MAX_HEADER_BYTES = 32 * 1024
HARD_MAX_HEADER_BYTES = 64 * 1024
# The HTTP server's read buffer: headers plus one streamed body chunk (Tornado reads 64 KiB).
STREAM_BUFFER_BYTES = 1024 * 1024
# A body declared up to this much beyond the limit is read and discarded so the client (which
# is usually still sending) can read the 413; anything larger is refused and disconnected at
# once.
BODY_DRAIN_ALLOWANCE = 64 * 1024 * 1024

# Deeper than any real request (Claude Code's tool schemas nest about 10 levels) and far below
# the recursion limit of the JSON decoder and of pydantic.
MAX_JSON_DEPTH = 64
# Arrays plus objects in one body: bounds the Python objects a 32 MiB body can turn into.
MAX_JSON_CONTAINERS = 200_000
# Quote characters in one body (escaped ones included): bounds the cost of the shape scan,
# which pays per string. A 200k-token conversation has a few tens of thousands.
MAX_JSON_QUOTES = 1_000_000
MAX_MESSAGES = 10_000
MAX_BLOCKS_PER_MESSAGE = 1_000
MAX_TOTAL_BLOCKS = 50_000
MAX_TOOLS = 1_000
MAX_STOP_SEQUENCES = 256

# A JSON string, or an unterminated one up to the end: it must match from every quote it
# starts at, or a body full of unterminated strings would make the scan quadratic.
_STRING_RE = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
# Keep only brackets, both kinds folded to one pair, to measure nesting without decoding.
_BRACKETS = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def check_headers(header_lines: Iterable[tuple[str, str]], start_line_bytes: int) -> None:
    size = start_line_bytes + sum(len(k) + len(v) + 4 for k, v in header_lines)
    if size > MAX_HEADER_BYTES:
        raise RequestTooLargeError(
            f"request headers are {size} bytes; at most {MAX_HEADER_BYTES} bytes are accepted"
        )


def check_declared_body(content_length: str | None, max_body_bytes: int) -> bool:
    """Checks a Content-Length; returns False when the body must be drained then refused."""
    if content_length is None:
        return True
    try:
        declared = int(content_length)
    except ValueError:
        return True  # Tornado itself answers a malformed Content-Length with 400
    if declared <= max_body_bytes:
        return True
    if declared > max_body_bytes + BODY_DRAIN_ALLOWANCE:
        raise body_too_large(declared, max_body_bytes)
    return False


def body_too_large(size: int, max_body_bytes: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"request body is {size} bytes; at most {max_body_bytes} bytes are accepted "
        "(server.max_body_bytes)"
    )


def json_brackets(body: bytes) -> bytes:
    """The body's arrays and objects as `(` and `)`, strings removed: its shape, undecoded."""
    return _STRING_RE.sub(b"", body).translate(_BRACKETS, _NOT_BRACKETS)


def json_depth_exceeds(brackets: bytes, limit: int) -> bool:
    """Whether `json_brackets` output nests deeper than `limit`.

    Each pass deletes the innermost bracket pairs, so a well-formed document of depth d is
    gone after d passes; a pair still present after `limit` passes is nesting beyond it. An
    unclosed run of brackets is never removed, so it is counted directly.
    """
    for _ in range(limit):
        reduced = brackets.replace(b"()", b"")
        if reduced == brackets:
            break
        brackets = reduced
    else:
        if b"()" in brackets:
            return True
    return brackets.count(b"(") > limit


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON value")


def decode_json(body: bytes) -> Any:
    """Decode a request body with every limit that must hold before decoding is safe."""
    quotes = body.count(b'"')
    if quotes > MAX_JSON_QUOTES:
        raise RequestTooLargeError(
            f"request body has {quotes} quote characters (about {quotes // 2} strings); at most "
            f"{MAX_JSON_QUOTES} are accepted"
        )
    brackets = json_brackets(body)
    containers = brackets.count(b"(")
    if containers > MAX_JSON_CONTAINERS:
        raise RequestTooLargeError(
            f"request body has about {containers} JSON arrays and objects; at most "
            f"{MAX_JSON_CONTAINERS} are accepted"
        )
    if json_depth_exceeds(brackets, MAX_JSON_DEPTH):
        raise InvalidRequestError(
            f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )
    try:
        data = json.loads(body or b"", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError (bytes that are not UTF-8) and
        # integers beyond Python's digit limit.
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    _check_strings(data)
    return data


def _check_strings(data: Any) -> None:
    """Refuse unpaired surrogates (`"\\ud800"`): they are valid JSON but not Unicode text."""
    stack: list[Any] = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise _surrogate_error(data)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    raise _surrogate_error(data)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_error(data: Any) -> InvalidRequestError:
    # Only on failure: find where, so the message names the field.
    stack: list[tuple[Any, str]] = [(data, "body")]
    where, char = "body", 0xD800
    while stack:
        value, path = stack.pop()
        bad = [value] if isinstance(value, str) else []
        if isinstance(value, dict):
            bad = [k for k in value if not _is_text(k)]
            stack.extend((item, f"{path}.{key}") for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(value))
        for text in bad:
            if not _is_text(text):
                where = path.removeprefix("body.")
                char = next(ord(c) for c in text if 0xD800 <= ord(c) <= 0xDFFF)
                stack.clear()
                break
    return InvalidRequestError(
        f"{where}: contains an unpaired UTF-16 surrogate (\\u{char:04x}), which is not valid "
        "Unicode text"
    )


def check_request_shape(data: dict[str, Any]) -> None:
    """Count messages, blocks, tools and stop sequences before validating them."""
    messages = data.get("messages")
    if isinstance(messages, list):
        _at_most("messages", len(messages), MAX_MESSAGES, "messages")
        total = 0
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                where = f"messages.{index}.content"
                _at_most(where, len(content), MAX_BLOCKS_PER_MESSAGE, "content blocks")
                total += len(content)
        _at_most("messages", total, MAX_TOTAL_BLOCKS, "content blocks in all")
    for key, limit, what in (
        ("system", MAX_BLOCKS_PER_MESSAGE, "blocks"),
        ("tools", MAX_TOOLS, "tools"),
        ("stop_sequences", MAX_STOP_SEQUENCES, "stop sequences"),
        ("stop", MAX_STOP_SEQUENCES, "stop sequences"),  # OpenAI's name
    ):
        value = data.get(key)
        if isinstance(value, list):
            _at_most(key, len(value), limit, what)


def _at_most(where: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidRequestError(f"{where}: {count} {what}; at most {limit} are accepted")
