"""`--grammar`: what constraining output to Claude Code's tool set costs.

Two measurements, both on the tools Claude Code really sends (a captured request):
- building and parsing the tool-call grammar, cold (nothing cached) and cached (what every
  later turn of a session pays), in-process with the model's vocabulary;
- decode rate over HTTP on pensieved: a forced tool call under the grammar against free text
  (no grammar) and free text with the lazy grammar of `tool_choice: auto`, the same prompt and
  model in the same run, repetitions interleaved.
"""

from __future__ import annotations

import copy
import http.client
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.claude_code import FIXTURE
from bench.targets import ServerProcess, stream_events

CLAUDE_CODE_TOOLS = FIXTURE  # the same captured request as the Claude Code workload
# One prompt for all three requests, so each finds the whole prompt in the KV cache: a story
# the bundled model keeps writing, into a file for the forced call (`Write`'s `content`).
PROMPT = "Write a very long story about a dragon into the file /tmp/dragon.txt."
FORCED_TOOL = "Write"


def load_tools(path: Path) -> list[dict[str, Any]] | None:
    """`body.tools` of a captured Claude Code request, or None when the file is absent."""
    if not path.is_file():
        return None
    tools = json.loads(path.read_text())["body"]["tools"]
    return list(tools)


def without_descriptions(node: Any) -> Any:
    """The tools minus their prose: the grammar is the same (descriptions never reach it),
    and the prompt fits a small model's context."""
    if isinstance(node, dict):
        return {
            k: without_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---- build and parse -----------------------------------------------------------------------


def build_times(tools: list[dict[str, Any]], model: Path, *, reps: int) -> dict[str, Any]:
    """Seconds from a request's tools to a grammar sampler ready to sample, cold and cached."""
    import llama_cpp

    from pensieved.engine import grammar as grammar_module
    from pensieved.engine.gbnf import grammar_size
    from pensieved.engine.grammar import request_grammar
    from pensieved.engine.grammar_cache import GrammarCache
    from pensieved.engine.llama import Vocab
    from pensieved.engine.types import GenerationRequest, ToolSpec

    specs = tuple(ToolSpec(t["name"], "", t.get("input_schema") or {}) for t in tools)
    request = GenerationRequest(messages=(), max_tokens=1, tools=specs)
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    vocab = Vocab(llm._model.vocab)
    cold: list[float] = []
    built: list[float] = []
    cached: list[float] = []
    clone: list[float] = []
    grammar: str | None = None
    try:
        for _ in range(reps):
            grammar_module._tool_grammar_cached.cache_clear()
            cache = GrammarCache(vocab)
            started = time.perf_counter()
            grammar, lazy = request_grammar(request)
            middle = time.perf_counter()
            assert grammar is not None
            parsed = cache.get(grammar, lazy=lazy)
            assert parsed is not None, "llama.cpp refused the grammar"
            parsed.clone().close()
            cold.append(time.perf_counter() - started)
            built.append(middle - started)
            for _ in range(20):
                started = time.perf_counter()
                grammar, lazy = request_grammar(request)
                assert grammar is not None
                parsed = cache.get(grammar, lazy=lazy)
                assert parsed is not None
                before_clone = time.perf_counter()
                parsed.clone().close()
                done = time.perf_counter()
                cached.append(done - started)
                clone.append(done - before_clone)
            cache.close()
    finally:
        llm.close()
    assert grammar is not None
    size = grammar_size(grammar)
    return {
        "tools": len(tools),
        "grammar_bytes": size.byte_count,
        "grammar_depth": size.depth,
        "grammar_rules": size.rules,
        "cold_s": _median(cold),
        "cold_python_build_s": _median(built),
        "cached_s": _median(cached),
        "cached_clone_s": _median(clone),
        "runs": {"cold_s": cold, "cached_s": cached},
    }


# ---- sampling cost per token ----------------------------------------------------------------


def sampling_costs(
    tools: list[dict[str, Any]], model: Path, *, threads: int, tokens: int
) -> dict[str, Any]:
    """Milliseconds per token spent sampling a forced call in-process, three ways on the same
    model: no grammar, the grammar first in llama.cpp's chain (every candidate checked), and
    pensieved's `Sampler` (the grammar checks the chain's pick). Greedy, so the last two must
    produce the same tokens."""
    import llama_cpp

    from pensieved.engine.grammar import request_grammar
    from pensieved.engine.grammar_cache import GrammarCache
    from pensieved.engine.llama import ContextHandle, Vocab
    from pensieved.engine.sampler import Sampler, _chain
    from pensieved.engine.types import GenerationRequest, Sampling, ToolChoice, ToolSpec

    specs = tuple(ToolSpec(t["name"], "", t.get("input_schema") or {}) for t in tools)
    forced = ToolChoice("tool", FORCED_TOOL, parallel=False)
    grammar, lazy = request_grammar(
        GenerationRequest(messages=(), max_tokens=1, tools=specs, tool_choice=forced)
    )
    assert grammar is not None
    greedy = Sampling(temperature=0.0)
    llm: Any = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    cache = GrammarCache(Vocab(llm._model.vocab))
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)

    def run(pick: Callable[[ContextHandle], int]) -> tuple[list[int], float, float]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        sampling = decoding = 0.0
        for _ in range(tokens):
            started = time.perf_counter()
            token = pick(ContextHandle(llm.ctx))
            middle = time.perf_counter()
            llm.eval([token])
            sampling += middle - started
            decoding += time.perf_counter() - middle
            out.append(token)
        return out, sampling / tokens * 1000, decoding / tokens * 1000

    try:
        parsed = cache.get(grammar, lazy=lazy)
        assert parsed is not None
        free = _chain(greedy, 1)
        first = _chain(greedy, 1, parsed.clone())
        checked = Sampler(greedy, parsed, seed=1, n_vocab=llm.n_vocab())
        try:
            _, free_ms, decode_ms = run(lambda ctx: free.sample(ctx, -1))
            first_out, first_ms, _ = run(lambda ctx: first.sample(ctx, -1))
            checked_out, checked_ms, _ = run(lambda ctx: checked.sample(ctx, -1))
        finally:
            free.close()
            first.close()
            checked.close()
    finally:
        cache.close()
        llm.close()
    return {
        "tokens": tokens,
        "threads": threads,
        "decode_ms_per_token": decode_ms,
        "sample_ms_per_token": {
            "no_grammar": free_ms,
            "grammar_first": first_ms,
            "grammar_checked_after": checked_ms,
        },
        "refused_first_picks": checked.resampled,
        "whole_vocabulary_steps": checked.full,
        "same_tokens": first_out == checked_out,
    }


