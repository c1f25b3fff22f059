"""Cache strategies: how each kind of model keeps a slot's prefix reusable across turns.

One class per architecture family (`full.py`, `swa.py`, `recurrent.py`) behind one interface
(`base.py`); `choose` picks one for a loaded model and says why.
"""

from __future__ import annotations

from typing import Literal

from pensieved.engine.caching.base import Architecture, CacheStrategy
from pensieved.engine.caching.full import FullAttention
from pensieved.engine.caching.recurrent import RecurrentCheckpoints
from pensieved.engine.caching.swa import SlidingWindow
from pensieved.engine.checkpoints import PER_SLOT

__all__ = ["Architecture", "CacheStrategy", "architecture", "choose"]


def architecture(*, recurrent: bool, hybrid: bool, window: int) -> Architecture:
    if recurrent:
        return Architecture("recurrent")
    if hybrid:
        return Architecture("hybrid", window)
    if window > 0:
        return Architecture("swa", window)
    return Architecture("full")


def choose(
    arch: Architecture,
    swa_full: bool | Literal["auto"],
    *,
    pool_tokens: int,
    slots: int,
    batch: int,
) -> tuple[CacheStrategy, str]:
    """The strategy for a model, and why (for the log and `status`).

    For a sliding-window model, `auto` compares the window layers' cells: the full-size cache
    holds the whole pool; the small one about a window plus a batch per slot, and each
    checkpoint as much again. Small wins unless the context is only a few windows long.
    """
    if arch.kind in ("recurrent", "hybrid"):
        return RecurrentCheckpoints(arch), "a recurrent state cannot be cut back: checkpoints"
    if arch.kind == "full":
        return FullAttention(arch), "full attention: the cache is cut anywhere"
    if swa_full is not True and swa_full is not False:
        full_cells = pool_tokens
        small_cells = slots * (arch.window + batch) * (1 + PER_SLOT)
        full = full_cells <= small_cells
        verdict = (
            f"the full-size window cache ({full_cells} cells a window layer) is no larger than "
            f"the small one with {PER_SLOT} checkpoints a slot ({small_cells})"
            if full
            else f"the small window cache with {PER_SLOT} checkpoints a slot ({small_cells} "
            f"cells a window layer) is smaller than the full-size one ({full_cells})"
        )
        return SlidingWindow(arch, full_cache=full), f"{verdict} (model.swa_full auto)"
    strategy = SlidingWindow(arch, full_cache=swa_full)
    return strategy, f"as configured (model.swa_full {str(swa_full).lower()})"
