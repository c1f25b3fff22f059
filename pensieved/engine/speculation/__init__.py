"""Speculative decoding: more than one output token per decode step where the output is
predictable. The kinds (one module each) share the `Speculation` interface of `base.py`:

- `ngram.py`: drafts from the conversation itself (verified, exact);
- `draft_model.py`: drafts from a small model of the target's family (verified, exact);
- `jump.py`: text the grammar forces (verified like a draft where the memory can drop a
  rejected one, appended unverified where it cannot).

`Speculator` is one generation's use of them; `SpeculationSetup` is a model's (its mode, its
conversation index, its counters). See docs/speculation.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pensieved.engine.speculation.base import (
    DraftLength,
    Proposal,
    SpecStats,
    Speculation,
    draft_budget,
)
from pensieved.engine.speculation.draft_model import DraftModel, DraftModelSpeculation
from pensieved.engine.speculation.jump import Grammar, JumpForward, Vocabulary
from pensieved.engine.speculation.ngram import ConversationIndex, NgramSpeculation

SpeculationMode = Literal["auto", "ngram", "draft", "off"]

__all__ = [
    "ConversationIndex",
    "DraftLength",
    "DraftModel",
    "JumpForward",
    "NgramSpeculation",
    "Proposal",
    "SpecStats",
    "Speculation",
    "SpeculationMode",
    "SpeculationSetup",
    "Speculator",
    "draft_budget",
]


class Speculator:
    """One generation's speculation: its drafting kinds, forced text, adaptive length."""

    def __init__(
        self,
        prompt: Sequence[int],
        drafters: Sequence[Speculation],
        jump: JumpForward | None,
        stats: SpecStats,
        conversation: ConversationIndex | None,
    ) -> None:
        self.sequence: list[int] = list(prompt)  # prompt plus output, drafts excluded
        self._drafters = list(drafters)
        self._jump = jump
        self._stats = stats
        self._conversation = conversation
        self.length = DraftLength()
        self._last: Speculation | None = None

    @property
    def drafts(self) -> bool:
        """Whether this generation's steps may carry a draft to verify."""
        return bool(self._drafters) or (self._jump is not None and self._jump.verified)

    def record(self, token: int) -> None:
        """An output token (sampled or forced)."""
        self.sequence.append(token)

    def forced(self) -> tuple[int, ...]:
        """Tokens the grammar forces next, to append unverified (only where a rejected draft
        could not be dropped); the grammar has advanced over them."""
        if self._jump is None or self._jump.verified:
            return ()
        proposal = self._jump.propose(self.sequence, 0)
        return proposal.tokens if proposal is not None else ()

    def draft(self, budget: int) -> tuple[int, ...]:
        """At most `budget` tokens to verify after the pending one: the grammar's forced text
        if there is some (nearly always kept, so not held to the adaptive length), else a
        draft of the adaptive length from the first kind that has one."""
        self._last = None
        if budget <= 0:
            return ()
        if self._jump is not None and self._jump.verified:
            proposal = self._jump.propose(self.sequence, budget)
            if proposal is not None and proposal.tokens:
                self._last = self._jump
                return proposal.tokens[:budget]
        k = min(self.length.wanted(), budget) if self._drafters else 0
        if k <= 0:
            return ()
        for drafter in self._drafters:
            proposal = drafter.propose(self.sequence, k)
            if proposal is not None and proposal.tokens:
                self._last = drafter
                return proposal.tokens[:k]
        return ()

    def observe(self, proposed: int, accepted: int) -> None:
        """How a verified draft went."""
        if proposed <= 0 or self._last is None:
            return
        self._last.observe(proposed, accepted)
        stats = self._stats
        if self._last is self._jump:
            stats.forced += accepted  # forced text says nothing of how well drafts pay
            return
        self.length.observe(proposed, accepted)
        stats.drafts += 1
        stats.drafted += proposed
        stats.accepted += accepted

    def close(self) -> None:
        """The generation ended: its sequence joins the conversation index."""
        if self._conversation is None or not self._drafters:
            return
        own = next((d.index for d in self._drafters if isinstance(d, NgramSpeculation)), None)
        self._conversation.remember(self.sequence, own)


class SpeculationSetup:
    """A model's speculation: which kinds its generations use, and their counters."""

    def __init__(
        self,
        mode: SpeculationMode,
        *,
        can_cut: bool,
        why_not: str = "",
        stats: SpecStats | None = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.mode = mode
        # Drafts need the rejected positions removed from the KV cache: recurrent and
        # hybrid memories (and a sliding window cache not kept whole) cannot cut a tail.
        self.can_cut = can_cut
        self.ngram = mode in ("auto", "ngram") and can_cut
        self.draft_model = draft_model if mode in ("auto", "draft") and can_cut else None
        self.jump = mode != "off"
        self.stats = stats if stats is not None else SpecStats()
        self.conversation = ConversationIndex() if self.ngram else None
        kinds = []
        if self.ngram:
            kinds.append("n-gram drafts")
        if self.draft_model is not None:
            kinds.append(f"drafts from {self.draft_model.name}")
        if mode == "off":
            note = "off (model.speculative)"
        elif not can_cut:
            note = f"jump-forward only: no drafts, {why_not}"
        else:
            note = ", ".join(kinds) + " and jump-forward" if kinds else "jump-forward only"
        self.stats.mode, self.stats.note = mode, note

    def speculator(
        self, prompt: Sequence[int], grammar: Grammar | None, vocab: Vocabulary, seq: int
    ) -> Speculator | None:
        """One generation's speculation on sequence `seq` (None: it has none)."""
        drafters: list[Speculation] = []
        if self.ngram:
            drafters.append(NgramSpeculation(self.conversation))
        if self.draft_model is not None:
            # After the n-grams: where the conversation has a copy to offer, it is longer
            # and costs no draft model step.
            drafters.append(DraftModelSpeculation(self.draft_model, seq))
        jump = (
            JumpForward(grammar, vocab, verified=self.can_cut)
            if self.jump and grammar is not None
            else None
        )
        if not drafters and jump is None:
            return None
        return Speculator(prompt, drafters, jump, self.stats, self.conversation)