# ---- decode rate ---------------------------------------------------------------------------


@dataclass
class Timed:
    """One streamed reply: its tokens and the time from message_start to message_stop."""

    output_tokens: int
    span_s: float
    stop_reason: str | None
    blocks: list[str]

    @property
    def rate(self) -> float:
        return self.output_tokens / self.span_s if self.span_s > 0 else 0.0


def stream_timed(port: int, body: dict[str, Any]) -> Timed:
    """A streamed request, timed from message_start (sent before the prompt is evaluated;
    with the prompt cached, one token) to message_stop: the decode loop, tool call or not."""
    start = stop = 0.0
    tokens = 0
    reason: str | None = None
    blocks: list[str] = []
    for at, event in stream_events(port, body):
        kind = event.get("type")
        if kind == "message_start":
            start = at
        elif kind == "content_block_start":
            blocks.append(event["content_block"]["type"])
        elif kind == "message_delta":
            tokens = int((event.get("usage") or {}).get("output_tokens") or 0)
            reason = (event.get("delta") or {}).get("stop_reason")
        elif kind == "message_stop":
            stop = at
    return Timed(tokens, stop - start, reason, blocks)


def decode_bodies(tools: list[dict[str, Any]], max_tokens: int) -> dict[str, dict[str, Any]]:
    """The three requests compared: the same prompt and tools, only tool_choice differs."""

    def body(choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": "claude-sonnet-4-5",
            "max_tokens": max_tokens,
            "temperature": 0,
            "tools": tools,
            "tool_choice": choice,
            "messages": [{"role": "user", "content": PROMPT}],
        }

    return {
        "free_text": body({"type": "none"}),
        "forced_tool_call": body({"type": "tool", "name": FORCED_TOOL}),
        "auto_free_text": body({"type": "auto"}),
    }


