"""Which cells of the shared KV cache each slot holds, and which to free when it is full.

llama.cpp's unified cache is one pool of cells; a cell belongs to every sequence that was
given it with `llama_memory_seq_cp`, and is freed when the last of them lets go. llama.cpp
does not say how many cells are in use, so `CellPool` keeps the same books: a cell id per
position of each slot, and how many slots hold each cell. It is what `status` reports (cells
in use and shared, each session's own cost) and what eviction decides from.

With a KV cache per slot (`copies`), a prefix taken from another slot is a copy: the target's
cells are its own, nothing is shared, and each slot can hold its full context, so nothing is
ever evicted.

Eviction, when a step needs more cells than are free: idle slots only, least recently used
first; first the cells an idle slot holds alone (its own tail, beyond what it shares), then,
if that is not enough, idle slots whole. A cell a running session holds is never freed, so an
eviction never takes another live session's prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotCells:
    """One slot's part of the cache, for `status`."""

    index: int
    tokens: int
    own: int  # cells it alone holds
    cost: float  # its own cells plus its share of each shared one


@dataclass(frozen=True)
class Eviction:
    """Trim slot `index` to its first `keep` positions."""

    index: int
    keep: int


class CellPool:
    """The books of one unified KV cache: positions → cells per slot, holders per cell."""

    def __init__(self, capacity: int, slots: int, *, copies: bool = False) -> None:
        self.capacity = capacity
        self.copies = copies  # a cache per slot: `share` copies
        self._cells: list[list[int]] = [[] for _ in range(slots)]
        self._holders: dict[int, int] = {}
        self._next = 0
        self.shared = 0  # cells held by more than one slot
        # Mutations come from the decode thread; `snapshot` from the event loop.
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return len(self._holders)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def length(self, index: int) -> int:
        return len(self._cells[index])

    def append(self, index: int, count: int) -> None:
        """Slot `index` was given `count` new cells at its next positions (a decode)."""
        with self._lock:
            self._append(index, count)

    def _append(self, index: int, count: int) -> None:
        cells = self._cells[index]
        for _ in range(count):
            cell = self._next
            self._next += 1
            self._holders[cell] = 1
            cells.append(cell)

    def trim(self, index: int, keep: int) -> int:
        """Slot `index` lets go of its positions from `keep` on; the cells freed."""
        with self._lock:
            return self._trim(index, keep)

    def _trim(self, index: int, keep: int) -> int:
        cells = self._cells[index]
        freed = 0
        for cell in cells[keep:]:
            freed += self._release(cell)
        del cells[keep:]
        return freed

    def share(self, source: int, target: int, count: int) -> None:
        """Slot `target` (emptied first) takes `source`'s first `count` cells (a seq_cp), or
        a copy of them with a cache per slot."""
        with self._lock:
            self._trim(target, 0)
            if self.copies:
                self._append(target, min(count, len(self._cells[source])))
                return
            cells = self._cells[source][:count]
            for cell in cells:
                holders = self._holders[cell] + 1
                self._holders[cell] = holders
                if holders == 2:
                    self.shared += 1
            self._cells[target] = cells

    def snapshot(self) -> tuple[int, int, list[SlotCells]]:
        """Cells used, cells shared, and each slot's part: a consistent view from any thread."""
        with self._lock:
            slots = [
                SlotCells(index, len(cells), self._own(cells), self._cost(cells))
                for index, cells in enumerate(self._cells)
            ]
            return len(self._holders), self.shared, slots

    def common(self, a: int, b: int) -> int:
        """How many leading positions slots `a` and `b` hold in the very same cells."""
        left, right = self._cells[a], self._cells[b]
        n = min(len(left), len(right))
        i = 0
        while i < n and left[i] == right[i]:
            i += 1
        return i

    def own(self, index: int) -> int:
        """Cells only slot `index` holds: what forgetting it would free."""
        return self._own(self._cells[index])

    def _own(self, cells: list[int]) -> int:
        return sum(1 for cell in cells if self._holders[cell] == 1)

    def private_from(self, index: int) -> int:
        """The first position from which every cell of slot `index` is its alone."""
        cells = self._cells[index]
        position = len(cells)
        while position > 0 and self._holders[cells[position - 1]] == 1:
            position -= 1
        return position

    def cost(self, index: int) -> float:
        """What slot `index` really costs, in cells: its own, plus its part of shared ones."""
        return self._cost(self._cells[index])

    def _cost(self, cells: list[int]) -> float:
        return sum(1.0 / self._holders[cell] for cell in cells)

    def _release(self, cell: int) -> int:
        holders = self._holders[cell] - 1
        if holders == 0:
            del self._holders[cell]
            return 1
        self._holders[cell] = holders
        if holders == 1:
            self.shared -= 1
        return 0

    def plan_eviction(self, needed: int, idle: Iterable[int]) -> list[Eviction]:
        """Trims of idle slots (least recently used first) that free `needed` cells, or as
        many as idle slots can give. Does not apply them: `trim` does, as each happens."""
        order = list(idle)
        if needed <= self.free:
            return []
        holders = dict(self._holders)  # a scratch copy: later steps see earlier trims
        lengths = {index: len(self._cells[index]) for index in order}
        freed = 0
        plan: list[Eviction] = []

        def cut(index: int, keep: int) -> None:
            nonlocal freed
            cells = self._cells[index][keep : lengths[index]]
            for cell in cells:
                holders[cell] -= 1
                if holders[cell] == 0:
                    freed += 1
            lengths[index] = keep
            plan.append(Eviction(index, keep))

        # Own tails first: a slot keeps what it shares, so the common prefix stays warm.
        for index in order:
            if self.free + freed >= needed:
                return plan
            cells = self._cells[index]
            private = lengths[index]
            while private > 0 and holders[cells[private - 1]] == 1:
                private -= 1
            # Only as much as is missing: the rest of the tail still serves a continuation.
            keep = max(private, lengths[index] - (needed - self.free - freed))
            if keep < lengths[index]:
                cut(index, keep)
        for index in order:
            if self.free + freed >= needed:
                return plan
            if lengths[index] > 0:
                cut(index, 0)
        return plan
