"""Generation: a request on its slot, with a scripted model (no weights: sampling is not run)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

from pensieved.engine.caching.base import Architecture, CacheStrategy
from pensieved.engine.caching.full import FullAttention
from pensieved.engine.caching.recurrent import RecurrentCheckpoints
from pensieved.engine.generation import (
    CHECKPOINT_BEFORE_END,
    CHECKPOINT_EVERY,
    COPY_MIN_TOKENS,
    Generation,
    checkpoint_marks,
)
from pensieved.engine.model import LoadedModel
from pensieved.engine.slots import Slot
from pensieved.engine.types import (
    ChatMessage,
    Event,
    Finished,
    GenerationRequest,
    PreparedPrompt,
    PromptCached,
    TextPiece,
)

END = 0  # the scripted model's end-of-generation token


class ScriptedModel:
    n_vocab = 100

    def __init__(self, *, unified: bool = True, strategy: CacheStrategy | None = None) -> None:
        self.unified = unified
        self.strategy = strategy or FullAttention()
        self.shares: list[tuple[int, int, int]] = []
        self.forgotten: list[tuple[int, int]] = []

    def forget(self, seq: int, keep: int) -> int:
        self.forgotten.append((seq, keep))
        return keep

    def share_prefix(self, source: int, target: int, count: int, minimum: int = 0) -> int:
        self.shares.append((source, target, count))
        return count

    def is_end_of_generation(self, token: int) -> bool:
        return token == END

    def token_bytes(self, token: int) -> bytes:
        return f"<{token}>".encode()

    def token_text(self, tokens: Sequence[int]) -> str:
        return "".join(f"<{t}>" for t in tokens)


def _generation(
    prompt: tuple[int, ...], slot: Slot, peers: tuple[Slot, ...] = (), max_tokens: int = 8
) -> tuple[Generation, list[Event], list[bool]]:
    request = GenerationRequest(messages=(ChatMessage("user", "x"),), max_tokens=max_tokens)
    events: list[Event] = []
    done: list[bool] = []
    prepared = PreparedPrompt(request, prompt, max_tokens)
    g = Generation(slot, prepared, threading.Event(), events.append, lambda: done.append(True))
    g.peers = peers
    return g, events, done


def _model(scripted: ScriptedModel) -> LoadedModel:
    return cast(LoadedModel, cast(Any, scripted))


def test_the_cached_prefix_is_reused_and_the_rest_taken_in_chunks() -> None:
    prompt = tuple(range(1, 21))
    slot = Slot(0, tokens=[*prompt[:12], 99, 99])
    g, events, _ = _generation(prompt, slot)
    model = ScriptedModel()
    g.begin(_model(model))
    assert model.forgotten == [(0, 12)] and slot.tokens == list(prompt[:12])
    assert events == [PromptCached(12)]
    assert (g.take_prompt(5), g.take_prompt(5), g.take_prompt(5)) == (
        prompt[12:17],
        prompt[17:],
        (),
    )
    assert g.prompt_left == 0
    g.end()


def test_a_whole_cached_prompt_still_evaluates_its_last_token() -> None:
    prompt = (1, 2, 3)
    g, events, _ = _generation(prompt, Slot(0, tokens=[1, 2, 3]))
    g.begin(_model(ScriptedModel()))
    assert events == [PromptCached(2)] and g.take_prompt(10) == (3,)
    g.end()


def test_a_longer_prefix_elsewhere_is_shared_and_kept_when_the_request_ends_early() -> None:
    prompt = tuple(range(1, 40))
    donor = Slot(1, tokens=list(prompt[:-1]))
    slot = Slot(0)
    g, _, done = _generation(prompt, slot, peers=(slot, donor))
    model = ScriptedModel()
    g.begin(_model(model))
    assert model.shares == [(1, 0, len(prompt) - 1)] and g.reused == len(prompt) - 1
    g.end()
    g.end()  # safe twice
    # Shared cells are there at once (no copy is pending), so an early end keeps them.
    assert slot.tokens == list(prompt[:-1]) and done == [True]


def test_even_a_short_gain_is_shared_since_sharing_copies_nothing() -> None:
    prompt = tuple(range(1, 40))
    donor = Slot(1, tokens=list(prompt[:3]))
    g, _, _ = _generation(prompt, Slot(0, tokens=[1, 2]), peers=(donor,))
    model = ScriptedModel()
    g.begin(_model(model))
    assert model.shares == [(1, 0, 3)] and g.reused == 3
    g.end()


def test_with_a_cache_per_slot_only_a_gain_worth_a_copy_is_copied() -> None:
    prompt = tuple(range(1, 80))
    short = Slot(1, tokens=list(prompt[: COPY_MIN_TOKENS - 1]))
    g, _, _ = _generation(prompt, Slot(0), peers=(short,))
    model = ScriptedModel(unified=False)
    g.begin(_model(model))
    assert model.shares == [] and g.reused == 0
    g.end()
    long = Slot(1, tokens=list(prompt[:COPY_MIN_TOKENS]))
    g, _, _ = _generation(prompt, Slot(0), peers=(long,))
    g.begin(_model(model))
    assert model.shares == [(1, 0, COPY_MIN_TOKENS)] and g.reused == COPY_MIN_TOKENS
    g.end()


def test_a_copy_no_decode_has_landed_is_dropped_when_the_request_ends() -> None:
    prompt = tuple(range(1, 80))
    donor = Slot(1, tokens=list(prompt[:-1]))
    slot = Slot(0)
    g, _, done = _generation(prompt, slot, peers=(donor,))
    model = ScriptedModel(unified=False)
    g.begin(_model(model))
    model.forgotten.clear()
    g.end()
    # llama.cpp copies a per-slot cache at the next decode; none ran, so nothing is there.
    assert model.forgotten == [(0, 0)] and slot.tokens == [] and done == [True]


def test_a_copy_a_decode_has_landed_is_kept() -> None:
    prompt = tuple(range(1, 80))
    slot = Slot(0)
    g, _, _ = _generation(prompt, slot, peers=(Slot(1, tokens=list(prompt[:-1])),))
    model = ScriptedModel(unified=False)
    g.begin(_model(model))
    model.forgotten.clear()
    g.decoded = True
    g.end()
    assert model.forgotten == [] and slot.tokens == list(prompt[:-1])


def test_an_equal_prefix_elsewhere_is_not_taken() -> None:
    prompt = tuple(range(1, 40))
    donor = Slot(1, tokens=list(prompt[:5]))
    g, _, _ = _generation(prompt, Slot(0, tokens=list(prompt[:5])), peers=(donor,))
    model = ScriptedModel()
    g.begin(_model(model))
    assert model.shares == [] and g.reused == 5
    g.end()


def test_tokens_become_text_until_the_end_of_turn() -> None:
    g, events, done = _generation((1, 2), Slot(0))
    model = _model(ScriptedModel())
    g.begin(model)
    assert not g.accept(model, 5) and g.next_token == 5
    assert not g.accept(model, 6)
    assert g.accept(model, END)
    g.finish()
    assert events[1:] == [
        TextPiece("<5>"),
        TextPiece("<6>"),
        Finished("end_turn", None, input_tokens=2, output_tokens=2, cache_read_tokens=0),
    ]
    assert done == [True] and g.sampler is None


def test_max_tokens_ends_the_generation() -> None:
    g, events, _ = _generation((1, 2), Slot(0), max_tokens=2)
    model = _model(ScriptedModel())
    g.begin(model)
    assert not g.accept(model, 5)
    assert g.accept(model, 6)
    g.finish()
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stop_reason == "max_tokens"
    assert finished.output_tokens == 2


# ---- the cache report and the background prefill ----------------------------------------------


def test_the_report_names_where_the_prompt_left_the_best_cached_candidate() -> None:
    cached = Slot(1, tokens=[1, 2, 3, 4, 5, 6, 7, 8])
    prompt = (1, 2, 3, 4, 50, 60, 70, 80, 90)
    g, _, _ = _generation(prompt, Slot(0), peers=(Slot(0), cached))
    g.begin(_model(ScriptedModel()))
    report = g.report
    assert report is not None
    assert (report.prompt_tokens, report.cache_read_tokens, report.source) == (9, 4, "slot 1")
    assert (report.candidate_tokens, report.diverged_at) == (8, 4)
    assert report.common == "<1><2><3><4>"
    assert report.prompt_next.startswith("<50><60>") and report.cached_next == "<5><6><7><8>"


def test_a_next_turn_reports_no_divergence_and_a_restored_slot_says_so() -> None:
    slot = Slot(0, tokens=[1, 2, 3], restored=True)
    g, _, _ = _generation((1, 2, 3, 4, 5), slot, peers=(slot,))
    g.begin(_model(ScriptedModel()))
    assert g.report is not None and g.report.diverged_at is None
    assert g.report.source == "slot 0 (restored from disk)" and not slot.restored


def test_nothing_cached_reads_from_nowhere() -> None:
    g, _, _ = _generation((1, 2, 3), Slot(0), peers=(Slot(0), Slot(1)))
    g.begin(_model(ScriptedModel()))
    assert g.report is not None
    assert (g.report.source, g.report.candidate_tokens, g.report.diverged_at) == ("none", 0, None)


def test_only_a_prompt_still_being_read_goes_on_in_the_background() -> None:
    g, events, _ = _generation(tuple(range(1, 21)), Slot(0))
    g.begin(_model(ScriptedModel()))
    g.take_prompt(8)
    assert g.go_background() and g.background
    g.emit(PromptCached(0))
    assert events == [PromptCached(0)]  # silenced: the client is gone
    done, _, _ = _generation(tuple(range(1, 5)), Slot(1))
    done.begin(_model(ScriptedModel()))
    done.take_prompt(10)
    assert not done.go_background()  # the whole prompt is in: nothing left to gain


def test_checkpoints_go_at_the_first_and_last_but_one_message_the_end_and_regularly() -> None:
    length = 2 * CHECKPOINT_EVERY + 100
    marks = checkpoint_marks(length, 0, content_ends=(700, 5000, length - 3))
    assert marks == (
        700,  # the system prompt's end
        CHECKPOINT_EVERY,
        5000,  # where the last message starts
        2 * CHECKPOINT_EVERY,
        length - CHECKPOINT_BEFORE_END,
        length,
    )
    assert checkpoint_marks(length, 5000, (700, 5000, length - 3))[0] == 2 * CHECKPOINT_EVERY


def test_a_model_that_cannot_cut_back_takes_its_prompt_in_chunks_ending_at_checkpoints() -> None:
    prompt = tuple(range(1, 1001))
    slot = Slot(0)
    g, _, _ = _generation(prompt, slot)
    g.prepared = PreparedPrompt(g.prepared.request, prompt, 8, content_ends=(300, 990))
    g.begin(_model(ScriptedModel(strategy=RecurrentCheckpoints(Architecture("recurrent")))))
    chunks = []
    while g.prompt_left:
        chunks.append(len(g.take_prompt(512)))
    assert chunks == [300, 512, 188 - CHECKPOINT_BEFORE_END, CHECKPOINT_BEFORE_END]


def test_a_full_attention_model_takes_no_checkpoints() -> None:
    prompt = tuple(range(1, 1001))
    g, _, _ = _generation(prompt, Slot(0))
    g.begin(_model(ScriptedModel()))
    assert g.marks == () and len(g.take_prompt(512)) == 512