def decode_rates(
    server: ServerProcess,
    tools: list[dict[str, Any]],
    *,
    tokens: int,
    reps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Tokens per second of each request, all of the same length: that of the forced call
    (which may end before `tokens`), so that per-request costs weigh the same on each."""
    bodies = decode_bodies(tools, tokens)
    length = tokens
    for name, body in bodies.items():  # warm: the prompt in the KV cache, the grammar parsed
        result = stream_timed(server.port, body)
        log(f"grammar warm-up {name}: {result.output_tokens} tokens, {result.blocks}")
        if name == "forced_tool_call":
            length = max(result.output_tokens, 2)
    bodies = decode_bodies(tools, length)
    rates: dict[str, list[float]] = {name: [] for name in bodies}
    produced: dict[str, list[int]] = {name: [] for name in bodies}
    blocks: dict[str, list[str]] = {}
    names = list(bodies)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            result = stream_timed(server.port, bodies[name])
            rates[name].append(result.rate)
            produced[name].append(result.output_tokens)
            blocks[name] = result.blocks
            log(
                f"grammar decode {name} rep {rep}: {result.output_tokens} tokens, "
                f"{result.rate:.1f}/s, {result.stop_reason}"
            )
    medians = {name: _median(values) for name, values in rates.items()}
    free = medians["free_text"] or 0.0
    return {
        "max_tokens": length,
        "tokens_per_s": medians,
        "forced_over_free": (medians["forced_tool_call"] or 0.0) / free if free else None,
        "auto_over_free": (medians["auto_free_text"] or 0.0) / free if free else None,
        "runs": rates,
        "output_tokens": produced,
        "content_blocks": blocks,
    }


def prompt_tokens(server: ServerProcess, body: dict[str, Any]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    payload = {k: v for k, v in body.items() if k not in ("max_tokens", "temperature")}
    conn.request(
        "POST",
        "/v1/messages/count_tokens",
        body=json.dumps(payload).encode(),
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
    )
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return int(data.get("input_tokens") or 0)


def table(report: dict[str, Any]) -> str:
    build = report["build"]
    decode = report["decode"]
    rates = decode["tokens_per_s"]
    forced = decode["forced_over_free"] or 0.0
    lines = [
        f"Grammar benchmark, {report['generated_at']}: {build['tools']} Claude Code tools "
        f"({build['grammar_bytes']:,} bytes of GBNF, {build['grammar_rules']:,} rules, "
        f"nested {build['grammar_depth']} deep), {report['model']['path']}",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
        f"| grammar for the tool set, cached < 50 ms | {build['cached_s'] * 1000:.2f} ms "
        f"(cold {build['cold_s'] * 1000:.0f} ms) | {'yes' if build['cached_s'] < 0.05 else 'no'} |",
        f"| forced tool call decode ≥ 0.9 x free text | {forced:.2f} "
        f"({rates['forced_tool_call'] or 0:.1f} vs {rates['free_text'] or 0:.1f} tok/s) "
        f"| {'yes' if forced >= 0.9 else 'no'} |",
        "",
        f"Free text with `tool_choice: auto` (lazy grammar, not triggered): "
        f"{rates['auto_free_text'] or 0:.1f} tok/s ({decode['auto_over_free'] or 0:.2f} x free "
        f"text). Cold: {build['cold_python_build_s'] * 1000:.0f} ms building the grammar in "
        f"Python, the rest parsing it in llama.cpp; cached: {build['cached_clone_s'] * 1000:.2f} "
        f"ms of that is copying the parsed grammar for the request. Prompt: "
        f"{report['prompt_tokens']:,} tokens (the tools without their descriptions), "
        f"{decode['max_tokens']} tokens generated, medians of {report['settings']['reps']} runs.",
        "",
    ]
    sampling = report.get("sampling")
    if sampling:
        ms = sampling["sample_ms_per_token"]
        lines += [
            f"Sampling cost per token, in-process ({sampling['threads']} thread(s), "
            f"{sampling['tokens']} tokens of the forced call, greedy): decoding "
            f"{sampling['decode_ms_per_token']:.1f} ms; sampling without a grammar "
            f"{ms['no_grammar']:.2f} ms, with the grammar first in llama.cpp's chain "
            f"{ms['grammar_first']:.2f} ms, with the grammar checking the pick (pensieved) "
            f"{ms['grammar_checked_after']:.2f} ms. The grammar refused "
            f"{sampling['refused_first_picks']} first picks; "
            f"{sampling['whole_vocabulary_steps']} needed the whole vocabulary. Same tokens "
            f"both ways: {'yes' if sampling['same_tokens'] else 'NO'}.",
            "",
        ]
    return "\n".join(lines)


def run(
    tools_path: Path,
    model: Path,
    start: Callable[[], ServerProcess],
    *,
    tokens: int,
    reps: int,
    build_reps: int,
    threads: int,
    sample_tokens: int = 64,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """The grammar report, or None (after saying why) when there are no captured tools."""
    tools = load_tools(tools_path)
    if tools is None:
        log(f"grammar benchmark skipped: no captured Claude Code request at {tools_path}")
        return None
    report: dict[str, Any] = {"tools_file": str(tools_path)}
    report["build"] = build_times(tools, model, reps=build_reps)
    log(
        f"grammar build: cold {report['build']['cold_s'] * 1000:.1f} ms, "
        f"cached {report['build']['cached_s'] * 1000:.2f} ms"
    )
    report["sampling"] = sampling_costs(tools, model, threads=threads, tokens=sample_tokens)
    log(f"grammar sampling: {report['sampling']}")
    short = without_descriptions(copy.deepcopy(tools))
    server = start()
    try:
        report["prompt_tokens"] = prompt_tokens(server, decode_bodies(short, 1)["free_text"])
        log(f"grammar decode prompt: {report['prompt_tokens']} tokens")
        report["decode"] = decode_rates(server, short, tokens=tokens, reps=reps, log=log)
    finally:
        server.stop()
    return report
