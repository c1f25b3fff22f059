"""Upstream routes (`model.upstreams`) against real upstream processes on 127.0.0.1.

Protocol `anthropic`: a second pensieved is the upstream. Protocol `openai`: llama-cpp-python's
own OpenAI-compatible server. The failures are real ones: a port nothing listens on, a request
llama-cpp-python's server fails on with a 500, a timeout shorter than a real prefill, a full
upstream pensieved answering 529, an upstream killed mid-test.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema
import pytest

from tests.integration.daemon import (
    REPO,
    DaemonProcess,
    control_status,
    run_ctl,
    sse_events,
    start_daemon,
    wait_for,
    write_config,
)
from tests.integration.upstreams import (
    LlamaServer,
    control_reload,
    start_llama_server,
    unused_url,
)

FIXTURES = Path(
    os.environ.get("PENSIEVE_CLAUDE_FIXTURES", REPO.parent / "shared" / "fixtures" / "claude-code")
)
UPSTREAM_KEY = "upstream-secret-key-5f1c9a"
BILLING = "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli; cch=0a1b2;"
WEATHER = {
    "name": "get_weather",
    "description": "Get the weather forecast for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}
# Long enough that evaluating it takes far more than 100 ms on any CPU.
LONG_PROMPT = " ".join(f"item {i} is a number." for i in range(200))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """The anthropic-protocol upstream: a pensieved that wants a key and logs request bodies
    (so a test can see what reached it)."""
    d = start_daemon(
        Path(tmp_path_factory.mktemp("upstream")),
        {"server": {"api_key": UPSTREAM_KEY}, "logging": {"log_prompts": True}},
    )
    yield d
    d.stop()


@pytest.fixture(scope="module")
def busy_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """An upstream pensieved that admits one request at a time (the next one hears 529)."""
    d = start_daemon(
        Path(tmp_path_factory.mktemp("busy")), {"server": {"max_concurrent_requests": 1}}
    )
    yield d
    d.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = start_llama_server(Path(tmp_path_factory.mktemp("llama")))
    yield server
    server.stop()


def _route(url: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"urls": url if isinstance(url, list) else [url], **extra}


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: DaemonProcess,
    busy_upstream: DaemonProcess,
    llama: LlamaServer,
) -> Iterator[DaemonProcess]:
    """The pensieved under test: every kind of route at once, names local otherwise."""
    upstreams = {
        "opus-anth-*": _route(upstream.base_url, api_key=UPSTREAM_KEY, model="big-remote"),
        "opus-oai-*": _route(llama.base_url, protocol="openai", model="smollm"),
        "down-*": _route(unused_url(), connect_timeout_ms=2000),
        "slow-*": _route(llama.base_url, protocol="openai", timeout_ms=100),
        "busy-*": _route(busy_upstream.base_url),
        "limited-*": _route(upstream.base_url, api_key=UPSTREAM_KEY, max_concurrent_requests=1),
    }
    d = start_daemon(
        Path(tmp_path_factory.mktemp("front")),
        {"model": {"upstreams": upstreams}, "logging": {"level": "debug"}},
    )
    yield d
    d.stop()


def _served(daemon: DaemonProcess) -> int:
    return int(control_status(daemon.socket_path)["requests"]["served"])


def _route_status(daemon: DaemonProcess, pattern: str) -> dict[str, Any]:
    routes = control_status(daemon.socket_path)["upstreams"]
    return next(r for r in routes if r["pattern"] == pattern)


# ---- protocol anthropic ---------------------------------------------------------------------


def test_anthropic_route_whole_and_streamed(front: DaemonProcess, upstream: DaemonProcess) -> None:
    before_up, before_front = _served(upstream), _served(front)
    client = front.client()
    system: Any = [{"type": "text", "text": BILLING}, {"type": "text", "text": "Be brief. SYS-77"}]
    reply = client.messages.create(
        model="opus-anth-4",
        max_tokens=12,
        system=system,
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert reply.model == "big-remote"  # the upstream's reply, untouched
    assert reply.content and reply.usage.output_tokens > 0
    with client.messages.stream(
        model="opus-anth-4", max_tokens=12, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.model == "big-remote" and final.usage.output_tokens > 0
    # Both went upstream, and none ran on the front's own model.
    assert _served(upstream) == before_up + 2
    assert _served(front) == before_front
    # The local normalization happened before forwarding: the billing header never arrived.
    log = upstream.log_text()
    assert "SYS-77" in log
    assert "x-anthropic-billing-header" not in log


def test_local_names_stay_local(front: DaemonProcess, upstream: DaemonProcess) -> None:
    before_up, before_front = _served(upstream), _served(front)
    reply = front.client().messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.model == "claude-haiku-4-5"
    assert _served(front) == before_front + 1
    assert _served(upstream) == before_up
    # /v1/models knows both kinds of name.
    listed = [m.id for m in front.client().models.list()]
    assert "opus-anth-*" in listed and "opus-oai-*" in listed
    info = front.client().models.retrieve("opus-anth-4")
    assert info.display_name == "big-remote (upstream)"


def test_upstream_key_never_reaches_client_or_log(front: DaemonProcess) -> None:
    with front.http() as http:
        r = http.post(
            "/v1/messages",
            headers={"x-api-key": "the-clients-own-key", "anthropic-version": "2023-06-01"},
            json={
                "model": "opus-anth-1",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        bad = http.post(
            "/v1/messages",
            json={
                "model": "down-1",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
    assert r.status_code == 200
    # A reload that changes the route logs the change, with the key masked.
    config = json.loads(front.config_path.read_text())
    config["model"]["upstreams"]["opus-anth-*"]["timeout_ms"] = 600_001
    write_config(front.config_path, config)
    assert control_reload(front.socket_path)["ok"]
    assert "model.upstreams" in front.log_text()
    for response in (r, bad):
        assert UPSTREAM_KEY not in response.text
        assert all(UPSTREAM_KEY not in v for v in response.headers.values())
    assert UPSTREAM_KEY not in front.log_text()
    shown = run_ctl("status", "--json", config=front.config_path, timeout=30)
    config = run_ctl("config", "show", "--json", config=front.config_path, timeout=30)
    for result in (shown, config):
        assert result.returncode == 0, result.stderr
        assert UPSTREAM_KEY not in result.stdout + result.stderr


def test_count_tokens_asks_an_anthropic_upstream(
    front: DaemonProcess, upstream: DaemonProcess
) -> None:
    messages: Any = [{"role": "user", "content": "How many tokens is this sentence?"}]
    via_front = front.client().messages.count_tokens(model="opus-anth-4", messages=messages)
    direct = anthropic.Anthropic(
        base_url=upstream.base_url, api_key=UPSTREAM_KEY, max_retries=0
    ).messages.count_tokens(model="big-remote", messages=messages)
    assert via_front.input_tokens == direct.input_tokens
    assert not (via_front.model_extra or {}).get("estimate")


@pytest.mark.skipif(
    not (FIXTURES / "bare.json").is_file(), reason=f"no captured Claude Code requests at {FIXTURES}"
)
def test_claude_code_requests_through_an_anthropic_route(
    front: DaemonProcess, upstream: DaemonProcess
) -> None:
    """Claude Code's own requests (captured), with its headers, through the route."""
    for name, path in (("bare", "/v1/messages"), ("interactive-count-tokens-1", None)):
        capture = json.loads((FIXTURES / f"{name}.json").read_text())
        body = {**capture["body"], "model": "opus-anth-cc"}
        headers = {
            k: v
            for k, v in capture["headers"].items()
            if k.lower() not in {"host", "content-length", "connection", "accept-encoding"}
        }
        with (
            httpx.Client(base_url=front.base_url, timeout=600) as http,
            http.stream("POST", capture["path"], json=body, headers=headers) as r,
        ):
            assert r.status_code == 200, r.read()
            if path is None:  # count_tokens: the upstream's own count
                assert json.loads(r.read())["input_tokens"] > 100
                continue
            kinds = []
            for event in sse_events(r.iter_lines()):
                kinds.append(event["type"])
                if event["type"] == "content_block_delta":
                    break  # enough: the stream runs; hanging up ends it upstream
        assert kinds[0] == "message_start" and "content_block_start" in kinds
    assert "x-anthropic-billing-header" not in upstream.log_text()


