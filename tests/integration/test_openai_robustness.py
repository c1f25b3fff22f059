"""/v1/chat/completions keeps the Messages side's 4xx guarantees: any body gets a reply or a
4xx in OpenAI's envelope (never a 500, never a crash), and the security checks hold."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.daemon import DaemonProcess, RawResponse, raw_http
from tests.integration.test_robustness import raw_bodies

JSON = {"Content-Type": "application/json"}
PATH = "/v1/chat/completions"
TEXT = st.text(max_size=30) | st.sampled_from(["<|im_start|>system", "\x00", "\u202e", "{"])
SCHEMAS = st.sampled_from(
    [
        {"type": "object"},
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "array", "items": {"type": "string"}},
        {"type": "nonsense"},
        {"enum": []},
        {},
    ]
)


@st.composite
def content(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(TEXT)
    part = st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, TEXT),
        st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}),
        st.just({"type": "refusal", "refusal": "no"}),
        st.just({"type": "mystery"}),
    )
    return draw(st.lists(part, max_size=3))


@st.composite
def messages(draw: st.DrawFn) -> list[Any]:
    out: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"]))
        message: dict[str, Any] = {"role": role, "content": draw(content())}
        if role == "assistant" and draw(st.booleans()):
            arguments = draw(st.sampled_from(['{"a": 1}', "", "[1]", "{bad", '"x"']))
            message["tool_calls"] = [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": arguments},
                }
            ]
            if draw(st.booleans()):
                message["content"] = None
        if role == "tool" and draw(st.booleans()):
            message["tool_call_id"] = "call_1"
        out.append(message)
    return out


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["gpt-4o", "", "local"])),
        "messages": draw(messages()),
        draw(st.sampled_from(["max_tokens", "max_completion_tokens"])): draw(
            st.sampled_from([1, 2, 3, 0, -1])
        ),
        "stream": draw(st.booleans()),
    }
    optional: dict[str, Any] = {
        "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": False}, {}]),
        "temperature": st.floats(-1, 3),
        "top_p": st.floats(0, 1.5),
        "seed": st.integers(-(2**40), 2**40),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
        "n": st.integers(0, 3),
        "logprobs": st.booleans(),
        "tools": st.lists(
            st.builds(
                lambda name, schema: {
                    "type": "function",
                    "function": {"name": name, "parameters": schema},
                },
                st.sampled_from(["f", "g", ""]),
                SCHEMAS,
            ),
            max_size=2,
        ),
        "tool_choice": st.sampled_from(
            ["auto", "none", "required", "any", {"type": "function", "function": {"name": "f"}}]
        ),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.one_of(
            st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "yaml"}]),
            st.builds(
                lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
                SCHEMAS,
            ),
        ),
        "frequency_penalty": st.sampled_from([0, 0.5]),
        "user": TEXT,
        "top_k": st.integers(-1, 50),
        "unknown_field": st.integers(),
    }
    for key, strategy in optional.items():
        if draw(st.integers(0, 4)) == 0:
            body[key] = draw(strategy)
    return body


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Requests that must succeed: every supported field, with values it accepts."""
    conversation: list[Any] = []
    if draw(st.booleans()):
        conversation.append(
            {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)}
        )
    conversation.append({"role": "user", "content": draw(TEXT)})
    if draw(st.booleans()):
        conversation += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": draw(TEXT)},
        ]
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": conversation,
        "max_completion_tokens": draw(st.integers(1, 3)),
        "stream": draw(st.booleans()),
        "stream_options": {"include_usage": draw(st.booleans())},
        "temperature": draw(st.floats(0, 2)),
        "top_p": draw(st.floats(0.01, 1)),
        "seed": draw(st.integers(0, 2**31)),
        "n": 1,
    }
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(st.text(min_size=1, max_size=5), max_size=3))
    if draw(st.booleans()):
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            }
        ]
        body["tool_choice"] = draw(
            st.sampled_from(
                ["auto", "none", "required", {"type": "function", "function": {"name": "f"}}]
            )
        )
    elif draw(st.booleans()):
        body["response_format"] = draw(
            st.sampled_from(
                [
                    {"type": "json_object"},
                    {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "object"}},
                    },
                ]
            )
        )
    return body


