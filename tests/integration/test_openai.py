"""The OpenAI Chat Completions API against the real daemon and the bundled model, through the
official `openai` SDK: the same engine, cache, grammar, limits and security as /v1/messages."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema
import openai
import pytest

from tests.integration.daemon import DaemonProcess, raw_http, start_daemon, wait_for

MODEL = "gpt-4o-mini"
GREEDY: dict[str, Any] = {"temperature": 0}
SYSTEM = (
    "You are a terse assistant for a hardware store. You answer questions about tools, "
    "fasteners, paint and garden supplies in one or two short sentences, and you never "
    "make up prices or stock levels."
)
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 40},
        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
        "duration_minutes": {"type": "integer", "minimum": 15, "maximum": 240},
    },
    "required": ["title", "priority", "duration_minutes"],
}
CREATE_EVENT: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "create_event",
        "description": "Create a calendar event.",
        "parameters": EVENT_SCHEMA,
    },
}
GET_WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1}},
            "required": ["city"],
        },
    },
}
PLAN_MEETING = [{"role": "user", "content": "Plan a one-hour design review, high priority."}]


def client(daemon: DaemonProcess, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, **kwargs
    )


def streamed_reply(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None, Any]:
    """(text, tool calls by index, finish_reason, usage) put together from a chunk stream."""
    text, calls, finish, usage = "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, calls, finish, usage


# ---- replies -----------------------------------------------------------------------------


def test_whole_reply(daemon: DaemonProcess) -> None:
    reply = client(daemon).chat.completions.create(
        model=MODEL,
        max_tokens=16,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."}],
    )
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == MODEL
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content and message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_and_whole_replies_say_the_same(daemon: DaemonProcess) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "max_completion_tokens": 24,
        "messages": [{"role": "user", "content": "Name three colors."}],
        **GREEDY,
    }
    c = client(daemon)
    # llama.cpp's numbers depend slightly on how much of the prompt came from the KV cache;
    # a first run puts the whole prompt there, so both compared runs start alike.
    c.chat.completions.create(**request)
    whole = c.chat.completions.create(**request)
    stream = c.chat.completions.create(**request, stream=True)
    text, calls, finish, _ = streamed_reply(stream)
    assert text == whole.choices[0].message.content and text.strip()
    assert not calls
    assert finish == whole.choices[0].finish_reason


def test_streamed_and_whole_tool_calls_say_the_same(daemon: DaemonProcess) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 120,
        "tools": [CREATE_EVENT, GET_WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "create_event"}},
        "messages": PLAN_MEETING,
        **GREEDY,
    }
    c = client(daemon)
    c.chat.completions.create(**request)
    whole = c.chat.completions.create(**request)
    _, calls, finish, _ = streamed_reply(c.chat.completions.create(**request, stream=True))
    whole_calls = whole.choices[0].message.tool_calls or []
    assert [(t.function.name, json.loads(t.function.arguments)) for t in whole_calls] == [  # type: ignore[union-attr]
        (calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)
    ]
    assert finish == whole.choices[0].finish_reason == "tool_calls"


# ---- tools and structured output ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_tool_call_parses_against_its_schema(daemon: DaemonProcess, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 150,
        "tools": [CREATE_EVENT, GET_WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "create_event"}},
        "messages": PLAN_MEETING,
    }
    c = client(daemon)
    if stream:
        _, calls, finish, _ = streamed_reply(c.chat.completions.create(**request, stream=True))
        assert sorted(calls) == [0], calls
        name, arguments, call_id = calls[0]["name"], calls[0]["arguments"], calls[0]["id"]
    else:
        reply = c.chat.completions.create(**request)
        finish = reply.choices[0].finish_reason
        assert reply.choices[0].message.tool_calls and len(reply.choices[0].message.tool_calls) == 1
        call = reply.choices[0].message.tool_calls[0]
        name, arguments, call_id = call.function.name, call.function.arguments, call.id  # type: ignore[union-attr]
    assert finish == "tool_calls"
    assert name == "create_event" and call_id.startswith("call_")
    jsonschema.validate(json.loads(arguments), EVENT_SCHEMA)


def test_required_tool_choice_and_a_tool_result_round_trip(daemon: DaemonProcess) -> None:
    c = client(daemon)
    question: dict[str, Any] = {"role": "user", "content": "What is the weather in Paris?"}
    first = c.chat.completions.create(
        model=MODEL,
        max_tokens=60,
        tools=[GET_WEATHER],
        tool_choice="required",
        messages=[question],
        **GREEDY,
    )
    assert first.choices[0].message.tool_calls
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), GET_WEATHER["function"]["parameters"])  # type: ignore[union-attr]
    second = c.chat.completions.create(
        model=MODEL,
        max_tokens=30,
        tools=[GET_WEATHER],
        tool_choice="none",
        messages=[
            question,
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."},
        ],
        **GREEDY,
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content and second.choices[0].finish_reason in (
        "stop",
        "length",
    )


def test_a_json_schema_response_validates(daemon: DaemonProcess) -> None:
    reply = client(daemon).chat.completions.create(
        model=MODEL,
        max_tokens=150,
        messages=PLAN_MEETING,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "event", "schema": EVENT_SCHEMA, "strict": True},
        },
    )
    content = reply.choices[0].message.content
    assert content is not None and reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(content), EVENT_SCHEMA)


def test_json_object_mode_returns_an_object(daemon: DaemonProcess) -> None:
    stream = client(daemon).chat.completions.create(
        model=MODEL,
        max_tokens=80,
        stream=True,
        messages=[{"role": "user", "content": 'Return the JSON object {"answer": 42}.'}],
        response_format={"type": "json_object"},
        **GREEDY,
    )
    text, _, finish, _ = streamed_reply(stream)
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


# ---- cache and usage ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_turn_two_reports_cached_tokens(daemon: DaemonProcess, stream: bool) -> None:
    c = client(daemon)
    conversation: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Which screws suit oak? ({'streamed' if stream else 'whole'})",
        },
    ]
    first = c.chat.completions.create(model=MODEL, max_tokens=20, messages=conversation)
    assert first.usage is not None
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And for pine?"},
    ]
    if stream:
        chunks = c.chat.completions.create(
            model=MODEL,
            max_tokens=20,
            messages=conversation,
            stream=True,
            stream_options={"include_usage": True},
        )
        _, _, _, usage = streamed_reply(chunks)
    else:
        usage = c.chat.completions.create(model=MODEL, max_tokens=20, messages=conversation).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens > first.usage.prompt_tokens
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None and first.usage.prompt_tokens // 2 < cached < usage.prompt_tokens


def test_a_stream_without_include_usage_has_no_usage_and_ends_with_done(
    daemon: DaemonProcess,
) -> None:
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": PLAN_MEETING}
    r = raw_http(
        daemon.port,
        "POST",
        "/v1/chat/completions",
        {"Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [x for x in r.body.decode().split("\n\n") if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_value"),
        ({"logprobs": True}, "logprobs", "unsupported_value"),
        (
            {"extra_body": {"prediction": {"type": "content", "content": "x"}}},
            "prediction",
            "unsupported_parameter",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                            },
                        ],
                    }
                ]
            },
            "messages.0.content.1",
            "unsupported_content",
        ),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"tool_choice": "required"}, "tool_choice", None),
    ],
)
def test_refusals_are_bad_request_errors_naming_the_field(
    daemon: DaemonProcess, fields: dict[str, Any], param: str, code: str | None
) -> None:
    request: dict[str, Any] = {"model": MODEL, "messages": PLAN_MEETING, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client(daemon).chat.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.code == code
    assert info.value.type == "invalid_request_error"
    assert param in info.value.message


def test_context_overflow_is_400_context_length_exceeded(daemon: DaemonProcess) -> None:
    long_text = "lorem ipsum dolor sit amet " * 800
    with pytest.raises(openai.BadRequestError) as info:
        client(daemon).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_text}]
        )
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert "prompt is too long" in info.value.message


def test_malformed_json_and_unknown_paths_parse_as_sdk_errors(daemon: DaemonProcess) -> None:
    c = client(daemon)
    with pytest.raises(openai.NotFoundError):
        c.post("/completions", body={"model": MODEL, "prompt": "x"}, cast_to=object)
    r = raw_http(
        daemon.port,
        "POST",
        "/v1/chat/completions",
        {"Content-Type": "application/json"},
        b'{"model": "x", "messages": [',
    )
    assert r.status == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "not valid JSON" in error["message"]


# ---- disconnects -------------------------------------------------------------------------


def _idle(daemon: DaemonProcess, timeout: float = 10.0) -> bool:
    with daemon.http() as http:
        wait_for(lambda: http.get("/health").json()["in_flight"] == 0, timeout)
        return bool(http.get("/health").json()["in_flight"] == 0)


def test_closing_a_stream_cancels_the_generation(daemon: DaemonProcess) -> None:
    c = client(daemon)
    stream = c.chat.completions.create(
        model=MODEL,
        max_tokens=1500,
        stream=True,
        messages=[{"role": "user", "content": "Write an extremely long story."}],
        temperature=1.0,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    before = time.monotonic()
    assert _idle(daemon), "the generation went on after the client closed the stream"
    assert time.monotonic() - before < 10
    log = daemon.log_text()
    assert "client closed the stream" in log or "client went away" in log


# The shortest answer this schema admits is 200 strings of 200 characters, far beyond
# max_tokens: the reply cannot end on its own before the client gives up (a free-text
# "long story" from the 135M model sometimes ended within the timeout on a fast machine).
ENDLESS_SCHEMA = {
    "type": "array",
    "minItems": 200,
    "items": {"type": "string", "minLength": 200},
}


def test_a_client_that_hangs_up_on_a_whole_reply_cancels_it(daemon: DaemonProcess) -> None:
    c = client(daemon, timeout=httpx.Timeout(1.0))
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(
            model=MODEL,
            max_tokens=1500,
            messages=[{"role": "user", "content": "Write an extremely long story."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "chapters", "schema": ENDLESS_SCHEMA},
            },
        )
    assert _idle(daemon)


# ---- models ------------------------------------------------------------------------------


def test_models_answer_both_sdks(daemon: DaemonProcess) -> None:
    listed = client(daemon).models.list()
    assert listed.data and listed.data[0].object == "model" and listed.data[0].owned_by
    first = listed.data[0]
    assert first.created > 0
    one = client(daemon).models.retrieve(MODEL)
    assert one.id == MODEL and one.object == "model"
    anthropic_list = anthropic.Anthropic(
        base_url=daemon.base_url, api_key="unused", max_retries=0
    ).models.list()
    assert [m.id for m in anthropic_list.data] == [m.id for m in listed.data]
    assert anthropic_list.data[0].type == "model" and anthropic_list.data[0].display_name


# ---- a daemon with a key and one request at a time ---------------------------------------


@pytest.fixture(scope="module")
def strict_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(
        Path(tmp_path_factory.mktemp("openai-strict")),
        {"server": {"api_key": "sk-local-test", "max_concurrent_requests": 1}},
    )
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


def test_a_wrong_key_is_an_authentication_error(strict_daemon: DaemonProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(strict_daemon).chat.completions.create(model=MODEL, messages=PLAN_MEETING)
    assert info.value.code == "invalid_api_key"
    right = openai.OpenAI(
        base_url=strict_daemon.base_url + "/v1", api_key="sk-local-test", max_retries=0
    )
    assert right.chat.completions.create(model=MODEL, messages=PLAN_MEETING, max_tokens=2)


def test_a_full_server_is_429_with_retry_after(strict_daemon: DaemonProcess) -> None:
    c = openai.OpenAI(
        base_url=strict_daemon.base_url + "/v1", api_key="sk-local-test", max_retries=0
    )
    started = threading.Event()
    done = threading.Event()

    def long_stream() -> None:
        stream = c.chat.completions.create(
            model=MODEL,
            max_tokens=1500,
            stream=True,
            messages=[{"role": "user", "content": "Write an extremely long story."}],
        )
        for _ in stream:
            started.set()
            if done.is_set():
                break
        stream.close()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert started.wait(120)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=MODEL, messages=PLAN_MEETING, max_tokens=2)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.type == "rate_limit_error"
        assert "max_concurrent_requests" in info.value.message
    finally:
        done.set()
        thread.join(60)
    assert not thread.is_alive()
