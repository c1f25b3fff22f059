"""A stand-in for the Messages API that records every request it is sent.

It answers as Anthropic's API does (SSE with message_start ... message_stop, JSON when not
streaming, count_tokens, /v1/models), so that Claude Code carries on with its session; what
it answers is scripted: plain text, or once a given tool call, then text describing the
tool_result it got back. Each request becomes a record with the keys of the 2.1.332 files in
../shared/fixtures/claude-code/: n, time, client, method, path, http_version, headers (a list
of [name, value] as sent, minus the API key and connection headers), body_bytes, body,
response.

The standard library's server, not Tornado's: it keeps header names as the client spelled
them (`X-Stainless-OS`, `x-app`) and in the order it sent them, which the files record.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Never written to a capture: the key, and what belongs to the connection rather than to
# Claude Code's request.
DROPPED_HEADERS = frozenset(
    {"x-api-key", "authorization", "host", "connection", "content-length", "transfer-encoding"}
)
TEXT = "Hello from capture"
# Replies are streamed in this many deltas, as the recorded streams were.
DELTAS = 3
MODELS = ("claude-sonnet-4-5", "claude-opus-4-5", "claude-haiku-4-5")

Json = dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """The tool call a scenario answers with, once, to the first request offering the tool."""

    name: str
    input: Json


@dataclass
class Script:
    """What the server answers during one scenario."""

    name: str
    tool_call: ToolCall | None = None
    issued: bool = False


@dataclass(frozen=True)
class Reply:
    """One answer: text, or a tool call (then `tool_use_id` is set)."""

    text: str = ""
    tool: ToolCall | None = None
    tool_use_id: str = ""

    def content(self) -> Json:
        if self.tool is not None:
            return {
                "type": "tool_use",
                "id": self.tool_use_id,
                "name": self.tool.name,
                "input": self.tool.input,
            }
        return {"type": "text", "text": self.text}

    def record(self) -> Json:
        if self.tool is not None:
            return {
                "tool_use": {
                    "id": self.tool_use_id,
                    "name": self.tool.name,
                    "input": self.tool.input,
                }
            }
        return {"text": self.text}


@dataclass
class Recorder:
    """The records of the running scenario, numbered from 1 in arrival order."""

    script: Script = field(default_factory=lambda: Script("idle"))
    records: list[Json] = field(default_factory=list)
    arrived: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)

    def start(self, script: Script) -> None:
        with self.lock:
            self.script = script
            self.records = []
            self.arrived = 0

    def number(self) -> int:
        """The next request's number (call under the lock)."""
        self.arrived += 1
        return self.arrived

    def add(self, record: Json) -> None:
        with self.lock:
            self.records.append(record)
            self.lock.notify_all()

    def wait_for(self, done: Callable[[list[Json]], bool], timeout: float) -> bool:
        """Wait until `done(records)` holds (records are added once answered)."""
        with self.lock:
            return self.lock.wait_for(lambda: done(self.records), timeout)

    def taken(self) -> list[Json]:
        with self.lock:
            return sorted(self.records, key=lambda r: int(r["n"]))


def capture_id(prefix: str, scenario: str, n: int) -> str:
    """An id that is the same in every run of a scenario, like `toolu_capture_<16 hex>`."""
    return f"{prefix}_capture_{hashlib.sha256(f'{scenario}/{n}'.encode()).hexdigest()[:16]}"


def _tool_result_size(body: Json) -> tuple[int, Any] | None:
    """The size and is_error of the last message's tool_result, if it carries one."""
    messages = body.get("messages") or []
    if not messages or not isinstance(messages[-1].get("content"), list):
        return None
    for block in messages[-1]["content"]:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content", "")
            size = len(content) if isinstance(content, str) else len(json.dumps(content))
            return size, block.get("is_error")
    return None


