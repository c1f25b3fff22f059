"""`pensievectl cache`: why was this turn slow? Each recent request's prompt against the KV cache.

For the last requests of every loaded model: how many prompt tokens there were, how many were
read from the cache and from where (a slot, or a slot restored from disk), and, where the prompt
left the best cached candidate, the position and both sides' text there. A changed system line,
a template that rendered the previous turn anew, and an evicted conversation each read
differently here. Prompts still being evaluated for a client that hung up are listed too.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from pensieve.exitcodes import CtlExit
from pensievectl.context import CommandContext
from pensievectl.status import human_duration

if TYPE_CHECKING:
    from pensieve.wire import CacheReport, ModelEntryStatus

EXCERPT_CHARS = 60


def _excerpt(text: str) -> str:
    shown = json.dumps(text, ensure_ascii=False)  # quoted, with newlines as \n
    return shown if len(shown) <= EXCERPT_CHARS else shown[: EXCERPT_CHARS - 4] + '..."'


def format_report(report: CacheReport, now: float) -> list[str]:
    read = report.cache_read_tokens
    share = read / report.prompt_tokens if report.prompt_tokens else 0.0
    found = f"{read} read from the cache ({share:.0%}, {report.source})" if read else "none cached"
    lines = [
        f"{human_duration(max(0.0, now - report.time))} ago: {report.prompt_tokens} prompt "
        f"tokens, {found}"
    ]
    if report.diverged_at is None:
        if report.candidate_tokens:
            lines.append("  the cache held a whole prefix of the prompt")
        else:
            lines.append("  nothing was cached")
        return lines
    lines += [
        f"  diverged at token {report.diverged_at} from the best cached candidate "
        f"({report.candidate_tokens} tokens), after {_excerpt(report.common)}",
        f"    prompt: {_excerpt(report.prompt_next)}",
        f"    cached: {_excerpt(report.cached_next)}",
    ]
    return lines


def format_cache(models: list[ModelEntryStatus], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines: list[str] = []
    for entry in models:
        model = entry.model
        if model is None:
            continue
        lines.append(f"{entry.file}:")
        for prefill in model.background_prefills:
            lines.append(
                f"  slot {prefill.slot}: evaluating a hung-up client's prompt for its retry, "
                f"{prefill.evaluated} of {prefill.prompt_tokens} tokens"
            )
        if not model.recent_requests:
            lines.append("  no requests yet")
        for report in model.recent_requests:
            lines += ["  " + line for line in format_report(report, now)]
    return "\n".join(lines) if lines else "no model is loaded"


def run_cache(ctx: CommandContext, as_json: bool) -> int:
    reply = ctx.client(timeout=10.0).models()
    if as_json:
        fields = {"path", "background_prefills", "recent_requests"}
        loaded = [m.model.model_dump(mode="json", include=fields) for m in reply.models if m.model]
        ctx.say(json.dumps({"models": loaded}, indent=2))
    else:
        ctx.say(format_cache(reply.models))
    return CtlExit.OK
