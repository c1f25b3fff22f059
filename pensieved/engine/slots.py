"""A model's KV sequences ("slots") and which one holds the longest prefix of a prompt."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Slot:
    """One KV sequence of the model's context and the tokens it holds."""

    index: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    # Its cache was read back from disk at load, and no request has run on it since.
    restored: bool = False

    def shared_prefix(self, tokens: Sequence[int]) -> int:
        return common_prefix(self.tokens, tokens)


def common_prefix(held: list[int], tokens: Sequence[int]) -> int:
    """How many leading tokens `held` and `tokens` share."""
    n = min(len(held), len(tokens))
    if list(tokens[:n]) == held[:n]:  # the usual case (one extends the other), compared in C
        return n
    i = 0
    while held[i] == tokens[i]:
        i += 1
    return i


def best_donor(slot: Slot, peers: Sequence[Slot], tokens: tuple[int, ...]) -> tuple[Slot, int]:
    """The slot sharing the longest prefix with `tokens` (`slot` itself on ties)."""
    best, shared = slot, slot.shared_prefix(tokens)
    for peer in peers:
        if peer is not slot:
            n = peer.shared_prefix(tokens)
            if n > shared:
                best, shared = peer, n
    return best, shared
