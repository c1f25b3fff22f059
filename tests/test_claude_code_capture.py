"""The capture server answers the official SDK as the Messages API does, records each request
in the corpus's format, and names the files of a scenario from its requests alone."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from tests.claude_code_capture.scenarios import AGENT_HEADER, by_name, complete, file_names
from tests.claude_code_capture.server import TEXT, CaptureServer, Script, ToolCall

REPO = Path(__file__).resolve().parent.parent
SHARED_332 = (
    Path(
        os.environ.get(
            "PENSIEVE_CLAUDE_FIXTURES", REPO.parent / "shared" / "fixtures" / "claude-code"
        )
    )
    / "2.1.332"
)
# The keys of a 2.1.332 capture, in their order.
RECORD_KEYS = [
    "n",
    "time",
    "client",
    "method",
    "path",
    "http_version",
    "headers",
    "body_bytes",
    "body",
    "response",
]
BASH = {
    "name": "Bash",
    "description": "Run a command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
}
TOOL_CALL = ToolCall("Bash", {"command": "echo hi", "description": "Print hi"})


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as s:
        s.recorder.start(Script("unit", TOOL_CALL))
        yield s


@pytest.fixture
def client(server: CaptureServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="sk-secret", max_retries=0) as c:
        yield c


def _stream(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    args: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100}
    with client.messages.stream(**(args | kwargs)) as stream:
        return stream.get_final_message()


def test_a_streamed_text_reply_is_a_message_the_sdk_assembles(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    message = _stream(client, messages=[{"role": "user", "content": "Say hello"}])
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", TEXT)]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    (record,) = server.recorder.taken()
    assert list(record) == RECORD_KEYS
    assert record["response"] == {
        "status": 200,
        "sse": True,
        "text": TEXT,
        "events": [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ],
    }


def test_a_record_keeps_the_headers_as_sent_without_the_key_or_the_connection(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Stainless-OS": "Linux", "Authorization": "Bearer sk-secret"},
    )
    (record,) = server.recorder.taken()
    headers = record["headers"]
    assert all(isinstance(h, list) and len(h) == 2 for h in headers), headers
    names = [name for name, _ in headers]
    assert "X-Stainless-OS" in names and "anthropic-version" in names, names
    lowered = {name.lower() for name in names}
    assert not lowered & {"x-api-key", "authorization", "host", "connection", "content-length"}
    assert "sk-secret" not in json.dumps(record)
    assert (record["method"], record["path"], record["http_version"]) == (
        "POST",
        "/v1/messages",
        "HTTP/1.1",
    )
    assert record["response"]["sse"] is False and record["response"]["text"] == TEXT


@pytest.mark.skipif(not SHARED_332.is_dir(), reason=f"no 2.1.332 captures at {SHARED_332}")
def test_records_have_the_shape_of_the_shared_2_1_332_captures(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    _stream(client, messages=[{"role": "user", "content": "Say hello"}], tools=[BASH])
    _stream(client, messages=[{"role": "user", "content": "Say hello"}])
    tool_record, text_record = server.recorder.taken()
    shared = {p.stem: json.loads(p.read_text()) for p in SHARED_332.glob("*.json")}
    for ours, theirs in (
        (tool_record, shared["p-toolsearch-first"]),
        (text_record, shared["p-default"]),
    ):
        assert list(ours) == list(theirs)
        assert list(ours["response"]) == list(theirs["response"])
        assert ours["response"]["events"] == theirs["response"]["events"]
        assert {type(v).__name__ for v in ours.values()} <= {"int", "float", "str", "list", "dict"}
    assert list(tool_record["response"]["tool_use"]) == ["id", "name", "input"]


def test_the_scripted_tool_call_goes_once_then_its_result_gets_text(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Run echo hi"}]
    first = _stream(client, messages=ask, tools=[BASH])
    (call,) = first.content
    assert call.type == "tool_use" and first.stop_reason == "tool_use"
    assert (call.name, call.input) == ("Bash", TOOL_CALL.input)
    assert call.id.startswith("toolu_capture_")
    result: list[anthropic.types.MessageParam] = [
        *ask,
        {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "hi"}],
        },
    ]
    second = _stream(client, messages=result, tools=[BASH])
    assert second.content[0].type == "text"
    assert second.content[0].text == f"{TEXT}. I got a tool_result of 2 chars (is_error=None)."
    again = _stream(client, messages=ask, tools=[BASH])
    assert again.content[0].type == "text", "the tool call is made only once per scenario"
    records = server.recorder.taken()
    assert [r["n"] for r in records] == [1, 2, 3]
    assert records[0]["response"]["tool_use"]["id"] == call.id


def test_a_tool_that_is_not_offered_is_not_called(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    message = _stream(client, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text"


def test_a_structured_output_request_gets_json_that_fits_its_schema(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    message = client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=50,
        messages=[{"role": "user", "content": "Title this"}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    assert message.content[0].type == "text"
    assert set(json.loads(message.content[0].text)) == {"title"}


def test_count_tokens_and_models_are_answered_and_recorded(
    server: CaptureServer, client: anthropic.Anthropic
) -> None:
    count = client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hello " * 100}]
    )
    assert count.input_tokens > 100
    models = [m.id for m in client.models.list()]
    assert "claude-sonnet-4-5" in models
    counted, listed = server.recorder.taken()
    assert counted["path"] == "/v1/messages/count_tokens"
    assert counted["response"]["input_tokens"] == count.input_tokens
    assert (listed["method"], listed["body"], listed["body_bytes"]) == ("GET", None, 0)


def test_an_unknown_route_gets_the_api_error_envelope(server: CaptureServer) -> None:
    raw = b'{"prompt": "hi"}'
    response = httpx.post(f"{server.base_url}/v1/complete", content=raw)
    assert response.status_code == 404
    assert response.json()["type"] == "error"
    assert "/v1/complete" in response.json()["error"]["message"]
    (record,) = server.recorder.taken()
    assert record["response"]["status"] == 404
    assert (record["body"], record["body_bytes"]) == ({"prompt": "hi"}, len(raw))


def _record(n: int, path: str = "/v1/messages", agent: bool = False) -> dict[str, Any]:
    headers = [["anthropic-version", "2023-06-01"]] + ([[AGENT_HEADER, "a1"]] if agent else [])
    return {"n": n, "method": "POST", "path": path + "?beta=true", "headers": headers}


def test_file_names_follow_the_kind_and_order_of_requests_only() -> None:
    records = [
        _record(1),
        _record(3, agent=True),
        _record(2),
        _record(4, "/v1/messages/count_tokens"),
        _record(5),
        _record(6),
        _record(7, agent=True),
    ]
    names = [name for name, _ in file_names(by_name("p-subagent"), records)]
    assert names == [
        "p-subagent-first",
        "p-subagent-result",
        "p-subagent-explore",
        "p-subagent-count-tokens-1",
        "p-subagent-notified",
        "p-subagent-4",
        "p-subagent-explore-2",
    ]
    assert complete(by_name("p-subagent"), records)
    assert not complete(by_name("p-subagent"), [_record(1), _record(2)])
    assert [n for n, _ in file_names(by_name("interactive"), [_record(1), _record(2)])] == [
        "interactive-1",
        "interactive-2",
    ]
