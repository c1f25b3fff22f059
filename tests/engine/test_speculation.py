"""The speculation kinds behind one interface, their adaptive length and batch budget."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from pensieved.engine.batcher import plan_step
from pensieved.engine.generation import Generation
from pensieved.engine.slots import Slot
from pensieved.engine.speculation import (
    ConversationIndex,
    DraftLength,
    JumpForward,
    NgramSpeculation,
    Speculation,
    draft_budget,
)
from pensieved.engine.speculation.base import FIRST_DRAFT, MAX_DRAFT, MIN_DRAFT
from pensieved.engine.speculation.ngram import NgramIndex
from pensieved.engine.types import ChatMessage, GenerationRequest, PreparedPrompt

COPIED = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


class CharVocab:
    """One token per printable character (token id = code point), end of generation 0."""

    eos_id = 0

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode() if token else b""

    def is_end_of_generation(self, token: int) -> bool:
        return token == 0


class LiteralGrammar:
    """A grammar that allows exactly `text` (any character where it says `*`), then the end."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def allowed(self, candidates: np.ndarray) -> np.ndarray:
        if self.at >= len(self.text):
            keep = candidates == 0
        elif self.text[self.at] == "*":
            keep = candidates != 0
        else:
            keep = candidates == ord(self.text[self.at])
        return np.array(candidates[keep])

    def advance(self, token: int) -> None:
        assert self.text[self.at] in ("*", chr(token))
        self.at += 1

    def fork(self) -> LiteralGrammar:
        copy = LiteralGrammar(self.text)
        copy.at = self.at
        return copy


def ngram_kind() -> tuple[Speculation, list[int], list[int]]:
    # The copied run occurs earlier; the sequence ends on its first five tokens again.
    return NgramSpeculation(), [1, 2, *COPIED, 3, 4, *COPIED[:5]], COPIED[5:9]


def jump_kind() -> tuple[Speculation, list[int], list[int]]:
    grammar = LiteralGrammar('{"name": "Edit", "arguments": *')
    return JumpForward(grammar, CharVocab()), [1, 2, 3], [ord(c) for c in '{"na']


