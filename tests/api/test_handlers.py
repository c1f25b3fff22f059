"""The Messages handler in-process, over real HTTP, against a fake engine whose generation is
scripted (fake_engine.py): these tests pin the stream's event order, the usage split, errors
mid-stream and cancellation on disconnect without a model.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import tornado.testing
import tornado.web

from pensieved.api.app import make_app
from pensieved.engine.types import (
    Event,
    Failed,
    Finished,
    Heartbeat,
    PromptCached,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from pensieved.errors import EngineError, ModelLoadError, RequestTimeoutError
from tests.api.fake_engine import PROMPT_TOKENS, FakeEngine, Hang


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def body(stream: bool) -> bytes:
    messages = [{"role": "user", "content": "Hi"}]
    return json.dumps(
        {"model": "m", "max_tokens": 50, "stream": stream, "messages": messages}
    ).encode()


def done(input_tokens: int = PROMPT_TOKENS, output: int = 2, cached: int = 3) -> Finished:
    return Finished("end_turn", None, input_tokens, output, cached)


class HandlerCase(tornado.testing.AsyncHTTPTestCase):
    script: list[Event | Hang] = []

    def get_app(self) -> tornado.web.Application:
        self.engine = FakeEngine(self.script)
        return make_app(self.engine)

    def post(self, stream: bool) -> tornado.httpclient.HTTPResponse:
        return self.fetch("/v1/messages", method="POST", body=body(stream), raise_error=False)

    def events(self) -> tuple[bytes, list[dict[str, Any]]]:
        response = self.post(stream=True)
        assert response.code == 200, response.body
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.body.decode()
        return response.body, sse_events(text)

    def assert_session_over(self) -> None:
        assert (self.engine.in_flight, self.engine.served) == (0, 1)
        assert self.engine.activity.entries == {}


class TestStreamOrder(HandlerCase):
    script = [
        Heartbeat(),
        PromptCached(3),
        Heartbeat(),
        ThinkingPiece("hm"),
        TextPiece("Hel"),
        TextPiece("lo"),
        done(),
    ]

    def test_events_in_anthropic_order(self) -> None:
        raw, events = self.events()
        assert [e["type"] for e in events] == [
            "message_start",
            "ping",  # a keep-alive once the stream has begun
            "content_block_start",
            "ping",  # after the first block start, as Anthropic sends it
            "content_block_delta",
            "content_block_delta",  # the thinking block's signature
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        # Before message_start only an SSE comment may keep the connection alive.
        assert raw.startswith(b": waiting for a slot\n\nevent: message_start\ndata: {")
        assert b'event: ping\ndata: {"type":"ping"}\n\n' in raw  # compact JSON, named events
        assert events[7]["content_block"] == {"type": "text", "text": ""}
        assert [e["delta"].get("text") for e in events[8:10]] == ["Hel", "lo"]
        self.assert_session_over()

    def test_usage_split_into_cached_and_new_prompt_tokens(self) -> None:
        _, events = self.events()
        start = events[0]["message"]["usage"]
        assert (start["input_tokens"], start["cache_read_input_tokens"]) == (7, 3)
        assert start["output_tokens"] == 0
        end = events[-2]
        assert end["usage"]["input_tokens"] + end["usage"]["cache_read_input_tokens"] == 10
        assert end["usage"]["output_tokens"] == 2
        assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}

    def test_whole_reply_has_the_streamed_blocks(self) -> None:
        response = self.post(stream=False)
        assert response.code == 200
        message = json.loads(response.body)
        assert [b["type"] for b in message["content"]] == ["thinking", "text"]
        assert message["content"][1]["text"] == "Hello"
        assert message["usage"]["input_tokens"] == 7
        assert message["usage"]["cache_read_input_tokens"] == 3
        self.assert_session_over()


class TestToolCallStream(HandlerCase):
    script = [
        PromptCached(0),
        ToolCallStart("Read"),
        ToolCallDelta('{"a":'),
        ToolCallDelta(" 1}"),
        ToolCallEnd({"a": 1}),
        Finished("tool_use", None, PROMPT_TOKENS, 5, 0),
    ]

    def test_tool_use_block_streams_its_json(self) -> None:
        _, events = self.events()
        assert [e["type"] for e in events][:3] == ["message_start", "content_block_start", "ping"]
        assert events[1]["content_block"]["type"] == "tool_use"
        assert events[1]["content_block"]["input"] == {}
        deltas = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
        assert "".join(deltas) == '{"a": 1}'
        assert events[-2]["delta"]["stop_reason"] == "tool_use"


class TestEmptyReply(HandlerCase):
    script = [PromptCached(0), Finished("max_tokens", None, PROMPT_TOKENS, 0, 0)]

    def test_an_empty_reply_still_has_one_text_block(self) -> None:
        _, events = self.events()
        assert [e["type"] for e in events] == [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]


class TestErrorMidStream(HandlerCase):
    script = [PromptCached(0), TextPiece("Hi"), Failed(EngineError("decode failed"))]

    def test_error_event_ends_the_stream(self) -> None:
        _, events = self.events()
        names = [e["type"] for e in events]
        assert names[-1] == "error" and "message_stop" not in names, names
        assert events[-1]["error"] == {"type": "api_error", "message": "decode failed"}
        self.assert_session_over()

    def test_whole_reply_gets_an_http_error(self) -> None:
        response = self.post(stream=False)
        assert response.code == 500
        assert json.loads(response.body)["error"]["message"] == "decode failed"
        self.assert_session_over()


class TestErrorBeforeTheStreamOpens(HandlerCase):
    script = [Failed(RequestTimeoutError("timed out waiting for a slot"))]

    def test_plain_http_error_when_nothing_was_sent(self) -> None:
        response = self.post(stream=True)
        assert response.code == 504
        assert json.loads(response.body) == {
            "type": "error",
            "error": {"type": "timeout_error", "message": "timed out waiting for a slot"},
        }
        self.assert_session_over()


class TestDisconnect(HandlerCase):
    script = [PromptCached(0), Hang()]

    @tornado.testing.gen_test(timeout=10)
    async def test_client_hanging_up_cancels_the_generation(self) -> None:
        for stream in (False, True):
            raw = body(stream)
            request = (
                f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{self.get_http_port()}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
            ).encode() + raw
            sock = socket.create_connection(("127.0.0.1", self.get_http_port()))
            sock.sendall(request)
            await asyncio.wait_for(self.engine.hanging.wait(), 5)
            sock.close()
            await asyncio.wait_for(self.engine.cancelled.wait(), 5)
            await asyncio.wait_for(self.engine.closed.wait(), 5)
            assert self.engine.in_flight == 0
            assert self.engine.activity.entries == {}
            for event in (self.engine.hanging, self.engine.cancelled, self.engine.closed):
                event.clear()
        assert self.engine.served == 2


class TestKeepAliveWhileTheModelLoads(HandlerCase):
    script = [PromptCached(0), TextPiece("Hi"), done(cached=0)]

    def get_app(self) -> tornado.web.Application:
        app = super().get_app()
        self.engine.load_waits = 2  # its model takes two keep-alive periods to load
        return app

    def test_a_stream_opens_with_comments_while_its_model_loads(self) -> None:
        raw, events = self.events()
        assert raw.startswith(b": loading the model\n\n: loading the model\n\nevent: message_start")
        assert [e["type"] for e in events][-1] == "message_stop"
        self.assert_session_over()

    def test_a_load_that_fails_after_the_stream_opened_ends_it_with_an_error_event(self) -> None:
        self.engine.load_error = ModelLoadError("cannot load model /m/x.gguf: bad file")
        raw, events = self.events()
        assert raw.startswith(b": loading the model\n\n")
        assert events == [
            {
                "type": "error",
                "error": {"type": "api_error", "message": "cannot load model /m/x.gguf: bad file"},
            }
        ]

    def test_a_whole_reply_just_waits(self) -> None:
        response = self.post(stream=False)
        assert response.code == 200
        assert json.loads(response.body)["content"] == [{"type": "text", "text": "Hi"}]
