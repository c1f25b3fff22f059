"""Recurrent and hybrid models (Mamba, RWKV; Qwen3.5, Qwen3-Next, LFM2, Granite 4, Nemotron):
a recurrent layer holds one state, that of the last position, so a sequence cannot be cut back
at all. Checkpoints of that state (and of a sliding window, where the attention layers have
one) are the only way back to an earlier position; the attention layers' cells are cut as
usual. llama.cpp gets the small sliding-window cache: the checkpoints cover it too.
"""

from __future__ import annotations

from pensieved.engine.caching.base import Architecture, CacheStrategy, PosMin


class RecurrentCheckpoints(CacheStrategy):
    name = "recurrent-checkpoints"
    swa_full = False
    checkpoints = True

    def __init__(self, architecture: Architecture) -> None:
        self.architecture = architecture

    def can_cut(self, pos_min: PosMin, seq: int, length: int, keep: int) -> bool:
        return keep >= length

    def describe(self) -> str:
        return "recurrent state restored from checkpoints"
