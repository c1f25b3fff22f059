"""What every cache strategy answers: which architecture it serves, whether llama.cpp gets a
full-size sliding-window cache, whether checkpoints are kept, and where a sequence can be cut.

A strategy decides nothing by touching llama.cpp: `can_cut` is given the one fact it needs,
the oldest position the sequence still holds in every layer (`llama_memory_seq_pos_min`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ArchitectureKind = Literal["full", "swa", "hybrid", "recurrent"]

# The oldest position sequence `seq` still holds (-1: nothing).
PosMin = Callable[[int], int]


@dataclass(frozen=True)
class Architecture:
    """How a model's layers remember the past, as llama.cpp reports it."""

    kind: ArchitectureKind
    window: int = 0  # sliding-window attention span, in tokens (0: none)

    def describe(self) -> str:
        match self.kind:
            case "full":
                return "full attention"
            case "swa":
                return f"sliding-window attention (window {self.window})"
            case "hybrid":
                windowed = f", sliding window {self.window}" if self.window else ""
                return f"hybrid recurrent + attention{windowed}"
            case "recurrent":
                return "recurrent"


class CacheStrategy(ABC):
    """How one architecture keeps a slot's prefix reusable."""

    name: str
    architecture: Architecture
    # llama.cpp's context parameter: keep every position in the sliding-window layers.
    swa_full: bool = True
    # Partial states are kept at some positions (checkpoints.py), to go back to.
    checkpoints: bool = False

    @abstractmethod
    def can_cut(self, pos_min: PosMin, seq: int, length: int, keep: int) -> bool:
        """Whether sequence `seq`, holding `length` positions, can be trimmed to its first
        `keep` (< length) with everything a next token attends to still there."""

    @property
    def persistable(self) -> bool:
        """Whether a saved slot can serve any prefix of it after a restart: the full state
        can be trimmed, or checkpoints saved beside it give the earlier positions."""
        return True

    @abstractmethod
    def describe(self) -> str:
        """One line for `status` and `pensievectl models`."""
