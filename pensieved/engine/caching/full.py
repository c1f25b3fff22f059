"""Full attention: every position's keys and values stay in the cache, so a sequence can be
cut anywhere and the prefix before the cut is reused as it is. No checkpoints needed."""

from __future__ import annotations

from pensieved.engine.caching.base import Architecture, CacheStrategy, PosMin


class FullAttention(CacheStrategy):
    name = "full-attention"

    def __init__(self, architecture: Architecture | None = None) -> None:
        self.architecture = architecture or Architecture("full")

    def can_cut(self, pos_min: PosMin, seq: int, length: int, keep: int) -> bool:
        return True

    def describe(self) -> str:
        return "prefix cache cut anywhere (every position kept)"
