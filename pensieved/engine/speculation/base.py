"""What every kind of speculation offers the batcher, and the per-slot bookkeeping they share.

A kind proposes tokens that may follow a slot's sequence; the batcher puts them in the same
`llama_decode` as the slot's next token and everyone else's work. Two sorts of proposal:

- a *draft* (n-gram, draft model) is a guess: the batcher asks for logits at every drafted
  position, samples each position as it would without speculation, and keeps the longest
  prefix whose drafted token is the one sampled there. The rest is removed from the KV cache.
- a *forced* run (jump-forward) is what the grammar leaves no choice about. Where the memory
  can drop rejected positions it is verified as a draft too; where it cannot, it is appended
  as output at once, without logits and without sampling.

Sampling each drafted position as usual and comparing is the standard acceptance rule for a
drafter that proposes one token with certainty: the draft token is kept with probability
p(token), and on rejection the token drawn is distributed as p with the draft token taken out
and renormalised (the residual). So the output has the distribution of plain decoding, greedy
output is the same token for token, and a seeded request draws one random number per token
emitted, as without speculation. (Up to floating point: a backend whose kernels for a step of
several positions sum in another order than for one position can flip a near tie. llama.cpp's
CPU kernels give the same logits bit for bit; docs/speculation.md.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Draft length bounds per slot: verifying a draft costs batch room and step time, more so on a
# CPU; copied stretches (an Edit's old_string) run to hundreds of tokens. 48 is llama-server's
# n-gram draft (its m-gram); on the bench's copy, 48 took 1.62 s for 256 tokens where 16 took
# 1.99 s and 64 took 1.80 s (a CPU pays for every verified position).
MIN_DRAFT = 2
MAX_DRAFT = 48
FIRST_DRAFT = 4
# After this many drafts in a row with nothing accepted, a slot stops drafting for a while;
# each further failure doubles the pause, up to MAX_PAUSE steps.
MISSES_BEFORE_PAUSE = 2
FIRST_PAUSE = 4
MAX_PAUSE = 64


@dataclass(frozen=True)
class Proposal:
    """Tokens to follow a slot's sequence: a draft to verify, or forced text to append."""

    tokens: tuple[int, ...]
    forced: bool = False
    kind: str = ""


class Speculation(Protocol):
    """One kind of speculation, for one generation (used by the decode thread only)."""

    name: str

    def propose(self, tokens: Sequence[int], k: int) -> Proposal | None:
        """At most `k` tokens that may follow `tokens` (prompt plus output so far)."""
        ...

    def observe(self, proposed: int, accepted: int) -> None:
        """How many of the last proposal's tokens were kept."""
        ...


@dataclass
class SpecStats:
    """Counters of a model's speculation, for `status` and /metrics."""

    drafts: int = 0  # drafts verified
    drafted: int = 0  # tokens in them
    accepted: int = 0  # of those, kept
    forced: int = 0  # tokens of a grammar's forced text kept (jump-forward)
    emitting_steps: int = 0  # (slot, step) pairs that emitted output
    emitted: int = 0  # output tokens of those steps
    mode: str = "auto"
    note: str = ""  # what runs on this model, and why not the rest

    @property
    def gained(self) -> int:
        """Tokens that cost no decode step of their own."""
        return self.accepted + self.forced

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per decode step of a generating stream (1.0 without speculation)."""
        return self.emitted / self.emitting_steps if self.emitting_steps else 0.0


class DraftLength:
    """A slot's adaptive draft length, and its pause after drafts that fail.

    A full accept doubles the length; a partial one sets it just past what was accepted, so
    the next draft asks for one token more than the last one earned. Drafts that keep failing
    stop for a pause that grows with each failure: where nothing is copied, the slot decodes
    as without speculation, but it tries again later in case copying starts.
    """

    def __init__(self) -> None:
        self.k = FIRST_DRAFT
        self._misses = 0
        self._pause = 0
        self._next_pause = FIRST_PAUSE

    def wanted(self) -> int:
        """Tokens to draft this step: 0 while paused."""
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.k

    def observe(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        if accepted == 0:
            self._misses += 1
            self.k = MIN_DRAFT
            if self._misses >= MISSES_BEFORE_PAUSE:
                self._pause = self._next_pause
                self._next_pause = min(MAX_PAUSE, self._next_pause * 2)
                self._misses = 0
            return
        self._misses = 0
        self._next_pause = FIRST_PAUSE
        if accepted >= proposed:
            self.k = min(MAX_DRAFT, self.k * 2)
        else:
            self.k = max(MIN_DRAFT, min(MAX_DRAFT, accepted + 1))


def draft_budget(decoding: int, room: int) -> int:
    """Draft tokens one step may carry in all: drafts never take the place of a sampled token
    and take at most half of the room the sampled tokens leave (prompts still read get the
    rest), and at most MAX_DRAFT per decoding stream, so a step with drafts stays short."""
    return max(0, min((room - decoding) // 2, MAX_DRAFT * max(decoding, 1)))
