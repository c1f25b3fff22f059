"""Sliding-window attention (Gemma 3 and 4, gpt-oss): the window layers attend only to the last
`window` positions.

With llama.cpp's full-size SWA cache they keep every position anyway, and a sequence cuts like
a full-attention one, at the price of the memory the window exists to save (for gpt-oss-120b
at 128k, the window layers grow from 128 cells to 128k). With the small cache they keep about
a window per slot; a cut then works only while the window before it is still held, and
checkpoints of the window layers (taken as the prompt is evaluated) serve the earlier cuts.
"""

from __future__ import annotations

from pensieved.engine.caching.base import Architecture, CacheStrategy, PosMin


class SlidingWindow(CacheStrategy):
    def __init__(self, architecture: Architecture, *, full_cache: bool) -> None:
        self.architecture = architecture
        self.swa_full = full_cache
        self.checkpoints = not full_cache
        self.name = "swa-full" if full_cache else "swa-checkpoints"

    def can_cut(self, pos_min: PosMin, seq: int, length: int, keep: int) -> bool:
        if self.swa_full:
            return True
        # The next token, at `keep`, attends back to keep - window + 1.
        return pos_min(seq) <= max(0, keep - self.architecture.window)

    @property
    def persistable(self) -> bool:
        # A saved state holds only the last window: without checkpoints beside it, it could
        # serve only its own end.
        return self.checkpoints

    def describe(self) -> str:
        if self.swa_full:
            return "full-size sliding-window cache, cut anywhere"
        return (
            f"small sliding-window cache (about {self.architecture.window} positions a slot) "
            "plus checkpoints"
        )
