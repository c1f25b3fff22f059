"""`pensievectl status`: is the daemon running, and how is it doing."""

from __future__ import annotations

import json
import time
from typing import Any

from pensievectl.context import Context
from pensievectl.errors import CtlError, ExitStatus, exit_status_for


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def describe_reload(result: dict[str, Any] | None) -> str:
    if not result:
        return "none since start"
    when = time.strftime("%H:%M:%S", time.localtime(result["time"]))
    changed = ", ".join(c["key"] for c in result.get("changes", [])) or "no changes"
    if result["ok"]:
        loading = "; loading the new model" if result.get("model_loading") else ""
        return f"{when} ({result['trigger']}) ok: {changed}{loading}"
    return f"{when} ({result['trigger']}) FAILED: {result['error']}"


def _cache_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    """KV memory and slot contents; decode batching and its Python overhead."""
    rows = []
    per_slot = model.get("kv_bytes_per_slot")
    if per_slot:
        cached = ", ".join(str(n) for n in model.get("cached_tokens", []))
        rows.append(
            (
                "kv cache",
                f"{human_bytes(per_slot)} per slot, {human_bytes(per_slot * model['slots'])} "
                f"in all; tokens cached per slot: {cached}",
            )
        )
    decode = model.get("decode")
    if decode and decode["steps"]:
        steps = decode["steps"]
        rows.append(
            (
                "decoding",
                f"{steps} batches, {decode['tokens'] / steps:.1f} tokens each; "
                f"{decode['llama_s'] / steps * 1000:.1f} ms in llama.cpp and "
                f"{decode['python_s'] / steps * 1e6:.0f} us in Python per batch",
            )
        )
    return rows


def format_status(s: dict[str, Any]) -> str:
    state = s["state"]
    serving = "serving" if state == "ready" else f"NOT serving ({state})"
    lines = [
        f"pensieved {s['version']} is running, {serving}: pid {s['pid']}, "
        f"up {human_duration(s['uptime_s'])}"
    ]
    http = s["http"]
    listen = http["url"] or f"not listening ({http['error']})"
    rows: list[tuple[str, str]] = [("listening", listen), ("socket", s["socket_path"])]
    config = s["config_file"]
    if s.get("config_error"):
        config += "  INVALID, running on the previous (or default) config:\n" + s["config_error"]
    rows.append(("config", config))
    if s.get("log_file"):
        rows.append(("log file", s["log_file"]))
    model = s.get("model")
    if model:
        rows.append(
            (
                "model",
                f"{model['name']} ({model['path']}), {human_bytes(model['size_bytes'])}, "
                f"context {model['context_size']}, gpu layers {model['gpu_layers']}, "
                f"{model['threads']} threads, {model['slots']} slots",
            )
        )
        rows += _cache_rows(model)
    else:
        rows.append(("model", "none loaded"))
    if s.get("model_loading"):
        rows.append(("loading", s["model_loading"]))
    if s.get("error"):
        rows.append(("error", s["error"]))
    if s.get("aliases"):
        rows.append(("aliases", ", ".join(f"{k} -> {v}" for k, v in s["aliases"].items())))
    proc = s["process"]
    rows.append(
        (
            "resources",
            f"{human_bytes(proc['rss_bytes'])} resident, CPU {proc['cpu_percent']:.1f}% "
            f"({proc['cpu_time_s']:.1f} s in total), {proc['threads']} threads",
        )
    )
    req = s["requests"]
    rows.append(
        (
            "requests",
            f"{req['served']} served, {req['in_flight']} in flight ({req['running']} running, "
            f"{req['queued']} queued), {req['tokens_generated']} tokens generated",
        )
    )
    rows.append(("last reload", describe_reload(s.get("last_reload"))))
    width = max(len(label) for label, _ in rows) + 1
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)


def run_status(ctx: Context, as_json: bool) -> int:
    try:
        status = ctx.client(timeout=5.0).status()
    except CtlError as exc:
        code = exit_status_for(exc)
        if as_json:
            state = "not_running" if code == ExitStatus.NOT_RUNNING else "unknown"
            payload = {
                "running": False if code == ExitStatus.NOT_RUNNING else None,
                "state": state,
                "socket_path": str(ctx.socket_path),
                "message": str(exc),
            }
            ctx.say(json.dumps(payload, indent=2))
        else:
            ctx.note(str(exc))
        # LSB: 3 not running, 4 unknown.
        return int(code if code in (ExitStatus.NOT_RUNNING, ExitStatus.UNKNOWN) else 4)
    if as_json:
        ctx.say(json.dumps({"running": True, **status}, indent=2))
    else:
        ctx.say(format_status(status))
    return ExitStatus.OK