KINDS: dict[str, Callable[[], tuple[Speculation, list[int], list[int]]]] = {
    "ngram": ngram_kind,
    "jump": jump_kind,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_drafts_what_follows_and_takes_feedback(kind: str) -> None:
    speculation, tokens, expected = KINDS[kind]()
    proposal = speculation.propose(tokens, 4)
    assert proposal is not None and proposal.kind == speculation.name == kind
    assert not proposal.forced  # a draft, to be verified
    assert list(proposal.tokens) == expected
    speculation.observe(len(proposal.tokens), 1)  # feedback is taken whatever the kind
    again = speculation.propose(tokens, 4)  # proposing moved nothing
    assert again is not None and list(again.tokens) == expected


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_proposes_nothing_when_nothing_is_predictable(kind: str) -> None:
    speculation, _, _ = KINDS[kind]()
    if kind == "jump":
        speculation = JumpForward(LiteralGrammar("*"), CharVocab())
    assert speculation.propose([5, 6, 7, 8, 9], 4) is None


def test_unverified_jump_forward_walks_the_grammar_and_appends_the_whole_forced_text() -> None:
    grammar = LiteralGrammar('{"name": "Edit", "arguments": *')
    jump = JumpForward(grammar, CharVocab(), verified=False)
    proposal = jump.propose([1, 2, 3], 4)
    assert proposal is not None and proposal.forced  # not bounded by k: no verification
    assert bytes(proposal.tokens).decode() == '{"name": "Edit", "arguments": '
    assert jump.propose([1, 2, 3], 4) is None  # the grammar moved: the rest is a choice


def test_an_ngram_needs_context_beyond_its_key_to_be_drafted() -> None:
    index = NgramIndex()
    index.extend([50, 1, 2, 3, 60])
    assert index.lookup([99, 1, 2, 3], 2) == []  # only the 3 key tokens match
    assert index.lookup([50, 1, 2, 3], 2) == [60]


def test_the_occurrence_matching_furthest_back_wins() -> None:
    index = NgramIndex()
    index.extend([7, 8, 1, 2, 3, 40, 9, 8, 1, 2, 3, 50, 0])
    assert index.lookup([9, 8, 1, 2, 3], 1) == [50]
    assert index.lookup([7, 8, 1, 2, 3], 1) == [40]


def test_a_later_request_drafts_from_an_earlier_ones_sequence() -> None:
    conversation = ConversationIndex()
    conversation.remember([1, 2, *COPIED, 3])
    speculation = NgramSpeculation(conversation)
    proposal = speculation.propose([9, 9, *COPIED[:4]], 3)
    assert proposal is not None and list(proposal.tokens) == COPIED[4:7]


def test_the_conversation_index_keeps_only_the_latest_turn_of_a_conversation() -> None:
    conversation = ConversationIndex()
    conversation.remember([1, 2, 3, 4, 5])
    conversation.remember([1, 2, 3, 4, 5, 6, 7])
    assert conversation._tokens == 7


def test_the_draft_length_grows_on_success_and_pauses_after_failures() -> None:
    length = DraftLength()
    assert length.wanted() == FIRST_DRAFT
    length.observe(FIRST_DRAFT, FIRST_DRAFT)
    assert length.wanted() == 2 * FIRST_DRAFT
    for _ in range(5):
        length.observe(length.k, length.k)
    assert length.wanted() == MAX_DRAFT
    length.observe(MAX_DRAFT, 3)
    assert length.wanted() == 4  # one more than the last draft earned
    length.observe(4, 0)
    length.observe(MIN_DRAFT, 0)
    paused = 0
    while length.wanted() == 0:
        paused += 1
    assert paused > 0  # it drafts again after a pause
    length.observe(MIN_DRAFT, 0)
    length.observe(MIN_DRAFT, 0)
    longer = 0
    while length.wanted() == 0:
        longer += 1
    assert longer > paused  # each failure after a pause pauses longer


def test_drafts_never_take_a_sampled_tokens_place_and_leave_prompts_room() -> None:
    assert draft_budget(decoding=4, room=512) == 4 * MAX_DRAFT
    assert draft_budget(decoding=1, room=512) == MAX_DRAFT
    assert draft_budget(decoding=4, room=12) == 4  # half of what the sampled tokens leave
    assert draft_budget(decoding=4, room=4) == 0


def generation(seq: int, *, sampled: int | None, draft: Sequence[int] = ()) -> Generation:
    request = GenerationRequest(messages=(ChatMessage("user", "x"),), max_tokens=64)
    prepared = PreparedPrompt(request, tuple(range(1000, 1100)), 64)
    g = Generation(Slot(seq), prepared, threading.Event(), lambda _: None, lambda: None)
    if sampled is not None:
        g.evaluated = 100
        g.next_token = sampled
        g.draft = tuple(draft)
    return g


def test_a_drafting_stream_beside_three_plain_ones_leaves_each_its_token() -> None:
    drafting = generation(0, sampled=5, draft=range(100, 100 + MAX_DRAFT))
    plain = [generation(seq, sampled=seq) for seq in (1, 2, 3)]
    reading = generation(4, sampled=None)
    adds = plan_step([drafting, *plain, reading], capacity=24, step=0)
    by_seq = {g.seq: (tokens, logits) for g, tokens, logits in adds}
    for g in plain:
        assert by_seq[g.seq] == ((g.seq,), 1)
    tokens, logits = by_seq[0]
    assert tokens[0] == 5 and logits == len(tokens)  # logits at every drafted position
    assert sum(len(t) for t, _ in by_seq.values()) <= 24


def test_forced_tokens_go_with_the_sampled_one_and_only_the_last_wants_logits() -> None:
    g = generation(0, sampled=5)
    g.pending.extend([6, 7])
    g.draft = (8, 9)
    ((_, tokens, logits),) = plan_step([g], capacity=64, step=0)
    assert tokens == (5, 6, 7, 8, 9) and logits == 3


def test_a_finished_requests_own_index_is_taken_over_not_rebuilt() -> None:
    conversation = ConversationIndex(capacity=64)
    speculation = NgramSpeculation(conversation)
    sequence = [1, 2, *COPIED, 3]
    speculation.propose(sequence, 4)
    conversation.remember([*sequence, 4, 5], speculation.index)
    assert conversation._sequences[0] is speculation.index
    assert speculation.index.tokens == [*sequence, 4, 5]
    conversation.remember(list(range(100, 200)))  # longer than it keeps: only its end
    assert conversation._tokens <= 64 + len(sequence) + 2
    assert len(conversation._sequences[0].tokens) == 64
