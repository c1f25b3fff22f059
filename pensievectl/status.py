"""`pensievectl status`: is the daemon running, and how is it doing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pensieve.activity import read_activity
from pensieve.exitcodes import CtlExit
from pensieve.postmortem import (
    Death,
    describe_work,
    examine,
    journal_until_exit,
    log_tail,
    signal_from_log,
    signal_name,
)
from pensieve.runrecord import RunRecord, activity_path
from pensievectl.context import CommandContext
from pensievectl.errors import CtlError, exit_status_for

if TYPE_CHECKING:
    from pensieve.wire import (
        KvStatus,
        ModelStatus,
        PreviousExit,
        ReloadResult,
        SpeculationStatus,
        StatusResponse,
    )


def examine_dead(record: RunRecord, exit_status: int | None = None) -> Death:
    """How the daemon of a record left behind died (see `pensieve.postmortem`)."""
    log_text = None
    if record.log_path is None and record.supervisor == "systemd":
        log_text = _journal()
    activity = read_activity(activity_path(Path(record.config_path)))
    return examine(record, activity, exit_status=exit_status, log_text=log_text)


def _journal() -> str | None:
    from pensievectl.service import journal_text

    text = journal_text()
    return journal_until_exit(text) if text is not None else None


def _fill_in_from_journal(previous: PreviousExit) -> None:
    """A predecessor under systemd logged to the journal, which the daemon does not read:
    find its signal and last lines there."""
    if previous.supervisor != "systemd" or previous.log_file:
        return
    if previous.signal is not None or previous.exit_code is not None:
        return
    text = _journal()
    if not text:
        return
    number = signal_from_log(text)
    if number is not None:
        previous.signal, previous.signal_name = number, signal_name(number)
        previous.cause = f"died by signal {number} ({signal_name(number)})"
    previous.log_tail = log_tail(text)
    previous.log_file = "journalctl --user -u pensieved"


def _previous_exit_rows(previous: PreviousExit) -> list[tuple[str, str]]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous.started_at))
    text = f"pid {previous.pid} (started {when}) {previous.cause}"
    if previous.work:
        text += "; it was running:" + "".join(
            f"\n    {describe_work(w.model_dump(), live=False)}" for w in previous.work
        )
    else:
        text += "; no request was running"
    if previous.log_tail:
        text += f"\n    last lines of its log ({previous.log_file}):"
        text += "".join(f"\n      {line}" for line in previous.log_tail)
    return [("previous run", text)]


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


def describe_reload(result: ReloadResult | None) -> str:
    if not result:
        return "none since start"
    when = time.strftime("%H:%M:%S", time.localtime(result.time))
    changed = ", ".join(c.key for c in result.changes) or "no changes"
    if result.ok:
        loading = "; loading the new model" if result.model_loading else ""
        return f"{when} ({result.trigger}) ok: {changed}{loading}"
    return f"{when} ({result.trigger}) FAILED: {result.error}"


def _kv_rows(kv: KvStatus) -> list[tuple[str, str]]:
    """The KV cache: size, layout and type, use and sharing, each slot's real cost."""
    per_slot = ", ".join(f"{slot.tokens} ({human_bytes(slot.cost_bytes)})" for slot in kv.slots)
    layout = "shared by all slots" if kv.unified else "a cache per slot"
    rows = [
        (
            "kv cache",
            f"{human_bytes(kv.allocated_bytes)} for {kv.pool_cells} tokens, {layout}, "
            f"{kv.cache_type} ({human_bytes(kv.bytes_per_token)} per token), flash attention "
            f"{kv.flash_attention}",
        ),
        (
            "kv in use",
            f"{kv.cells_used} cells, {kv.cells_shared} of them shared; tokens (real cost) per "
            f"slot: {per_slot}",
        ),
        ("sizes", f"{kv.sizing}; budget {human_bytes(kv.budget_bytes)}"),
        ("architecture", f"{kv.architecture}; cache strategy {kv.cache_strategy}"),
    ]
    held = [slot for slot in kv.slots if slot.checkpoints.count]
    if held or kv.cache_strategy.endswith("checkpoints"):
        where = "; ".join(
            f"slot {slot.slot}: {slot.checkpoints.count} at "
            + ", ".join(str(p) for p in slot.checkpoints.positions)
            for slot in held
        )
        rows.append(
            ("checkpoints", f"{human_bytes(kv.checkpoint_bytes)}" + (f"; {where}" if where else ""))
        )
    if kv.warning:
        rows.append(("WARNING", kv.warning))
    return rows