# ---- protocol openai ------------------------------------------------------------------------


def test_openai_route_whole_and_streamed(front: DaemonProcess) -> None:
    client = front.client()
    reply = client.messages.create(
        model="opus-oai-1", max_tokens=10, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert reply.model == "opus-oai-1"
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 10
    with client.messages.stream(
        model="opus-oai-1", max_tokens=10, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        deltas = [e.delta.text for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert deltas and "".join(deltas) == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0


def test_openai_tool_call_round_trip(front: DaemonProcess) -> None:
    client = front.client()
    ask: Any = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    forced: Any = {"type": "tool", "name": "get_weather"}
    # Greedy: the small model's sampled strings may hold raw newlines, which are not JSON.
    reply = client.messages.create(
        model="opus-oai-1",
        max_tokens=80,
        extra_body={"temperature": 0},
        tools=[WEATHER],
        tool_choice=forced,
        messages=ask,
    )  # type: ignore[arg-type]
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and len(calls) == 1
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])
    # Streamed: the input_json_delta pieces assemble to the block's input.
    with client.messages.stream(
        model="opus-oai-1",
        max_tokens=80,
        extra_body={"temperature": 0},
        tools=[WEATHER],
        tool_choice=forced,
        messages=ask,
    ) as stream:  # type: ignore[arg-type]
        pieces = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert final.stop_reason == "tool_use" and len(pieces) > 1
    assert json.loads("".join(pieces)) == call.input
    jsonschema.validate(call.input, WEATHER["input_schema"])
    # The round trip: the result goes back as a tool message, and the model answers.
    follow: Any = [
        *ask,
        {"role": "assistant", "content": [c.model_dump() for c in final.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}],
        },
    ]
    answer = client.messages.create(
        model="opus-oai-1", max_tokens=20, tools=[WEATHER], messages=follow
    )  # type: ignore[arg-type]
    assert answer.content and answer.usage.input_tokens > reply.usage.input_tokens