def check_reply(r: RawResponse) -> None:
    """A completion, a complete chunk stream, or a 4xx OpenAI error envelope."""
    assert r.status < 500, (r.status, r.body[:500])
    if r.status == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [x for x in r.body.decode().split("\n\n") if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length", "tool_calls"), chunks[-2:]
        return
    data = r.json()
    if r.status == 200:
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"]["role"] == "assistant"
        assert data["usage"]["completion_tokens"] >= 0
        return
    assert 400 <= r.status < 500, r.status
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]


# Each valid example generates up to three tokens; a loaded CPU needs minutes for all of them.
@pytest.mark.timeout(900)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(
    body=st.one_of(
        valid_bodies().map(lambda b: json.dumps(b).encode()),
        bodies().map(lambda b: json.dumps(b).encode()),
        raw_bodies(),
    )
)
def test_any_body_gets_a_completion_or_a_4xx_envelope(daemon: DaemonProcess, body: bytes) -> None:
    r = raw_http(daemon.port, "POST", PATH, JSON, body, timeout=120)
    event(f"chat completions: {r.status}")
    check_reply(r)


@pytest.mark.timeout(600)
def test_every_valid_body_is_answered(daemon: DaemonProcess) -> None:
    # The property test above mixes in valid bodies; here they must all get a 200.
    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(body=valid_bodies())
    def check(body: dict[str, Any]) -> None:
        r = raw_http(daemon.port, "POST", PATH, JSON, json.dumps(body).encode(), timeout=120)
        assert r.status == 200, (r.status, r.body[:500], body)
        check_reply(r)

    check()


def test_daemon_is_healthy_after_the_property_test(daemon: DaemonProcess) -> None:
    assert daemon.wait_ready(timeout=10)["status"] == "ok"
    assert raw_http(daemon.port, "GET", "/health").json()["in_flight"] == 0
    log = daemon.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "unhandled error" not in log


# ---- the same security checks, in OpenAI's envelope -----------------------------------------

BODY = json.dumps(
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def error_of(r: RawResponse, status: int) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body[:300])
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert r.headers.get("request-id", "").startswith("req_")
    return error


def test_a_foreign_host_is_refused(daemon: DaemonProcess) -> None:
    r = raw_http(daemon.port, "POST", PATH, JSON, BODY, host="rebind.attacker.example")
    assert "DNS rebinding" in error_of(r, 403)["message"]


@pytest.mark.parametrize("origin", ["http://evil.example", "null"])
def test_a_foreign_origin_is_refused(daemon: DaemonProcess, origin: str) -> None:
    r = raw_http(daemon.port, "POST", PATH, {**JSON, "Origin": origin}, BODY)
    assert error_of(r, 403)["type"] == "permission_error"


def test_a_declared_oversized_body_is_413(daemon: DaemonProcess) -> None:
    r = raw_http(daemon.port, "POST", PATH, {**JSON, "Content-Length": str(1024**3)}, timeout=10)
    error = error_of(r, 413)
    assert error["code"] == "request_too_large" and "server.max_body_bytes" in error["message"]


def test_get_is_405(daemon: DaemonProcess) -> None:
    error = error_of(raw_http(daemon.port, "GET", PATH), 405)
    assert error["message"] == f"method GET is not allowed on {PATH}"


def test_too_many_stop_sequences_are_refused_before_validation(daemon: DaemonProcess) -> None:
    body = json.loads(BODY)
    body["stop"] = ["x"] * 300
    error = error_of(raw_http(daemon.port, "POST", PATH, JSON, json.dumps(body).encode()), 400)
    assert error["message"].startswith("stop: 300 stop sequences")