def speculation_summary(spec: SpeculationStatus) -> str:
    """What speculative decoding runs and what it has earned, in one line."""
    line = spec.note or spec.mode
    if spec.tokens_per_step:
        line += (
            f"; {spec.tokens_per_step:.2f} tokens per step, {spec.gained} tokens gained "
            f"({spec.accepted} of {spec.drafted} drafted accepted, "
            f"{spec.acceptance_rate:.0%}; {spec.forced} forced by a grammar)"
        )
    return line


def _cache_rows(model: ModelStatus) -> list[tuple[str, str]]:
    """KV memory and slot contents; decode batching and its Python overhead."""
    rows = []
    per_slot = model.kv_bytes_per_slot
    kv = model.kv
    if kv is not None:
        rows += _kv_rows(kv)
    elif per_slot:
        cached = ", ".join(str(n) for n in model.cached_tokens)
        rows.append(
            (
                "kv cache",
                f"{human_bytes(per_slot)} per slot, {human_bytes(per_slot * model.slots)} "
                f"in all; tokens cached per slot: {cached}",
            )
        )
    decode = model.decode
    if decode.steps:
        steps = decode.steps
        rows.append(
            (
                "decoding",
                f"{steps} batches, {decode.tokens / steps:.1f} tokens each; "
                f"{decode.llama_s / steps * 1000:.1f} ms in llama.cpp and "
                f"{decode.python_s / steps * 1e6:.0f} us in Python per batch",
            )
        )
    rows.append(("speculation", speculation_summary(decode.speculation)))
    if decode.prompt_tokens and decode.prompt_s > 0:
        rate = decode.prompt_tokens / decode.prompt_s
        rows.append(("prefill", f"{rate:.0f} tokens/s over {decode.prompt_tokens} prompt tokens"))
    for prefill in model.background_prefills:
        rows.append(
            (
                "background",
                f"slot {prefill.slot}: a hung-up client's prompt, {prefill.evaluated} of "
                f"{prefill.prompt_tokens} tokens evaluated for its retry",
            )
        )
    return rows


def _upstream_rows(s: StatusResponse) -> list[tuple[str, str]]:
    """One row per upstream route, a line per URL: state, load, latency, errors."""
    rows = []
    for route in s.upstreams:
        sent = f" as {route.model}" if route.model else ""
        text = (
            f"{route.pattern} -> {route.protocol}{sent}: {route.in_flight} in flight "
            f"(max {route.max_concurrent_requests}), {route.requests} routed"
        )
        if route.refused:
            text += f", {route.refused} refused as overloaded"
        for url in route.urls:
            latency = f", {url.latency_ms:.0f} ms to headers" if url.latency_ms is not None else ""
            line = f"\n    {url.url}: {url.state}, {url.outstanding} outstanding, "
            line += f"{url.requests} requests, {url.errors} errors{latency}"
            if url.state == "backing_off":
                line += f" (retried first again in {url.backing_off_s:.0f} s)"
            if url.last_error and url.state != "up":
                line += f"\n      last error: {url.last_error}"
            text += line
        rows.append(("upstream", text))
    return rows


def _default_unloaded(s: StatusResponse) -> str:
    default = next((m for m in s.models if "(default)" in m.names), None)
    if default is None or default.state == "loaded":
        return "none loaded"
    ago = human_duration(max(0.0, time.time() - default.since))
    return f"{default.file} {default.state} {ago} ago; it loads on the next request"


