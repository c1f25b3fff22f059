"""The benchmark's workloads, each run on every target in the same session.

Repetitions alternate between targets (A, B, A, B ...) instead of running one target's
repetitions back to back, so that load from other processes on a shared machine hits both
sides alike and the ratios stay meaningful even when the absolute figures drift.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.targets import InProcess, ServerProcess, StreamResult, stream_message

STORY_SUBJECTS = ("dragon", "lighthouse keeper", "robot", "sailing ship", "mountain village")


def story_prompt(subject: str = "dragon") -> str:
    # At temperature 0 the bundled model keeps writing these until max_tokens.
    return f"Write a very long story about a {subject}."


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def decode_rate(result: StreamResult) -> float | None:
    """Tokens per second between the first and the last text delta (prompt excluded)."""
    if len(result.delta_times) < 2 or result.output_tokens < 2:
        return None
    span = result.delta_times[-1] - result.delta_times[0]
    return (result.output_tokens - 1) / span if span > 0 else None


def body(
    messages: list[dict[str, str]], max_tokens: int, system: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": messages,
    }
    if system is not None:
        data["system"] = system
    return data


# ---- 1. decode throughput ------------------------------------------------------------------


def run_decode(
    servers: Sequence[ServerProcess],
    inprocess: InProcess | None,
    *,
    tokens: int,
    reps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {s.name: [] for s in servers}
    produced: dict[str, list[int]] = {s.name: [] for s in servers}
    messages = [{"role": "user", "content": story_prompt()}]
    if inprocess is not None:
        rates["llama-cpp-python chat"] = []
        rates["llama-cpp-python raw loop"] = []
        produced["llama-cpp-python chat"] = []
    for rep in range(reps):
        for server in rotate(servers, rep):
            result = stream_message(server.port, body(messages, tokens))
            rate = decode_rate(result)
            if rate is not None:
                rates[server.name].append(rate)
            produced[server.name].append(result.output_tokens)
            log(f"decode {server.name} rep {rep}: {result.output_tokens} tokens, {rate or 0:.1f}/s")
        if inprocess is not None:
            result = inprocess.chat_stream(messages, tokens)
            rate = decode_rate(result)
            if rate is not None:
                rates["llama-cpp-python chat"].append(rate)
            produced["llama-cpp-python chat"].append(result.output_tokens)
            per_token = inprocess.raw_decode(story_prompt(), tokens)
            rates["llama-cpp-python raw loop"].append(1 / per_token)
            log(f"decode in-process rep {rep}: chat {rate or 0:.1f}/s, raw {1 / per_token:.1f}/s")
    return {
        "max_tokens": tokens,
        "tokens_per_s": {name: median(values) for name, values in rates.items()},
        "runs": rates,
        "output_tokens": produced,
    }


# ---- 2. time to first token with a long shared prefix --------------------------------------


def long_system_prompt(nonce: str, target_tokens: int, count: Callable[[str], int]) -> str:
    """A Claude-Code-like system prompt: instructions plus many tool descriptions as text.

    `nonce` leads the prompt so that different conversations share no cached prefix.
    """
    head = (
        f"Session {nonce}. You are a coding agent working in a repository. Follow the "
        "instructions, use the tools below to read and change files, and answer briefly.\n\n"
        "# Tools\n"
    )
    tools: list[str] = []
    i = 0
    text = head
    while count(text) < target_tokens:
        spec = {
            "name": f"tool_{i}",
            "description": f"Tool number {i}: reads, searches or edits files; see the "
            "parameters for the exact arguments. Returns the result as text.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "file path, relative"},
                    "pattern": {"type": "string", "description": f"pattern {i} to look for"},
                    "limit": {"type": "integer", "description": "most results to return"},
                },
                "required": ["path"],
            },
        }
        tools.append(json.dumps(spec))
        i += 1
        if i % 8 == 0:
            text = head + "\n".join(tools)
    return head + "\n".join(tools)


USER_TURNS = (
    "Look at the failing test in tests/test_parser.py and tell me why it fails.",
    "Good. Now propose a fix for the tokenizer so that escaped quotes are handled.",
    "Apply the fix and run the tests again. What is the output?",
    "Now update the changelog with a short note about this fix.",
    "Finally, summarise everything you changed in two sentences.",
    "One more thing: is there any other place with the same bug?",
)
ASSISTANT_TURN = (
    "I read the file and ran the test. The tokenizer treats an escaped quote as the end of "
    "the string, so the parser sees an unterminated literal and raises. The fix is to skip "
    "the character after a backslash inside string literals."
)


def conversation(turn: int) -> list[dict[str, str]]:
    """Turn `turn` (1-based) of a fixed conversation: history plus a new user message."""
    messages: list[dict[str, str]] = []
    for i in range(turn):
        messages.append({"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]})
        if i < turn - 1:
            messages.append({"role": "assistant", "content": ASSISTANT_TURN})
    return messages


@dataclass
class TurnTiming:
    kind: str  # cold, warm, warm_interleaved
    ttft_s: float
    input_tokens: int
    cache_read_tokens: int


def ttft_session(
    server: ServerProcess, systems: tuple[str, str], *, turns: int
) -> list[TurnTiming]:
    """Conversation A alone (cold turn 1, warm turns 2..), then A and B interleaved."""
    a, b = systems
    timings: list[TurnTiming] = []

    def ask(system: str, turn: int, kind: str) -> None:
        result = stream_message(server.port, body(conversation(turn), 8, system))
        timings.append(
            TurnTiming(kind, result.ttft_s, result.input_tokens, result.cache_read_tokens)
        )

    ask(a, 1, "cold")
    for turn in range(2, turns + 1):
        ask(a, turn, "warm")
    ask(b, 1, "cold")
    for turn in range(turns + 1, turns + 3):
        ask(a, turn, "warm_interleaved")
        ask(b, turn - turns + 1, "warm_interleaved")
    return timings


def run_ttft(
    servers: Sequence[ServerProcess],
    inprocess: InProcess | None,
    *,
    prefix_tokens: int,
    turns: int,
    reps: int,
    count: Callable[[str], int],
    log: Callable[[str], None],
) -> dict[str, Any]:
    by_kind: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    tokens: dict[str, dict[str, list[tuple[int, int]]]] = {s.name: {} for s in servers}
    for rep in range(reps):
        for server in rotate(servers, rep):
            nonce = f"{server.name}-{rep}-{time.time_ns()}"
            systems = (
                long_system_prompt(f"A-{nonce}", prefix_tokens, count),
                long_system_prompt(f"B-{nonce}", prefix_tokens, count),
            )
            for timing in ttft_session(server, systems, turns=turns):
                by_kind[server.name].setdefault(timing.kind, []).append(timing.ttft_s)
                tokens[server.name].setdefault(timing.kind, []).append(
                    (timing.input_tokens, timing.cache_read_tokens)
                )
            log(
                f"ttft {server.name} rep {rep}: "
                + ", ".join(
                    f"{kind} {median(values) or 0:.3f}s"
                    for kind, values in by_kind[server.name].items()
                )
            )
    report: dict[str, Any] = {
        "prefix_tokens_target": prefix_tokens,
        "turns": turns,
        "ttft_s": {
            name: {kind: median(values) for kind, values in kinds.items()}
            for name, kinds in by_kind.items()
        },
        "runs": by_kind,
        "tokens_input_and_cached": tokens,
    }
    pensieve = tokens.get("pensieved", {})
    if inprocess is not None and pensieve:
        # The floor for a warm turn: evaluating only the tokens the cache did not hold.
        floors: dict[str, Any] = {}
        for kind in ("warm", "warm_interleaved"):
            pairs = pensieve.get(kind, [])
            if not pairs:
                continue
            cached = int(statistics.median(c for _, c in pairs))
            # Anthropic's usage: input_tokens are the uncached ones, the prompt is both.
            new = int(statistics.median(i for i, _ in pairs))
            floors[kind] = {
                "cached_tokens": cached,
                "new_tokens": new,
                "eval_new_tokens_s": inprocess.eval_suffix_s(cached, max(new, 1)),
            }
        pairs = pensieve.get("cold", [])
        if pairs:
            n = int(statistics.median(i + c for i, c in pairs))
            floors["cold"] = {
                "cached_tokens": 0,
                "new_tokens": n,
                "eval_new_tokens_s": inprocess.eval_suffix_s(0, n, repeats=1),
            }
        report["in_process_eval_floor"] = floors
    return report


# ---- 3. concurrent clients -----------------------------------------------------------------


def concurrent_round(server: ServerProcess, clients: int, tokens: int) -> dict[str, Any]:
    def one(i: int) -> StreamResult:
        subject = STORY_SUBJECTS[i % len(STORY_SUBJECTS)]
        messages = [{"role": "user", "content": story_prompt(subject)}]
        return stream_message(server.port, body(messages, tokens))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - started
    total = sum(r.output_tokens for r in results)
    return {
        "aggregate_tokens_per_s": total / wall,
        "ttft_s": [r.ttft_s for r in results],
        "per_client_tokens_per_s": [r.output_tokens / r.total_s for r in results],
        "output_tokens": [r.output_tokens for r in results],
    }


def run_concurrency(
    servers: Sequence[ServerProcess],
    *,
    client_counts: Sequence[int],
    tokens: int,
    reps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    report: dict[str, Any] = {"max_tokens": tokens, "by_clients": {}}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for server in servers:
                server.sample_rss()
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for clients in client_counts:
            rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for rep in range(reps):
                for server in rotate(servers, rep):
                    result = concurrent_round(server, clients, tokens)
                    rounds[server.name].append(result)
                    log(
                        f"concurrency {clients} {server.name} rep {rep}: "
                        f"{result['aggregate_tokens_per_s']:.1f} tok/s aggregate"
                    )
            summary: dict[str, Any] = {}
            for name, results in rounds.items():
                ttfts = [t for r in results for t in r["ttft_s"]]
                per_client = [t for r in results for t in r["per_client_tokens_per_s"]]
                summary[name] = {
                    "aggregate_tokens_per_s": median(
                        [r["aggregate_tokens_per_s"] for r in results]
                    ),
                    "ttft_p50_s": percentile(ttfts, 0.5),
                    "ttft_p90_s": percentile(ttfts, 0.9),
                    "ttft_max_s": max(ttfts) if ttfts else None,
                    "slowest_client_tokens_per_s": min(per_client) if per_client else None,
                    "runs": results,
                }
            report["by_clients"][str(clients)] = summary
    finally:
        stop.set()
        sampler.join()
    return report


def rotate(servers: Sequence[ServerProcess], rep: int) -> list[ServerProcess]:
    """Alternate which target goes first, so neither always runs on a 'fresher' machine."""
    items = list(servers)
    if not items:
        return items
    shift = rep % len(items)
    return items[shift:] + items[:shift]
