"""`--claude-code`: an agent's sessions on one shared prefix, what they cost in time and KV.

Built from a captured Claude Code request (its system prompt and ~20k tokens of tools): every
session of a project sends the same system and tools, with a different conversation after
them. Measured on each target, in this order:
1. cold first-token time (nothing cached);
2. turn-2 first-token time (the same session continued);
3. a new session in the same project: same system and tools, another first message;
4. four sessions at once, each a new first message: their aggregate decode rate, and the KV
   memory the target has allocated (pensieved: `status`; llama-server: its log).

Targets: pensieved's shared cache with each `--kv-types` cache type, and its f16 cache per slot;
llama-server with `-np` slots, unified (`--kv-unified`) and not. A cold prefill of ~20k tokens
takes minutes on a CPU, so each target runs the sequence once; the report says so.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.targets import ServerProcess, Settings, StreamResult, stream_events, stream_message

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "claude-code"
FIXTURE = FIXTURE / "default-tools.json"
FIRST = "Say hello"
# About as many new tokens as a new session brings (its first message, and the ~1,500 tokens
# of agent list Claude Code sends after it), so turn 2 is the reference for "evaluating only
# the new tokens" at the same depth, in a slot that already holds the prefix.
SECOND = "Here is the build log; say which step failed.\n" + "".join(
    f"step {i}: compiled src/module_{i}.c in {i % 7 + 1} ms, no warnings\n" for i in range(68)
)
NEW_SESSION = "Explain in two sentences what this repository is for."
CONCURRENT = (
    "Write a long story about a dragon.",
    "Write a long story about a lighthouse keeper.",
    "Write a long story about a robot.",
    "Write a long story about a sailing ship.",
)
# The fields of the captured body both servers take; the rest (metadata, thinking, beta
# context management) change nothing about the prompt.
KEEP = ("model", "system", "tools", "messages")


def load_request(path: Path) -> dict[str, Any] | None:
    """The captured request's body, or None when the file is absent."""
    if not path.is_file():
        return None
    body = json.loads(path.read_text())["body"]
    return {k: body[k] for k in KEEP if k in body}


def with_first_message(base: dict[str, Any], text: str, max_tokens: int) -> dict[str, Any]:
    """`base` with its user's first typed message replaced by `text` (the system reminder and
    everything else kept): a new session of the same project."""
    body = copy.deepcopy(base)
    first = body["messages"][0]
    blocks = first["content"]
    if isinstance(blocks, str):
        first["content"] = text
    else:
        typed = [b for b in blocks if b.get("type") == "text" and b.get("text") == FIRST]
        target = typed[-1] if typed else blocks[-1]
        target["text"] = text
    return {**body, "max_tokens": max_tokens, "temperature": 0}


def tools_as_text(body: dict[str, Any]) -> dict[str, Any]:
    """For llama-server: the tools written into the system prompt as JSON.

    Its chat template for a model without a tool format drops `tools` (the bundled model's
    request came to ~3,000 tokens instead of ~20,000); as text, its prompt is about as long as
    pensieved's, which renders the tools itself. Both sides report their prompt's tokens.
    """
    tools = body.get("tools")
    if not tools:
        return body
    system = body.get("system") or []
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    blocks.append({"type": "text", "text": "# Tools\n" + json.dumps(tools)})
    return {k: v for k, v in body.items() if k != "tools"} | {"system": blocks}


def continued(body: dict[str, Any], reply: str, text: str, max_tokens: int) -> dict[str, Any]:
    """Turn 2: the first request, its reply, and a new user message."""
    messages = [
        *body["messages"],
        {"role": "assistant", "content": reply or "Hello!"},
        {"role": "user", "content": text},
    ]
    return {**body, "messages": messages, "max_tokens": max_tokens}


def kv_bytes(server: ServerProcess, computed: int | None = None) -> dict[str, Any]:
    """What the target has allocated for its KV cache, and (pensieved) what is in use."""
    if server.name.startswith("pensieved") and server.workdir is not None:
        from pensieve.client import ControlClient

        status = ControlClient(server.workdir / "ctl.sock").request("GET", "/v1/status")
        model = status["model"]
        kv = model["kv"]
        return {
            "allocated_bytes": kv["allocated_bytes"],
            "used_bytes": kv["cells_used"] * kv["bytes_per_token"],
            "cells_used": kv["cells_used"],
            "cells_shared": kv["cells_shared"],
            "bytes_per_token": kv["bytes_per_token"],
            "one_session_bytes": model["kv_bytes_per_slot"],
            "per_slot_tokens": [s["tokens"] for s in kv["slots"]],
        }
    try:
        log = server.log_path.read_text(errors="replace")
    except OSError:
        log = ""
    logged = llama_server_kv_bytes(log)
    # llama-server logs its buffers only at a verbose level; its cache is --ctx-size cells.
    return {"allocated_bytes": logged or computed, "from": "log" if logged else "ctx-size"}