def format_status(s: StatusResponse, config_problem: str | None = None) -> str:
    serving = "serving" if s.state == "ready" else f"NOT serving ({s.state})"
    lines = [
        f"pensieved {s.version} is running, {serving}: pid {s.pid}, up {human_duration(s.uptime_s)}"
    ]
    # Only with a reply in hand: a stopped daemon's status must not import pydantic.
    from pensieve.partial import ORIGIN_TEXT

    listen = s.http.url or f"not listening ({s.http.error})"
    server = next((c for c in s.config_sources if c.section == "server"), None)
    if server is not None:
        listen += f" (server section: {ORIGIN_TEXT.get(server.source, server.source)})"
    rows: list[tuple[str, str]] = [("listening", listen), ("socket", s.socket_path)]
    config = s.config_file
    if s.config_error and s.config_sources:
        config += "  INVALID since start; in force meanwhile:" + "".join(
            f"\n    {c.section}: {ORIGIN_TEXT.get(c.source, c.source)}"
            + (f" ({c.reason})" if c.reason else "")
            for c in s.config_sources
        )
        config += "\n" + s.config_error
    elif s.config_error:
        config += "  INVALID, running on the previous (or default) config:\n" + s.config_error
    elif config_problem:
        config += (
            "  INVALID (pensieved has not re-read it yet; it keeps its running config):\n"
            f"  {config_problem}"
        )
    rows.append(("config", config))
    if s.log_file:
        rows.append(("log file", s.log_file))
    model = s.model
    if model:
        rows.append(
            (
                "model",
                f"{model.name} ({model.path}), {human_bytes(model.size_bytes)}, "
                f"context {model.context_size}, gpu layers {model.gpu_layers}, "
                f"{model.threads} threads, {model.slots} slots",
            )
        )
        default = next((m for m in s.models if "(default)" in m.names), None)
        if default is not None and default.tool_dialect is not None:
            rows.append(("tool dialect", f"{default.tool_dialect} ({default.tool_dialect_source})"))
        rows += _cache_rows(model)
    else:
        rows.append(("model", _default_unloaded(s)))
    if s.model_loading:
        rows.append(("loading", s.model_loading))
    if s.error:
        rows.append(("error", s.error))
    if s.aliases:
        rows.append(("aliases", ", ".join(f"{k} -> {v}" for k, v in s.aliases.items())))
    rows += _upstream_rows(s)
    if len(s.models) > 1:
        now = time.time()
        rows.append(
            (
                "models",
                "\n    ".join(
                    f"{m.file} {m.state} ({human_duration(max(0.0, now - m.since))})"
                    for m in s.models
                ),
            )
        )
    proc = s.process
    rows.append(
        (
            "resources",
            f"{human_bytes(proc.rss_bytes)} resident, CPU {proc.cpu_percent:.1f}% "
            f"({proc.cpu_time_s:.1f} s in total), {proc.threads} threads",
        )
    )
    req = s.requests
    rows.append(
        (
            "requests",
            f"{req.served} served, {req.in_flight} in flight ({req.running} running, "
            f"{req.queued} queued), {req.tokens_generated} tokens generated",
        )
    )
    rows.append(("last reload", describe_reload(s.last_reload)))
    if s.activity:
        rows.append(
            ("working on", "\n    ".join(describe_work(w.model_dump()) for w in s.activity))
        )
    if s.previous_exit:
        rows += _previous_exit_rows(s.previous_exit)
    width = max(len(label) for label, _ in rows) + 1
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)


def run_status(ctx: CommandContext, as_json: bool) -> int:
    location = ctx.location
    try:
        status = ctx.client(timeout=5.0).status()
    except CtlError as exc:
        code = exit_status_for(exc)
        death = None
        if code == CtlExit.NOT_RUNNING and location.dead is not None:
            death = examine_dead(location.dead)
        if as_json:
            state = "not_running" if code == CtlExit.NOT_RUNNING else "unknown"
            payload = {
                "running": False if code == CtlExit.NOT_RUNNING else None,
                "state": state,
                "socket_path": str(ctx.socket_path),
                "message": str(exc),
                "died": death.to_dict() if death is not None else None,
            }
            ctx.say(json.dumps(payload, indent=2))
        else:
            ctx.note(str(exc))
            if death is not None:
                ctx.note(death.describe())
            if location.config_problem and location.found_by == "default":
                ctx.note(
                    f"({ctx.config_path} cannot be read, so neither can its server.socket_path: "
                    f"{location.config_problem}; no running daemon has recorded itself for "
                    "that file, so the default socket was tried)"
                )
        if location.orphan is not None:
            ctx.note(
                f"pensieved (pid {location.orphan.pid}) still runs for {ctx.config_path} but "
                f"its control socket {location.orphan.socket_path} is gone: `kill "
                f"{location.orphan.pid}` stops it"
            )
        # LSB: 3 not running, 4 unknown.
        return int(code if code in (CtlExit.NOT_RUNNING, CtlExit.UNKNOWN) else 4)
    if status.previous_exit:
        _fill_in_from_journal(status.previous_exit)
    if as_json:
        extra = {"found_by": location.found_by, "config_file_problem": location.config_problem}
        fields = status.model_dump(mode="json")
        ctx.say(json.dumps({"running": True, **fields, **extra}, indent=2))
    else:
        ctx.say(format_status(status, location.config_problem))
        if location.found_by == "record":
            ctx.note(
                f"(found through its run record: {ctx.config_path}'s server.socket_path "
                "could not be used)"
            )
    return CtlExit.OK