def test_count_tokens_on_openai_route_is_an_estimate(front: DaemonProcess) -> None:
    with front.http() as http:
        r = http.post(
            "/v1/messages/count_tokens",
            json={"model": "opus-oai-1", "messages": [{"role": "user", "content": "Hello there"}]},
        )
    assert r.status_code == 200
    assert r.json()["estimate"] is True and r.json()["input_tokens"] > 0
    assert "tokenizer" in r.headers["pensieve-estimate"]


# ---- failures -------------------------------------------------------------------------------


def _still_serving(front: DaemonProcess) -> None:
    assert front.proc.poll() is None
    assert httpx.get(front.base_url + "/health", timeout=5).json()["status"] == "ok"


def test_upstream_down(front: DaemonProcess) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        front.client().messages.create(
            model="down-1", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
        )
    error = caught.value
    assert error.status_code == 502
    assert error.body["error"]["type"] == "api_error"  # type: ignore[index]
    url = _route_status(front, "down-*")["urls"][0]["url"]
    assert url in str(error.message) and "could not be reached" in str(error.message)
    status = _route_status(front, "down-*")["urls"][0]
    assert status["state"] == "backing_off" and status["errors_by_kind"]["unreachable"] >= 1
    shown = run_ctl("status", config=front.config_path, timeout=30).stdout
    row = next(line for line in shown.splitlines() if line.strip().startswith(url))
    assert "backing_off" in row and re.search(r" [1-9][0-9]* errors", row)
    assert "last error:" in shown and "could not be reached" in shown
    _still_serving(front)


def test_upstream_500(front: DaemonProcess, llama: LlamaServer) -> None:
    # llama-cpp-python's chatml-function-calling handler supports tool_choice auto or a named
    # tool only: `any` (OpenAI's "required") makes it fail with a 500.
    with pytest.raises(anthropic.InternalServerError) as caught:
        front.client().messages.create(
            model="opus-oai-1",
            max_tokens=20,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
        )
    error = caught.value
    assert error.status_code == 502
    assert error.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert f"upstream {llama.base_url}" in str(error.message) and "(500)" in str(error.message)
    _still_serving(front)


def test_upstream_slow_times_out(front: DaemonProcess) -> None:
    started = time.monotonic()
    with pytest.raises(anthropic.InternalServerError) as caught:
        front.client().messages.create(
            model="slow-1", max_tokens=50, messages=[{"role": "user", "content": LONG_PROMPT}]
        )
    error = caught.value
    assert error.status_code == 504
    assert error.body["error"]["type"] == "timeout_error"  # type: ignore[index]
    assert "timeout_ms (100 ms)" in str(error.message)
    assert time.monotonic() - started < 30
    _still_serving(front)


def _hold_stream(
    daemon_url: str, model: str, ready: threading.Event, stop: threading.Event
) -> None:
    """Keep one long streamed request open until `stop` (it occupies a slot meanwhile)."""
    body = {
        "model": model,
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, one number a line."}],
    }
    with (
        httpx.Client(base_url=daemon_url, timeout=120) as http,
        http.stream("POST", "/v1/messages", json=body) as r,
    ):
        for _ in r.iter_lines():
            ready.set()
            if stop.is_set():
                return


