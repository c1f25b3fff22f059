"""`--claude-code --architectures`: does turn N of a conversation read its prompt from the
cache on every kind of model, and what does a sliding-window model's cache cost?

Three models: the bundled SmolLM2 (full attention), Gemma 3 270M (sliding-window attention)
and a tiny random-weight LFM2 (hybrid: recurrent state plus attention; tests/tiny_models.py).
On each, pensieved and llama-server (`--ctx-checkpoints` at its default and at 0) hold a
conversation on a ~2,000-token system prompt for `TURNS` turns. Each turn's prompt carries the
previous reply in a form of its own, as Claude Code's does (the thinking dropped), so it
leaves the cache where that reply starts: only a checkpoint, or a cache that can be cut there,
keeps the prefix.

Per turn: TTFT and the share of the prompt read from the cache; turn N's TTFT over the time
to evaluate its new tokens alone after its cached ones and sample (llama-cpp-python in
process, nothing else running: the floor). Then Gemma 3's
KV memory at 32k, one slot, with the small window cache plus its checkpoints and with the
full-size window cache (pensieved's `status`, llama.cpp's own buffer sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.targets import (
    InProcess,
    ServerProcess,
    Settings,
    start_llama_server,
    start_pensieved,
    stream_message,
)

TURNS = 3
SYSTEM = " ".join(
    f"Rule {i}: keep the project's files tidy and explain every change you make."
    for i in range(120)
)
QUESTIONS = ("Which file should I edit first?", "And then?", "Why that one?", "Anything else?")
CONTEXT = 32_768
GEMMA_TEMPLATE = (("chat_template", "gemma"),)


def conversation(server: ServerProcess, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """`TURNS` turns; each one's TTFT and cache use."""
    messages: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for n in range(TURNS):
        messages.append({"role": "user", "content": QUESTIONS[n]})
        body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "system": SYSTEM}
        result = stream_message(server.port, {**body, "messages": messages})
        read = result.cache_read_tokens
        prompt = result.input_tokens + read
        turns.append(
            {
                "ttft_s": result.ttft_s,
                "prompt_tokens": prompt,
                "cache_read_tokens": read,
                "read_share": read / prompt if prompt else None,
            }
        )
        log(f"{server.name} turn {n + 1}: {result.ttft_s:.2f}s, read {read}/{prompt}")
        kept = f"(reply {n + 1}, as the client keeps it)"
        messages.append({"role": "assistant", "content": kept})
    return turns


def status_kv(server: ServerProcess) -> dict[str, Any]:
    from pensieve.client import ControlClient

    assert server.workdir is not None
    status = ControlClient(server.workdir / "ctl.sock").request("GET", "/v1/status")
    kv: dict[str, Any] = status["model"]["kv"]
    return kv


