"""The Messages API against the real daemon and the bundled model, via the official SDK."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx2 as httpx
import pytest

from tests.integration.daemon import DaemonProcess, prompt_tokens, wait_for

MODEL = "claude-haiku-4-5"


def test_non_streaming_reply(daemon: DaemonProcess) -> None:
    client = daemon.client()
    message = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.content and message.content[0].type == "text"
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert prompt_tokens(message.usage) > 5
    assert 0 < message.usage.output_tokens <= 24


def test_streaming_reply(daemon: DaemonProcess) -> None:
    client = daemon.client()
    pieces: list[str] = []
    with client.messages.stream(
        model="claude-3-5-haiku-latest",
        max_tokens=32,
        messages=[{"role": "user", "content": "Name three colors."}],
    ) as stream:
        for text in stream.text_stream:
            pieces.append(text)
        final = stream.get_final_message()
    assert len(pieces) > 1, "text should arrive in several deltas"
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.model == "claude-3-5-haiku-latest"
    assert final.usage.output_tokens > 0
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_multi_turn_with_system_blocks(daemon: DaemonProcess) -> None:
    client = daemon.client()
    message = client.messages.create(
        model=MODEL,
        max_tokens=16,
        extra_body={"temperature": 0},
        system=[
            {"type": "text", "text": "You are a terse assistant."},
            {"type": "text", "text": "Answer in one word.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
            {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
        ],
        metadata={"user_id": "tester"},
    )
    assert message.content[0].text.strip()
    single = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "And of Italy?"}]
    )
    assert prompt_tokens(message.usage) > single.input_tokens + 10


def test_count_tokens_matches_usage(daemon: DaemonProcess) -> None:
    client = daemon.client()
    body = {
        "model": MODEL,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a fact about owls."},
        ],
    }
    counted = client.messages.count_tokens(**body)  # type: ignore[arg-type]
    message = client.messages.create(max_tokens=4, **body)  # type: ignore[arg-type]
    assert counted.input_tokens == prompt_tokens(message.usage)


def test_a_final_assistant_turn_is_continued(daemon: DaemonProcess) -> None:
    # The Messages API's prefill: the reply continues the assistant's text, so the prompt is
    # the conversation, the generation prompt and that text, with no end of turn after it.
    # One letter is one token in any vocabulary: continued, it adds exactly one.
    client = daemon.client()
    question = {"role": "user", "content": "Name a fruit that starts with A."}
    alone = client.messages.count_tokens(model=MODEL, messages=[question])
    prefilled = client.messages.count_tokens(
        model=MODEL, messages=[question, {"role": "assistant", "content": "A"}]
    )
    assert prefilled.input_tokens == alone.input_tokens + 1
    message = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=[question, {"role": "assistant", "content": "A"}],
    )
    assert prompt_tokens(message.usage) == prefilled.input_tokens
    assert message.content and message.content[0].type == "text"


def test_max_tokens_reached(daemon: DaemonProcess) -> None:
    client = daemon.client()
    message = client.messages.create(
        model=MODEL,
        max_tokens=5,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5


def test_huge_max_tokens_is_clamped_not_rejected(daemon: DaemonProcess) -> None:
    client = daemon.client()
    with client.messages.stream(
        model=MODEL,
        max_tokens=64000,
        extra_body={"temperature": 0},
        stop_sequences=["."],
        messages=[{"role": "user", "content": "Say one sentence."}],
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason in ("end_turn", "stop_sequence")
    with daemon.http() as http:
        r = http.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 1_000_000,
                "stop_sequences": ["."],
                "messages": [{"role": "user", "content": "Say one sentence."}],
            },
        )
    assert r.status_code == 200, r.text


def test_stop_sequence(daemon: DaemonProcess) -> None:
    client = daemon.client()
    prompt = [{"role": "user", "content": "Describe the sea in two sentences."}]
    free = client.messages.create(
        model=MODEL, max_tokens=40, extra_body={"temperature": 0}, messages=prompt
    )
    text = free.content[0].text
    words = [w for w in text.split() if w.isalpha() and len(w) > 3]
    assert words, f"need a word to stop on in {text!r}"
    stop = words[min(2, len(words) - 1)]
    stopped = client.messages.create(
        model=MODEL,
        max_tokens=40,
        extra_body={"temperature": 0},
        messages=prompt,
        stop_sequences=[stop],
    )
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop
    out = stopped.content[0].text
    assert stop not in out
    assert text.startswith(out)
    assert stopped.usage.output_tokens < free.usage.output_tokens


def test_stream_stop_sequence_never_leaks_partial_match(daemon: DaemonProcess) -> None:
    client = daemon.client()
    prompt = [{"role": "user", "content": "Count from one to ten in words."}]
    free = client.messages.create(
        model=MODEL, max_tokens=40, extra_body={"temperature": 0}, messages=prompt
    )
    text = free.content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    assert stop.strip()
    with client.messages.stream(
        model=MODEL,
        max_tokens=40,
        extra_body={"temperature": 0},
        messages=prompt,
        stop_sequences=[stop],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence"
    assert stop not in streamed
    assert streamed == text[: text.index(stop)]


# ---- errors ---------------------------------------------------------------------------------


def test_missing_max_tokens_is_400_naming_the_field(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        r = http.post(
            "/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert r.headers["request-id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]},
            "role",
        ),
        (
            {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "temperature": "hot",
                "messages": [{"role": "user", "content": "x"}],
            },
            "temperature",
        ),
    ],
)
def test_invalid_fields_raise_bad_request(
    daemon: DaemonProcess, body: dict[str, object], field: str
) -> None:
    client = daemon.client()
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body=body, cast_to=httpx.Response)
    assert info.value.status_code == 400
    assert field in str(info.value.body)


def test_malformed_json(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        r = http.post(
            "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]


def test_unknown_path_is_404(daemon: DaemonProcess) -> None:
    client = daemon.client()
    with pytest.raises(anthropic.NotFoundError):
        client.get("/v1/nothing-here", cast_to=httpx.Response)
    with daemon.http() as http:
        r = http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_wrong_method_is_405(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        r = http.get("/v1/messages")
    assert r.status_code == 405
    assert r.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "method GET is not allowed on /v1/messages",
        },
    }
    assert r.headers["request-id"]


def test_prompt_too_long(daemon: DaemonProcess) -> None:
    client = daemon.client()
    long_text = "lorem ipsum dolor sit amet " * 800
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": long_text}]
        )
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("prompt is too long: ")
    asked, limit = message.removeprefix("prompt is too long: ").split(" tokens > ")
    assert int(asked) > int(limit.split()[0]) > 0


def test_image_without_vision_is_400(daemon: DaemonProcess) -> None:
    client = daemon.client()
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "iVBORw0KGgo=",
                            },
                        },
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
        )
    assert "vision" in str(info.value.body)


# ---- other endpoints ------------------------------------------------------------------------


def test_models_list_and_get(daemon: DaemonProcess) -> None:
    client = daemon.client()
    models = client.models.list()
    assert models.data and models.data[0].type == "model"
    one = client.models.retrieve("claude-opus-4-1")
    assert one.id == "claude-opus-4-1"
    assert one.created_at is not None


def test_root_and_health(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        assert http.head("/").status_code == 200
        assert http.get("/").status_code == 200
        health = http.get("/health")
    assert health.status_code == 200
    data = health.json()
    assert data["status"] == "ok"
    assert data["context_size"] == 2048
    assert "SmolLM2" in (data["model"] or "") or "smollm2" in (data["model_path"] or "").lower()


def test_beta_query_and_headers_accepted(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        r = http.post(
            "/v1/messages?beta=true",
            headers={
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14",
            },
            json={
                "model": MODEL,
                "max_tokens": 3,
                "service_tier": "auto",
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"


def test_health_answers_between_tokens_of_a_long_generation(daemon: DaemonProcess) -> None:
    client = daemon.client()
    done = threading.Event()
    started = threading.Event()
    checked = threading.Event()
    # What arrived, in order: list.append is atomic, so the two threads' entries interleave
    # exactly as they happened.
    timeline: list[str] = []

    def generate() -> None:
        with client.messages.stream(
            model=MODEL,
            max_tokens=600,
            extra_body={"temperature": 1.0},
            messages=[
                {"role": "user", "content": "Write a very long essay about the history of Rome."}
            ],
        ) as stream:
            for _ in stream.text_stream:
                timeline.append("text")
                started.set()
                if checked.is_set():
                    break  # hanging up ends the generation: no need to wait for 600 tokens
        done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert started.wait(30)
    with daemon.http() as http:
        http.get("/health")  # open the connection first
        # Poll until a token has arrived between two answers (or the generation ended, which
        # fails below): on a loaded machine one decode step can outlast ten polls.
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            r = http.get("/health")
            assert r.status_code == 200
            timeline.append("health")
            answered = [i for i, what in enumerate(timeline) if what == "health"]
            if len(answered) >= 2 and "text" in timeline[answered[0] + 1 : answered[-1]]:
                break
            time.sleep(0.05)
    health = [i for i, what in enumerate(timeline) if what == "health"]
    assert len(health) >= 2, timeline
    # /health is answered between tokens, not after the generation (which goes on until we
    # hang up): tokens keep arriving after the health answers.
    wait_for(lambda: "text" in timeline[health[-1] + 1 :], 60)
    checked.set()
    thread.join(120)
    assert not thread.is_alive()
    assert "text" in timeline[health[0] + 1 : health[-1]], timeline


def test_client_disconnect_stops_generation(daemon: DaemonProcess) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 1500,
        "stream": True,
        "messages": [{"role": "user", "content": "Write an extremely long story."}],
    }
    with (
        httpx.Client(base_url=daemon.base_url, timeout=30) as http,
        http.stream("POST", "/v1/messages", json=body) as r,
    ):
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break
    # The server notices the closed socket on its next writes and ends the generation: the
    # request leaves the books long before 1,500 tokens could have been generated.
    t0 = time.perf_counter()
    with daemon.http() as http:
        while http.get("/health").json()["in_flight"] and time.perf_counter() - t0 < 10:
            time.sleep(0.05)
        assert http.get("/health").json()["in_flight"] == 0
    log = daemon.log_text()
    assert "client closed the stream" in log or "client went away" in log
    client = daemon.client()
    message = client.messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.output_tokens <= 3


def test_raw_sse_event_order_and_json(daemon: DaemonProcess) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 12,
        "stream": True,
        "messages": [{"role": "user", "content": "Hello!"}],
    }
    with httpx.Client(base_url=daemon.base_url, timeout=60) as http:
        r = http.post("/v1/messages", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.content.decode()
    assert raw.endswith("\n\n")
    events = []
    for chunk in raw.strip("\n").split("\n\n"):
        lines = chunk.split("\n")
        assert len(lines) == 2, chunk
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        name = lines[0].removeprefix("event: ")
        data = json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == name
        events.append(data)
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta"}
    start = events[0]["message"]
    assert start["id"].startswith("msg_") and start["model"] == MODEL
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    assert events[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert deltas and all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    delta = events[-2]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert "stop_sequence" in delta["delta"]
    assert 0 < delta["usage"]["output_tokens"] <= 12
    assert events[-1] == {"type": "message_stop"}