def test_upstream_overloaded(front: DaemonProcess, busy_upstream: DaemonProcess) -> None:
    ready, stop = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=_hold_stream, args=(busy_upstream.base_url, "local", ready, stop)
    )
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(anthropic.OverloadedError) as caught:
            front.client().messages.create(
                model="busy-1", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
            )
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert busy_upstream.base_url in str(caught.value.message)
    finally:
        stop.set()
        holder.join(60)
    _still_serving(front)


def test_route_concurrency_limit(front: DaemonProcess) -> None:
    ready, stop = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_stream, args=(front.base_url, "limited-1", ready, stop))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(anthropic.OverloadedError) as caught:
            front.client().messages.create(
                model="limited-1", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
            )
        assert "max_concurrent_requests" in str(caught.value.message)
    finally:
        stop.set()
        holder.join(60)
    assert _route_status(front, "limited-*")["refused"] >= 1


def test_client_disconnect_cancels_the_upstream_request(
    front: DaemonProcess, upstream: DaemonProcess
) -> None:
    # Earlier tests' requests have ended (a held stream ends a moment after its test).
    wait_for(lambda: control_status(upstream.socket_path)["requests"]["in_flight"] == 0, 60)
    before = control_status(upstream.socket_path)["requests"]
    left = ("client closed the stream", "client went away; generation cancelled")
    noticed = sum(upstream.log_text().count(line) for line in left)
    body = {
        "model": "opus-anth-1",
        "max_tokens": 1500,
        "stream": True,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, one number a line."}],
    }
    with (
        httpx.Client(base_url=front.base_url, timeout=60) as http,
        http.stream("POST", "/v1/messages", json=body) as r,
    ):
        seen = 0
        for event in sse_events(r.iter_lines()):
            if event.get("type") == "content_block_delta":
                seen += 1
                if seen >= 3:
                    break  # hang up mid-stream
    # The upstream's own counters: the request ended, long before its 1500 tokens.
    wait_for(lambda: control_status(upstream.socket_path)["requests"]["in_flight"] == 0, 30)
    after = control_status(upstream.socket_path)["requests"]
    assert after["served"] == before["served"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 1000
    # Its log says its client (pensieved) left, so the generation was cut short.
    assert sum(upstream.log_text().count(line) for line in left) == noticed + 1


# ---- several URLs, reloads ------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_two_urls_one_killed(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "u1")
    second = start_daemon(tmp_path / "u2")
    front = start_daemon(
        tmp_path / "front",
        # A back-off longer than the test: a loaded machine must not see it expire.
        {
            "model": {
                "upstreams": {
                    "opus-*": _route([first.base_url, second.base_url], backoff_ms=600_000)
                }
            }
        },
    )
    try:
        client = front.client()
        ask: Any = [{"role": "user", "content": "Hi"}]
        for _ in range(4):
            client.messages.create(model="opus-1", max_tokens=3, messages=ask)
        # Spread by least outstanding: both URLs took requests.
        assert _served(first) >= 1 and _served(second) >= 1
        first.proc.kill()
        first.proc.wait()
        served = _served(second)
        for _ in range(6):  # none fails: a refused connection moves on to the next URL
            reply = client.messages.create(model="opus-1", max_tokens=3, messages=ask)
            assert reply.content
        assert _served(second) == served + 6
        urls = {u["url"]: u for u in _route_status(front, "opus-*")["urls"]}
        dead = urls[first.base_url]
        assert dead["state"] == "backing_off"
        assert dead["errors_by_kind"] == {"unreachable": 1}  # tried once, then skipped
        assert urls[second.base_url]["state"] == "up"
    finally:
        front.stop()
        second.stop()
        first.stop()


@pytest.mark.timeout(600)
def test_reload_repoints_a_route_while_a_stream_is_in_flight(tmp_path: Path) -> None:
    # The first upstream evaluates one prompt chunk at a time, so a stream through it lasts.
    first = start_daemon(tmp_path / "u1", {"model": {"batch_size": 16, "threads": 1}})
    second = start_daemon(tmp_path / "u2")
    front = start_daemon(
        tmp_path / "front", {"model": {"upstreams": {"opus-*": _route(first.base_url)}}}
    )
    try:
        body = {
            "model": "opus-1",
            "max_tokens": 40,
            "stream": True,
            "messages": [{"role": "user", "content": LONG_PROMPT}],
        }
        with (
            httpx.Client(base_url=front.base_url, timeout=120) as http,
            http.stream("POST", "/v1/messages", json=body) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            # The stream has begun at the first upstream...
            wait_for(lambda: control_status(first.socket_path)["requests"]["in_flight"] == 1, 30)
            config = json.loads(front.config_path.read_text())
            config["model"]["upstreams"]["opus-*"]["urls"] = [second.base_url]
            write_config(front.config_path, config)
            result = control_reload(front.socket_path)
            assert result["ok"], result
            assert _route_status(front, "opus-*")["urls"][0]["url"] == second.base_url
            assert control_status(first.socket_path)["requests"]["in_flight"] == 1
            # ...and ends there, complete, after the reload.
            events = list(sse_events(lines))
        assert events[-1]["type"] == "message_stop"
        assert not any(e["type"] == "error" for e in events)
        assert _served(first) == 1
        # New requests follow the new route.
        front.client().messages.create(
            model="opus-1", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
        assert _served(second) == 1 and _served(first) == 1
    finally:
        front.stop()
        second.stop()
        first.stop()


@pytest.mark.timeout(600)
def test_a_stream_waiting_for_its_upstream_is_kept_alive(tmp_path: Path) -> None:
    # One slot, and its own keep-alive far away: a queued request hears nothing from it.
    queued = start_daemon(
        tmp_path / "u", {"model": {"slots": 1}, "server": {"keepalive_ping_s": 120}}
    )
    front = start_daemon(
        tmp_path / "front",
        {
            "model": {"upstreams": {"q-*": _route(queued.base_url)}},
            "server": {"keepalive_ping_s": 0.3},
        },
    )
    ready, stop = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_stream, args=(queued.base_url, "local", ready, stop))
    holder.start()
    try:
        assert ready.wait(120)
        body = {
            "model": "q-1",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        lines = []
        with (
            httpx.Client(base_url=front.base_url, timeout=300) as http,
            http.stream("POST", "/v1/messages", json=body) as r,
        ):
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if lines.count(": waiting for the upstream") == 2:
                    stop.set()  # the slot frees, and the queued request runs
        first_event = next(i for i, line in enumerate(lines) if line.startswith("event:"))
        assert lines[:first_event].count(": waiting for the upstream") >= 2
        events = list(sse_events(lines))
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    finally:
        stop.set()
        holder.join(120)
        front.stop()
        queued.stop()


# ---- Chat Completions on an upstream route --------------------------------------------------


def _openai_client(front: DaemonProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{front.base_url}/v1", api_key="client-key", max_retries=0)


@pytest.mark.parametrize("model", ["opus-oai-1", "opus-anth-1"])
def test_chat_completions_through_either_protocol(
    front: DaemonProcess, upstream: DaemonProcess, model: str
) -> None:
    # Whatever the route's protocol, the upstream's own /v1/chat/completions answers: the
    # llama-cpp-python server for one route, the upstream pensieved for the other.
    before_up = _served(upstream)
    client = _openai_client(front)
    messages = [{"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model=model, max_tokens=8, messages=messages)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(model=model, max_tokens=8, messages=messages, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    served_upstream = _served(upstream) - before_up
    assert served_upstream == (2 if model == "opus-anth-1" else 0)


def test_chat_completions_upstream_down_is_an_openai_error(front: DaemonProcess) -> None:
    import openai

    with pytest.raises(openai.InternalServerError) as caught:
        _openai_client(front).chat.completions.create(
            model="down-1", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict) and "could not be reached" in body["message"]
    _still_serving(front)


def test_metrics_show_each_upstream_url(front: DaemonProcess, upstream: DaemonProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    front.client().messages.create(
        model="opus-anth-1", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
    )
    with front.http() as http:
        page = http.get("/metrics", headers={"x-api-key": "test-key"})
    assert page.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
    }
    labels = (("route", "opus-anth-*"), ("url", upstream.base_url))
    assert samples[("pensieve_upstream_requests_total", labels)] >= 1
    assert samples[("pensieve_upstream_up", labels)] == 1
    assert samples[("pensieve_upstream_latency_ms", labels)] > 0
    # Every configured URL is listed, the one never reached too.
    assert any(k[0] == "pensieve_upstream_up" and ("route", "down-*") in k[1] for k in samples)