def run(
    models: dict[str, Path],
    settings: Settings,
    binary: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every model on every target, then Gemma's KV memory; a failed target keeps its error."""
    one = replace(settings, slots=1, context_size=CONTEXT)
    results: dict[str, Any] = {}
    for kind, path in models.items():
        extra = GEMMA_TEMPLATE if kind == "swa" else ()
        targets: list[tuple[str, Callable[[], ServerProcess]]] = [
            ("pensieved", partial(start_pensieved, path, replace(one, pensieved_model=extra)))
        ]
        if binary is not None:
            for flag in ("default", "0"):
                args = () if flag == "default" else ("--ctx-checkpoints", "0")
                side = replace(one, llama_args=args)
                starter = partial(start_llama_server, binary, path, side)
                targets.append((f"llama-server ctx-checkpoints {flag}", starter))
        for name, start in targets:
            key = f"{kind}: {name}"
            log(f"starting {key}")
            try:
                server = start()
            except RuntimeError as exc:
                results[key] = {"error": f"did not start: {str(exc)[:300]}"}
                continue
            server.name = key
            try:
                results[key] = {"turns": conversation(server, log)}
                if name == "pensieved":
                    kv = status_kv(server)
                    results[key]["strategy"] = kv["cache_strategy"]
                    results[key]["architecture"] = kv["architecture"]
            except Exception as exc:  # one target's failure must not lose the others'
                log(f"{key} failed: {exc!r}")
                results[key] = {"error": repr(exc)[:300]}
            finally:
                server.stop()
        try:
            mine = {k: r for k, r in results.items() if k.startswith(f"{kind}: ")}
            floors(path, one, mine, log)
        except Exception as exc:  # the reuse figures stand without the floor
            log(f"{kind}: no in-process floor: {exc!r}")
    results["gemma_kv_32k"] = gemma_memory(models["swa"], one, log)
    return results


def floors(
    path: Path, settings: Settings, results: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Each target's last turn over the time llama-cpp-python takes to evaluate that turn's
    new tokens after its cached ones, in process and alone on the machine."""
    inprocess = InProcess(
        path,
        threads=settings.threads,
        context_size=settings.context_size,
        batch_size=settings.batch_size,
        flash_attention=settings.flash_attention,
    )
    try:
        for key, result in results.items():
            if "turns" not in result:
                continue
            last = result["turns"][-1]
            cached = int(last["cache_read_tokens"])
            new = int(last["prompt_tokens"]) - cached
            alone = inprocess.eval_suffix_s(cached, new)
            last["new_tokens_alone_s"] = alone
            last["ttft_over_new_tokens_alone"] = float(last["ttft_s"]) / alone
            log(f"{key}: {new} new tokens after {cached} take {alone:.2f}s alone")
    finally:
        inprocess.close()


def gemma_memory(path: Path, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Gemma 3's KV memory at 32k, one slot: `auto` (and why), and the full-size window cache;
    the checkpoints a conversation left are counted with the small cache."""
    out: dict[str, Any] = {}
    for label, swa_full in (("auto", "auto"), ("full", True)):
        side = replace(settings, pensieved_model=(*GEMMA_TEMPLATE, ("swa_full", swa_full)))
        server = start_pensieved(path, side)
        try:
            conversation(server, log)
            kv = status_kv(server)
            out[label] = {
                "strategy": kv["cache_strategy"],
                "reason": kv["cache_strategy_reason"],
                "allocated_bytes": kv["allocated_bytes"],
                "checkpoint_bytes": kv["checkpoint_bytes"],
                "total_bytes": kv["allocated_bytes"] + kv["checkpoint_bytes"],
            }
        finally:
            server.stop()
    out["small_over_full"] = out["auto"]["total_bytes"] / out["full"]["total_bytes"]
    return out


def table(report: dict[str, Any]) -> str:
    rows = [
        "| model: target | strategy | turn-1 TTFT | turn-N TTFT | turn-N read from cache | "
        "turn-N TTFT / new tokens alone |",
        "|---|---|---|---|---|---|",
    ]
    results = report["results"]
    for key, result in results.items():
        if key == "gemma_kv_32k":
            continue
        if "error" in result:
            rows.append(f"| {key} | error: {result['error'][:80]} | | | | |")
            continue
        first, last = result["turns"][0], result["turns"][-1]
        ratio = last.get("ttft_over_new_tokens_alone")
        rows.append(
            f"| {key} | {result.get('strategy', '-')} | {first['ttft_s']:.2f} s "
            f"({first['prompt_tokens']} tokens) | {last['ttft_s']:.2f} s | "
            f"{last['cache_read_tokens']}/{last['prompt_tokens']} "
            f"({100 * (last['read_share'] or 0):.0f} %) | "
            + (f"{ratio:.2f}" if ratio is not None else "-")
            + " |"
        )
    memory = results.get("gemma_kv_32k")
    lines = [f"# Turn-N cache reuse by architecture\n\n{report['preamble']}\n", *rows, ""]
    if memory:
        mib = 1024 * 1024
        lines += [
            "Gemma 3 270M, KV memory at 32k tokens, one slot:\n",
            f"- `swa_full auto`: {memory['auto']['strategy']}, "
            f"{memory['auto']['allocated_bytes'] / mib:.0f} MiB cache + "
            f"{memory['auto']['checkpoint_bytes'] / mib:.0f} MiB checkpoints "
            f"({memory['auto']['reason']})",
            f"- `swa_full true`: {memory['full']['allocated_bytes'] / mib:.0f} MiB",
            f"- small + checkpoints over full: {memory['small_over_full']:.2f}",
            "",
        ]
    return "\n".join(lines)