def llama_server_kv_bytes(log: str) -> int | None:
    """llama.cpp's own account of its KV buffers, from the server's log."""
    sizes = re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", log)
    return round(sum(float(s) for s in sizes) * 1024 * 1024) if sizes else None


def timed(result: StreamResult) -> dict[str, Any]:
    return {
        "ttft_s": result.ttft_s,
        "input_tokens": result.input_tokens,
        "cache_read_tokens": result.cache_read_tokens,
        "output_tokens": result.output_tokens,
        "total_s": result.total_s,
    }


def concurrent(server: ServerProcess, base: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Four new sessions at once; aggregate decode over the span all of them generate."""
    results: list[tuple[float, list[float], int]] = []
    lock = threading.Lock()

    def one(text: str) -> None:
        sent = time.perf_counter()
        deltas: list[float] = []
        produced = 0
        for at, event in stream_events(server.port, with_first_message(base, text, tokens)):
            kind = event.get("type")
            if kind == "content_block_delta":
                deltas.append(sent + at)
            elif kind == "message_delta":
                produced = int((event.get("usage") or {}).get("output_tokens") or 0)
        with lock:
            results.append((sent, deltas, produced or len(deltas)))

    threads = [threading.Thread(target=one, args=(text,)) for text in CONCURRENT]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = min(d[0] for _, d, _ in results if d)
    last = max(d[-1] for _, d, _ in results if d)
    total = sum(n for _, _, n in results)
    return {
        "sessions": len(results),
        "output_tokens": total,
        "aggregate_tokens_per_s": total / (last - first) if last > first else None,
        "wall_s": last - min(s for s, _, _ in results),
    }


def run_target(
    server: ServerProcess,
    base: dict[str, Any],
    *,
    tokens: int,
    log: Callable[[str], None],
    kv_computed: int | None = None,
) -> dict[str, Any]:
    if not server.name.startswith("pensieved"):
        base = tools_as_text(base)
    first_body = with_first_message(base, FIRST, 16)
    cold = stream_message(server.port, first_body, timeout=7200)
    log(f"{server.name}: cold {cold.ttft_s:.1f}s for {cold.input_tokens} tokens")
    second = stream_message(server.port, continued(first_body, cold.text, SECOND, 16), timeout=7200)
    log(f"{server.name}: turn 2 {second.ttft_s:.2f}s")
    new = stream_message(server.port, with_first_message(base, NEW_SESSION, 16), timeout=7200)
    log(f"{server.name}: new session {new.ttft_s:.2f}s")
    four = concurrent(server, base, tokens)
    log(f"{server.name}: 4 sessions {four['aggregate_tokens_per_s'] or 0:.1f} tokens/s")
    result = {
        "cold": timed(cold),
        "turn2": timed(second),
        "new_session": timed(new),
        "four_sessions": four,
        "kv": kv_bytes(server, kv_computed),
    }
    result["ratios"] = target_ratios(result)
    return result


def target_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The goals' ratios for one target (None where the target does not report a figure)."""
    turn2, new = result["turn2"], result["new_session"]

    def fresh(r: dict[str, Any]) -> int:
        # Messages API usage: input_tokens are the ones not read from the cache.
        return int(r["input_tokens"])

    ratios: dict[str, Any] = {}
    # The new session against evaluating only its new tokens, at the same depth: the
    # continued session's first-token time per new token, times the new session's count.
    if fresh(turn2) and fresh(new):
        per_token = turn2["ttft_s"] / fresh(turn2)
        ratios["new_session_over_new_tokens_only"] = new["ttft_s"] / (per_token * fresh(new))
    kv = result["kv"]
    if kv.get("one_session_bytes"):
        ratios["kv_allocated_over_one_session"] = kv["allocated_bytes"] / kv["one_session_bytes"]
        cold = result["cold"]
        one = (cold["input_tokens"] + cold["cache_read_tokens"]) * kv["bytes_per_token"]
        ratios["kv_used_over_one_session_used"] = kv["used_bytes"] / one
    return ratios


def sides(settings: Settings, kv_types: list[str]) -> list[tuple[str, Settings, str]]:
    """(name, settings, kind) of every target: pensieved per cache type (its shared cache:
    this workload is about sharing), llama-server two ways."""
    out = [
        (f"pensieved {t}", replace(settings, kv_cache_type=t, kv_unified=True), "pensieved")
        for t in kv_types
    ]
    if "f16" in kv_types:  # the layout `auto` picks on a CPU when it fits, for comparison
        per_slot = replace(settings, kv_cache_type="f16", kv_unified=False)
        out.append(("pensieved f16 per slot", per_slot, "pensieved"))
    out.append(("llama-server unified", replace(settings, llama_unified=True), "llama-server"))
    out.append(("llama-server", replace(settings, llama_unified=False), "llama-server"))
    return out


def _over(a: Any, b: Any, *path: str) -> float | None:
    """Target `a`'s figure at `path` over target `b`'s; None when `b`'s is missing or 0."""
    for key in path:
        a, b = a[key], b[key]
    return float(a or 0) / b if b else None


def compare(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios across targets: q8_0 against f16, the shared cache against a cache per slot,
    pensieved against llama-server."""
    targets = {k: v for k, v in report["targets"].items() if "error" not in v}
    out: dict[str, float | None] = {}
    decode, kv = ("four_sessions", "aggregate_tokens_per_s"), ("kv", "allocated_bytes")
    f16, q8 = targets.get("pensieved f16"), targets.get("pensieved q8_0")
    per_slot = targets.get("pensieved f16 per slot")
    if f16 and q8:
        out["q8_0_decode_over_f16"] = _over(q8, f16, *decode)
        out["q8_0_kv_over_f16"] = _over(q8, f16, *kv)
    if f16 and per_slot:
        out["shared_f16_decode_over_per_slot"] = _over(f16, per_slot, *decode)
        out["shared_f16_kv_over_per_slot"] = _over(f16, per_slot, *kv)
        out["new_session_ttft_shared_f16_over_per_slot"] = _over(
            f16, per_slot, "new_session", "ttft_s"
        )
    for name in ("llama-server unified", "llama-server"):
        other = targets.get(name)
        if not (f16 and other):
            continue
        label = name.replace(" ", "_")
        out[f"pensieved_f16_kv_over_{label}"] = _over(f16, other, *kv)
        for step in ("cold", "turn2", "new_session"):
            out[f"{step}_ttft_pensieved_f16_over_{label}"] = _over(f16, other, step, "ttft_s")
    return {key: value for key, value in out.items() if value is not None}


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Claude Code workload: one shared prefix, four sessions",
        "",
        f"{m['cpu']}, {m['physical_cpus']} cores ({m['logical_cpus']} threads), "
        f"{m['memory_bytes'] / 1024**3:.0f} GB; {m['platform']}; llama-cpp-python "
        f"{m['llama_cpp_python']}. Model {Path(report['model']['path']).name}; "
        f"{s['threads']} threads, {s['slots']} slots x {s['context_size']} tokens, batch "
        f"{s['batch_size']}, flash attention {s['flash_attention']}. One run per target (a "
        "cold prefill takes minutes); the machine was shared, load average "
        f"{m['load_average_at_start'][0]:.1f} at the start.",
        "",
        "| target | cold TTFT | turn-2 TTFT | new session TTFT | 4 sessions decode | "
        "KV allocated |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in report["targets"].items():
        if "error" in t:
            lines.append(f"| {name} | {t['error']} | | | | |")
            continue
        kv = t["kv"].get("allocated_bytes")
        lines.append(
            f"| {name} | {t['cold']['ttft_s']:.1f} s ({t['cold']['input_tokens']} tokens) | "
            f"{t['turn2']['ttft_s']:.2f} s | {t['new_session']['ttft_s']:.2f} s | "
            f"{t['four_sessions']['aggregate_tokens_per_s'] or 0:.1f} tokens/s | "
            f"{kv / 1024**2:.0f} MB |"
            if kv
            else f"| {name} | {t['cold']['ttft_s']:.1f} s | {t['turn2']['ttft_s']:.2f} s | "
            f"{t['new_session']['ttft_s']:.2f} s | "
            f"{t['four_sessions']['aggregate_tokens_per_s'] or 0:.1f} tokens/s | ? |"
        )
    lines += ["", "Ratios:", ""]
    for name, t in report["targets"].items():
        for key, value in (t.get("ratios") or {}).items():
            lines.append(f"- {name}: {key} = {value:.2f}")
    for key, value in report["ratios"].items():
        lines.append(f"- {key} = {value:.2f}")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"
