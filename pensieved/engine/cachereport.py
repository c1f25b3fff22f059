"""Why was this turn slow: how one prompt met the KV cache, for `pensievectl cache`.

A 20k-token re-prefill has three usual causes: the client changed an early line (a date, a
working directory), the chat template rendered the previous turn differently this time, or
the conversation's cache was evicted. The record says where the prompt left the best cached
candidate and shows both sides there, so a user can tell which.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pensieve.wire import CacheReport
from pensieved.engine.slots import Slot

# Tokens shown before the divergence, and after it on each side.
BEFORE_TOKENS = 12
AFTER_TOKENS = 16


def source(slot: Slot, read: int) -> str:
    """Where a prompt's cached tokens came from, for people."""
    if read == 0:
        return "none"
    return f"slot {slot.index}" + (" (restored from disk)" if slot.restored else "")


def cache_report(
    prompt: Sequence[int],
    candidate: Slot,
    shared: int,
    text: Callable[[Sequence[int]], str],
) -> CacheReport:
    """The record of a prompt whose best cached candidate, `candidate`, shares `shared` tokens
    with it; how much it then read, and from where, the caller fills in.

    Call it before the slots change: the excerpt of the candidate's side is read from its cache.
    """
    cached = candidate.tokens
    report = CacheReport(
        time=time.time(),
        prompt_tokens=len(prompt),
        cache_read_tokens=0,
        source="none",
        candidate_tokens=len(cached),
    )
    if shared >= len(cached) or shared >= len(prompt):
        return report  # a whole prefix (the usual next turn), or nothing cached at all
    report.diverged_at = shared
    report.common = text(prompt[max(0, shared - BEFORE_TOKENS) : shared])
    report.prompt_next = text(prompt[shared : shared + AFTER_TOKENS])
    report.cached_next = text(cached[shared : shared + AFTER_TOKENS])
    return report
