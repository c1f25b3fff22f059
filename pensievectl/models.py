"""`pensievectl models`: which models the config names, which are loaded, and loading or
unloading one by hand (Pensieve's `ollama ps` and `ollama list`)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from pensieve.client import NotRunningError, StaleSocketError
from pensieve.exitcodes import CtlExit
from pensievectl.context import CommandContext
from pensievectl.status import human_bytes, human_duration, speculation_summary

if TYPE_CHECKING:
    from pensieve.wire import ModelEntryStatus, ModelsResponse

# A load reads the weights and the saved KV caches: minutes for a large model on a slow disk.
ACTION_TIMEOUT_S = 900.0


def _ago(stamp: float | None, now: float) -> str:
    return "-" if stamp is None else f"{human_duration(max(0.0, now - stamp))} ago"


def _row(m: ModelEntryStatus, now: float) -> list[str]:
    loaded = m.state == "loaded"
    return [
        m.file,
        m.state,
        _ago(m.since, now),
        human_bytes(m.memory_bytes) if loaded else "-",
        str(m.cached_tokens) if loaded else "-",
        f"{m.disk_cached_tokens} ({human_bytes(m.disk_cache_bytes)})"
        if m.disk_cached_tokens
        else "0",
        _ago(m.last_used, now),
        dialect_text(m),
        _cache(m),
        ", ".join(m.names) or "-",
    ]


def dialect_text(m: ModelEntryStatus) -> str:
    """The tool dialect and how it was chosen, e.g. `qwen3-xml (detected)`."""
    if m.tool_dialect is None:
        return "-"
    return f"{m.tool_dialect} ({m.tool_dialect_source})"


def _cache(m: ModelEntryStatus) -> str:
    """Architecture and cache strategy (docs/caching.md), known once the model is loaded."""
    kv = m.model.kv if m.model is not None else None
    if kv is None:
        return "-"
    return f"{kv.architecture}: {kv.cache_strategy}"


def format_models(reply: ModelsResponse, now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = [
        "MODEL",
        "STATE",
        "SINCE",
        "MEMORY",
        "CACHED",
        "ON DISK",
        "LAST USE",
        "TOOL DIALECT",
        "CACHE",
        "SERVES",
    ]
    rows = [header] + [_row(m, now) for m in reply.models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    idle = reply.idle_unload_s
    policy = f"idle unload after {human_duration(idle)}" if idle > 0 else "no idle unload"
    lines.append(f"({policy}; at most {reply.max_loaded_models} loaded at once)")
    for m in reply.models:
        if m.error:
            lines.append(f"{m.file}: {m.error}")
        if m.model is not None:
            lines.append(
                f"{m.file}: speculation: {speculation_summary(m.model.decode.speculation)}"
            )
    return "\n".join(lines)


def run_models(ctx: CommandContext, as_json: bool) -> int:
    """The configured models (from the daemon), then those downloaded into the Hugging Face
    cache; with the daemon down, the downloaded ones before the error."""
    from pensievectl.downloads import downloaded, format_downloaded

    try:
        reply = ctx.client(timeout=10.0).models()
    except (NotRunningError, StaleSocketError):
        if not as_json:
            ctx.say(format_downloaded(downloaded()))
        raise
    if as_json:
        ctx.say(json.dumps(reply.model_dump(mode="json"), indent=2))
    else:
        ctx.say(format_models(reply))
        ctx.say("")
        ctx.say(format_downloaded(downloaded()))
    return CtlExit.OK


def run_model_action(ctx: CommandContext, action: str, name: str, as_json: bool) -> int:
    """Load or unload the model `name` denotes; a failure raises (exit 1, 3 or 4)."""
    reply = ctx.client(timeout=ACTION_TIMEOUT_S).model_action(action, name)
    if as_json:
        ctx.say(json.dumps(reply.model_dump(mode="json"), indent=2))
        return CtlExit.OK
    done = "loaded" if action == "load" else "unloaded"
    model = reply.model
    detail = ""
    if action == "load" and model.memory_bytes:
        detail = f", {human_bytes(model.memory_bytes)}"
    elif action == "unload" and model.disk_cached_tokens:
        detail = f", {model.disk_cached_tokens} tokens of KV cache saved on disk"
    ctx.say(f"{model.file} {done} in {reply.seconds:.1f} s{detail}")
    return CtlExit.OK