def _schema_instance(schema: Json) -> Any:
    """A small value that fits a structured-output schema (the session title request)."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _schema_instance(props.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    return "Capture"


def choose_reply(script: Script, body: Json, n: int) -> Reply:
    """The scripted answer to a Messages request (called under the recorder's lock)."""
    result = _tool_result_size(body)
    if result is not None:
        size, is_error = result
        return Reply(text=f"{TEXT}. I got a tool_result of {size} chars (is_error={is_error}).")
    offered = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    call = script.tool_call
    if call is not None and not script.issued and call.name in offered:
        script.issued = True
        return Reply(tool=call, tool_use_id=capture_id("toolu", script.name, n))
    fmt = (body.get("output_config") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        return Reply(text=json.dumps(_schema_instance(fmt.get("schema") or {})))
    return Reply(text=TEXT)


def _pieces(text: str) -> list[str]:
    step = -(-len(text) // DELTAS) or 1
    return [text[i : i + step] for i in range(0, len(text), step)] or [""]


def estimate_tokens(body: Json) -> int:
    """A rough count (4 characters a token): the CLI only displays it."""
    return max(1, len(json.dumps(body)) // 4)


def sse_events(reply: Reply, model: str, input_tokens: int, message_id: str) -> Iterator[Json]:
    """The Messages API's stream for one reply."""
    yield {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        },
    }
    start = reply.content()
    if reply.tool is not None:
        start = {**start, "input": {}}
        delta_type, key, text = "input_json_delta", "partial_json", json.dumps(reply.tool.input)
    else:
        start = {**start, "text": ""}
        delta_type, key, text = "text_delta", "text", reply.text
    yield {"type": "content_block_start", "index": 0, "content_block": start}
    yield {"type": "ping"}
    for piece in _pieces(text):
        yield {"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, key: piece}}
    yield {"type": "content_block_stop", "index": 0}
    stop = "tool_use" if reply.tool is not None else "end_turn"
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": max(1, len(text) // 4)},
    }
    yield {"type": "message_stop"}


def message(reply: Reply, model: str, input_tokens: int, message_id: str) -> Json:
    """The Messages API's JSON body for one reply."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [reply.content()],
        "stop_reason": "tool_use" if reply.tool is not None else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


class _Handler(BaseHTTPRequestHandler):
    server: CaptureServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the records are the log

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _base_record(self, raw: bytes) -> Json:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self.server.recorder.lock:
            n = self.server.recorder.number()
        return {
            "n": n,
            "time": time.time(),
            "client": self.client_address[0],
            "method": self.command,
            "path": self.path,
            "http_version": self.request_version,
            "headers": [
                [name, value]
                for name, value in self.headers.items()
                if name.lower() not in DROPPED_HEADERS
            ],
            "body_bytes": len(raw),
            "body": body,
        }

    def _send_json(self, status: int, payload: Json) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, record: Json, status: int, kind: str, text: str) -> None:
        record["response"] = {"status": status, "sse": False, "error": text, "events": []}
        self.server.recorder.add(record)
        self._send_json(status, {"type": "error", "error": {"type": kind, "message": text}})

    def do_GET(self) -> None:
        record = self._base_record(b"")
        route = self.path.split("?")[0].rstrip("/")
        if route == "/v1/models":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in MODELS
            ]
            record["response"] = {"status": 200, "sse": False, "models": list(MODELS), "events": []}
            self.server.recorder.add(record)
            self._send_json(
                200, {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
            )
            return
        self._error(record, 404, "not_found_error", f"no route for GET {route}")

    def do_HEAD(self) -> None:
        record = self._base_record(b"")
        record["response"] = {"status": 200, "sse": False, "events": []}
        self.server.recorder.add(record)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        record = self._base_record(self._read_body())
        route = self.path.split("?")[0].rstrip("/")
        body = record["body"]
        if not isinstance(body, dict):
            self._error(record, 400, "invalid_request_error", "the body is not a JSON object")
            return
        tokens = estimate_tokens(body)
        if route == "/v1/messages/count_tokens":
            record["response"] = {"status": 200, "sse": False, "input_tokens": tokens, "events": []}
            self.server.recorder.add(record)
            self._send_json(200, {"input_tokens": tokens})
            return
        if route != "/v1/messages":
            self._error(record, 404, "not_found_error", f"no route for POST {route}")
            return
        recorder = self.server.recorder
        with recorder.lock:
            # Under the lock: the tool call goes to exactly one request.
            reply = choose_reply(recorder.script, body, record["n"])
        model = str(body.get("model", MODELS[0]))
        message_id = capture_id("msg", recorder.script.name, record["n"])
        if not body.get("stream"):
            record["response"] = {"status": 200, "sse": False, **reply.record(), "events": []}
            recorder.add(record)
            self._send_json(200, message(reply, model, tokens, message_id))
            return
        events = list(sse_events(reply, model, tokens, message_id))
        record["response"] = {
            "status": 200,
            "sse": True,
            **reply.record(),
            "events": [e["type"] for e in events],
        }
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True
        # Recorded once the reply is out: a waiter that sees the record can expect the reply.
        recorder.add(record)


class CaptureServer(ThreadingHTTPServer):
    """The capture server on 127.0.0.1; port 0 picks a free port."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        self.recorder = Recorder()
        super().__init__(("127.0.0.1", port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> CaptureServer:
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="capture", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
