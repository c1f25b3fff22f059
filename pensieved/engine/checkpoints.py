"""Context checkpoints: the part of a sequence's state that cannot be cut back, kept at a few
positions so that a prompt diverging inside a slot's cache need not be evaluated from 0.

A recurrent layer keeps one state, that of the last position; a sliding-window layer (without
llama.cpp's full-size SWA cache) keeps only the last window of cells. Neither can be trimmed
to an earlier position the way a full-attention cache is. A checkpoint is that partial state
(`llama_state_seq_get_data_ext` with LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) at token position
`position`: restoring it, and trimming the per-position attention cells to `position`, gives
the sequence exactly as it was after its first `position` tokens.

Each slot keeps at most `per_slot`, and all slots together at most `max_bytes` (what the memory
budget leaves beside the weights and the KV cache); the oldest go first. A checkpoint is
immutable bytes: a prefix shared into another slot shares its checkpoints too, counted once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pensieve.wire import CheckpointStatus

# llama-server keeps up to 32 per slot, at least 8192 tokens apart; an agent's turns are
# closer together than that, and each turn needs only the newest ones, so fewer do.
PER_SLOT = 8


@dataclass(frozen=True)
class Checkpoint:
    """Sequence state after its first `position` tokens (the parts that cannot be cut)."""

    position: int
    state: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.state)


class Checkpoints:
    """Each slot's checkpoints, oldest first. Mutated by the decode thread; read by `status`."""

    def __init__(self, slots: int, *, per_slot: int = PER_SLOT, max_bytes: int | None = None):
        self.per_slot = per_slot
        self.max_bytes = max_bytes
        self._by_slot: list[list[Checkpoint]] = [[] for _ in range(slots)]
        self._lock = threading.Lock()

    def of(self, slot: int) -> list[Checkpoint]:
        with self._lock:
            return list(self._by_slot[slot])

    def add(self, slot: int, checkpoint: Checkpoint) -> bool:
        """Keep `checkpoint` for `slot` (replacing one at the same position); False when it
        alone is over the byte limit."""
        with self._lock:
            if self.max_bytes is not None and checkpoint.size > self.max_bytes:
                return False
            kept = [c for c in self._by_slot[slot] if c.position != checkpoint.position]
            kept.append(checkpoint)
            kept.sort(key=lambda c: c.position)
            while len(kept) > self.per_slot:
                # The oldest but the first: the first serves every prompt with the same start.
                del kept[1 if len(kept) > 2 else 0]
            self._by_slot[slot] = kept
            self._fit(keep=checkpoint)
            return True

    def _fit(self, keep: Checkpoint) -> None:
        if self.max_bytes is None:
            return
        while self._bytes() > self.max_bytes:
            victims = [
                (index, c)
                for index, held in enumerate(self._by_slot)
                for c in held
                if c is not keep
            ]
            if not victims:
                return
            # The lowest positions of the longest list first: it has others to fall back on.
            index, victim = max(victims, key=lambda v: (len(self._by_slot[v[0]]), -v[1].position))
            self._by_slot[index] = [c for c in self._by_slot[index] if c is not victim]

    def newest_at_or_before(self, slot: int, position: int) -> Checkpoint | None:
        with self._lock:
            usable = [c for c in self._by_slot[slot] if c.position <= position]
            return usable[-1] if usable else None

    def trim(self, slot: int, keep: int) -> None:
        """The slot now holds only its first `keep` positions: later checkpoints are invalid."""
        with self._lock:
            self._by_slot[slot] = [c for c in self._by_slot[slot] if c.position <= keep]

    def share(self, source: int, target: int, upto: int) -> None:
        """`target` now holds `source`'s first `upto` positions: and its checkpoints there."""
        with self._lock:
            self._by_slot[target] = [c for c in self._by_slot[source] if c.position <= upto]

    def _bytes(self) -> int:
        unique = {id(c): c.size for held in self._by_slot for c in held}
        return sum(unique.values())

    def status(self, slot: int) -> CheckpointStatus:
        with self._lock:
            held = self._by_slot[slot]
            return CheckpointStatus(
                count=len(held),
                bytes=sum(c.size for c in held),
                positions=[c.position for c in held],
            )

    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes()
