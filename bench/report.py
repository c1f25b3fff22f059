"""Ratios against the same-run references, the issue's goals, and the Markdown table."""

from __future__ import annotations

import statistics
from typing import Any

MB = 1024 * 1024


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _paired(runs: dict[str, list[float]]) -> float | None:
    ours, theirs = runs.get("pensieved") or [], runs.get("llama-server") or []
    if not ours or len(ours) != len(theirs):
        return None
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    rates = _get(report, "decode", "tokens_per_s") or {}
    ttft = _get(report, "ttft", "ttft_s") or {}
    floor = _get(report, "ttft", "in_process_eval_floor") or {}
    pv, ls = ttft.get("pensieved", {}), ttft.get("llama-server", {})
    out: dict[str, Any] = {
        "decode_vs_llama_server": _div(rates.get("pensieved"), rates.get("llama-server")),
        # Each repetition runs both back to back: the median of those pairs' ratios is less
        # sensitive to the machine's speed drifting between repetitions.
        "decode_vs_llama_server_paired": _paired(_get(report, "decode", "runs") or {}),
        "decode_vs_llama_cpp_python_chat": _div(
            rates.get("pensieved"), rates.get("llama-cpp-python chat")
        ),
        "decode_vs_raw_loop": _div(rates.get("pensieved"), rates.get("llama-cpp-python raw loop")),
        "ttft_cold_vs_llama_server": _div(pv.get("cold"), ls.get("cold")),
        "ttft_warm_vs_llama_server": _div(pv.get("warm"), ls.get("warm")),
        "ttft_warm_interleaved_vs_llama_server": _div(
            pv.get("warm_interleaved"), ls.get("warm_interleaved")
        ),
        "ttft_warm_vs_eval_new_tokens": _div(
            pv.get("warm"), _get(floor, "warm", "eval_new_tokens_s")
        ),
        "ttft_warm_interleaved_vs_eval_new_tokens": _div(
            pv.get("warm_interleaved"), _get(floor, "warm_interleaved", "eval_new_tokens_s")
        ),
        "ttft_cold_vs_eval_prompt": _div(pv.get("cold"), _get(floor, "cold", "eval_new_tokens_s")),
    }
    pensieve_rate, raw_rate = rates.get("pensieved"), rates.get("llama-cpp-python raw loop")
    if pensieve_rate and raw_rate:
        out["python_overhead_ms_per_token"] = 1000 / pensieve_rate - 1000 / raw_rate
    by_clients = _get(report, "concurrency", "by_clients") or {}
    for clients, summary in by_clients.items():
        out[f"aggregate_{clients}_clients_vs_llama_server"] = _div(
            _get(summary, "pensieved", "aggregate_tokens_per_s"),
            _get(summary, "llama-server", "aggregate_tokens_per_s"),
        )
    memory = report.get("memory") or {}
    peak = _get(memory, "pensieved", "rss_peak_under_load_bytes")
    if peak:
        kv = memory.get("pensieved_kv_bytes") or memory.get("kv_bytes_total") or 0
        out["pensieved_rss_beyond_model_and_kv_mb"] = (
            peak - memory.get("model_file_bytes", 0) - kv
        ) / MB
        other = _get(memory, "llama-server", "rss_peak_under_load_bytes")
        if other:
            out["pensieved_minus_llama_server_peak_rss_mb"] = (peak - other) / MB
    out["goals"] = goals(out)
    return out


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured ratio and whether this run met it."""
    items = [
        ("decode throughput >= 0.95 x llama-server", r.get("decode_vs_llama_server"), 0.95, ">="),
        (
            "warm turn-N TTFT <= 1.2 x evaluating only the new tokens",
            r.get("ttft_warm_vs_eval_new_tokens"),
            1.2,
            "<=",
        ),
        (
            "warm TTFT with an interleaved conversation <= 1.2 x the new tokens",
            r.get("ttft_warm_interleaved_vs_eval_new_tokens"),
            1.2,
            "<=",
        ),
        ("cold TTFT <= 1.05 x llama-server cold", r.get("ttft_cold_vs_llama_server"), 1.05, "<="),
        (
            "4 clients aggregate >= 0.9 x llama-server (4 slots)",
            r.get("aggregate_4_clients_vs_llama_server"),
            0.9,
            ">=",
        ),
        (
            "memory beyond model file and KV cache < 150 MB",
            r.get("pensieved_rss_beyond_model_and_kv_mb"),
            150,
            "<",
        ),
    ]
    out = []
    for name, value, bound, op in items:
        met = None
        if value is not None:
            met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
        out.append({"goal": name, "measured": value, "met": met})
    return out


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def table(report: dict[str, Any]) -> str:
    r = report.get("ratios", {})
    m = report.get("machine", {})
    s = report.get("settings", {})
    lines = [
        "# Pensieve benchmark",
        "",
        f"{m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, "
        f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB; {m.get('platform')}; "
        f"Python {m.get('python')}, llama-cpp-python {m.get('llama_cpp_python')}; "
        f"load average {_f((m.get('load_average_at_start') or [None])[0], 1)} at start, "
        f"{_f((m.get('load_average_at_end') or [None])[0], 1)} at end.",
        f"Model {report.get('model', {}).get('path', '').rsplit('/', 1)[-1]}; threads "
        f"{s.get('threads')}, {s.get('slots')} slots x {s.get('context_size')} tokens, "
        f"flash attention {s.get('flash_attention', 'off')}; medians of {s.get('reps')} runs "
        f"({s.get('decode_reps', s.get('reps'))} for decode, "
        f"{s.get('concurrency_reps', s.get('reps'))} for concurrency). llama-server: "
        f"{report.get('llama_server', {}).get('status')}.",
        "",
        "## Goals (ratios against references measured in the same run)",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
    ]
    for goal in r.get("goals", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {_f(goal['measured'])} | {met} |")
    lines += ["", "## Figures", "", "| measurement | pensieved | llama-server | in-process |"]
    lines.append("| --- | --- | --- | --- |")
    rates = _get(report, "decode", "tokens_per_s") or {}
    lines.append(
        f"| decode tok/s ({_get(report, 'decode', 'max_tokens')} tokens, streamed) | "
        f"{_f(rates.get('pensieved'), 1)} | {_f(rates.get('llama-server'), 1)} | "
        f"chat {_f(rates.get('llama-cpp-python chat'), 1)}, "
        f"raw loop {_f(rates.get('llama-cpp-python raw loop'), 1)} |"
    )
    ttft = _get(report, "ttft", "ttft_s") or {}
    floor = _get(report, "ttft", "in_process_eval_floor") or {}
    for kind in ("cold", "warm", "warm_interleaved"):
        f = floor.get(kind) or {}
        lines.append(
            f"| TTFT {kind.replace('_', ' ')} (s) | {_f(_get(ttft, 'pensieved', kind), 3)} | "
            f"{_f(_get(ttft, 'llama-server', kind), 3)} | eval of {f.get('new_tokens', 'n/a')} "
            f"new tokens after {f.get('cached_tokens', 'n/a')}: "
            f"{_f(f.get('eval_new_tokens_s'), 3)} |"
        )
    for clients, summary in (_get(report, "concurrency", "by_clients") or {}).items():
        pv, ls = summary.get("pensieved", {}), summary.get("llama-server", {})
        lines.append(
            f"| {clients} clients: aggregate tok/s; TTFT p50 / p90 / max (s) | "
            f"{_f(pv.get('aggregate_tokens_per_s'), 1)}; {_f(pv.get('ttft_p50_s'))} / "
            f"{_f(pv.get('ttft_p90_s'))} / {_f(pv.get('ttft_max_s'))} | "
            f"{_f(ls.get('aggregate_tokens_per_s'), 1)}; {_f(ls.get('ttft_p50_s'))} / "
            f"{_f(ls.get('ttft_p90_s'))} / {_f(ls.get('ttft_max_s'))} | |"
        )
    memory = report.get("memory") or {}
    for label, key in (
        ("RSS idle after load (MB)", "rss_idle_after_load_bytes"),
        ("RSS peak under load (MB)", "rss_peak_under_load_bytes"),
    ):
        pv_v, ls_v = _get(memory, "pensieved", key), _get(memory, "llama-server", key)
        lines.append(
            f"| {label} | {_f(pv_v / MB if pv_v else None, 0)} | "
            f"{_f(ls_v / MB if ls_v else None, 0)} | |"
        )
    startup = report.get("startup_s") or {}
    lines.append(
        f"| start to ready (s) | {_f(startup.get('pensieved'))} | "
        f"{_f(startup.get('llama-server'))} | |"
    )
    decode = report.get("pensieved_decode_stats") or {}
    lines += [
        "",
        f"Decode rate, median of per-repetition ratios: "
        f"{_f(r.get('decode_vs_llama_server_paired'))} x llama-server. "
        f"pensieved's decode loop over the whole run: {decode.get('steps', 'n/a')} batches, "
        f"{_f(decode.get('tokens_per_batch'), 1)} tokens each, "
        f"{_f(decode.get('llama_ms_per_batch'), 2)} ms in llama.cpp and "
        f"{_f(decode.get('python_us_per_batch'), 0)} us in Python per batch. "
        f"Rate difference against the bare in-process eval/sample loop: "
        f"{_f(r.get('python_overhead_ms_per_token'), 2, ' ms')} per token. "
        f"Model file {_f((memory.get('model_file_bytes') or 0) / MB, 0)} MB, KV cache "
        f"{_f((memory.get('kv_bytes_total') or 0) / MB, 0)} MB for all slots in llama-server, "
        f"{_f((memory.get('pensieved_kv_bytes') or 0) / MB, 0)} MB in pensieved.",
    ]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
