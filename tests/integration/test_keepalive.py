"""A stream that has nothing to say yet (long prompt evaluation) sends keep-alive pings."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx2 as httpx

from tests.integration.daemon import sse_events, start_daemon

WORDS = " ".join(f"item{n}" for n in range(400))
# Over 1,000 prompt tokens: several decode steps of evaluation before the first token.
LONG_PROMPT = {
    "model": "m",
    "max_tokens": 3,
    "messages": [{"role": "user", "content": f"Summarise: {WORDS}"}],
}


def test_pings_while_a_long_prompt_is_evaluated(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, {"server": {"keepalive_ping_s": 0.05}, "model": {"slots": 1}})
    try:
        body = {**LONG_PROMPT, "stream": True}
        with d.http() as http:
            r = http.post("/v1/messages", json=body)
        assert r.status_code == 200
        events = list(sse_events(r.text.splitlines()))
        names = [e["type"] for e in events]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        first_block = names.index("content_block_start")
        assert "ping" in names[1:first_block], names
        assert events[0]["message"]["usage"]["input_tokens"] > 1000
    finally:
        assert d.stop() == 0


def test_a_stream_waiting_to_start_sends_comments_then_opens_with_message_start(
    tmp_path: Path,
) -> None:
    # A new request starts between two decode steps; while another request's long prompt is
    # evaluated, a step takes a while, and its stream may not open (message_start) before
    # then. Keep-alives must not come first as `ping` events.
    d = start_daemon(tmp_path, {"server": {"keepalive_ping_s": 0.05}, "model": {"slots": 2}})
    try:
        long_prompt = LONG_PROMPT
        short = {**long_prompt, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        evaluating = threading.Event()

        def hold(client: httpx.Client) -> None:
            body = {**long_prompt, "stream": True}
            with client.stream("POST", "/v1/messages", json=body) as held:
                for line in held.iter_lines():
                    # message_start: it has its slot, and its prompt evaluation begins.
                    if line == "event: message_start":
                        evaluating.set()

        with d.http() as first, d.http() as second:
            holder = threading.Thread(target=hold, args=(first,))
            holder.start()
            assert evaluating.wait(60)
            r = second.post("/v1/messages", json=short)
            holder.join()
        assert r.status_code == 200
        lines = r.text.splitlines()
        assert lines[0].startswith(":"), lines[:3]  # kept alive, as an SSE comment
        names = [e["type"] for e in sse_events(lines)]
        assert names[0] == "message_start" and names[-1] == "message_stop", names
    finally:
        assert d.stop() == 0
