from __future__ import annotations

import threading
from typing import cast

from pensieved.engine.batcher import Batcher, plan_step
from pensieved.engine.generation import Generation
from pensieved.engine.kvpool import CellPool
from pensieved.engine.model import LoadedModel
from pensieved.engine.slots import Slot
from pensieved.engine.types import ChatMessage, Event, Failed, GenerationRequest, PreparedPrompt
from pensieved.errors import KvCacheFullError


def generation(seq: int, prompt: int, *, sampled: int | None = None) -> Generation:
    request = GenerationRequest(messages=(ChatMessage("user", "x"),), max_tokens=8)
    prepared = PreparedPrompt(request, tuple(range(1000, 1000 + prompt)), 8)
    g = Generation(Slot(seq), prepared, threading.Event(), lambda _: None, lambda: None)
    if sampled is not None:  # past its prompt, with a token to decode next
        g.evaluated = prompt
        g.next_token = sampled
    return g


def test_the_batch_is_in_sequence_order_whatever_the_arrival_order() -> None:
    running = [generation(2, 5, sampled=7), generation(0, 5, sampled=8), generation(1, 30)]
    adds = plan_step(running, capacity=64, step=0)
    assert [(g.seq, len(tokens), logits) for g, tokens, logits in adds] == [
        (0, 1, True),
        (1, 30, True),  # the whole prompt fits: logits for its last token
        (2, 1, True),
    ]


def test_sampled_tokens_go_first_and_prompts_fill_the_rest_oldest_first() -> None:
    old, new = generation(3, 100), generation(0, 100)
    running = [generation(1, 5, sampled=9), old, new]
    adds = plan_step(running, capacity=16, step=0)
    assert [(g.seq, len(tokens), logits) for g, tokens, logits in adds] == [
        (1, 1, True),
        (3, 15, False),  # the older prompt takes all the room left; no logits mid-prompt
    ]
    assert old.prompt_left == 85 and new.prompt_left == 100


def test_with_more_streams_than_room_the_waiting_ones_rotate() -> None:
    running = [generation(seq, 5, sampled=seq) for seq in range(4)]
    first = {g.seq for g, _, _ in plan_step(running, capacity=2, step=0)}
    second = {g.seq for g, _, _ in plan_step(running, capacity=2, step=1)}
    third = {g.seq for g, _, _ in plan_step(running, capacity=2, step=2)}
    assert len(first) == len(second) == 2
    assert first | second | third == {0, 1, 2, 3}


class BookModel:
    """Only the KV books: what `Batcher._make_room` reads and trims."""

    def __init__(self, capacity: int, slots: int) -> None:
        self.cells = CellPool(capacity, slots)

    def forget(self, seq: int, keep: int) -> int:
        self.cells.trim(seq, keep)
        return keep


def batcher_on(model: BookModel, running: list[Generation]) -> Batcher:
    batcher = object.__new__(Batcher)  # no llama.cpp batch: _make_room never decodes
    batcher._model = cast(LoadedModel, model)
    batcher._capacity = 512
    batcher._active = running
    return batcher


def test_a_full_cache_takes_cells_from_idle_slots_before_running_ones() -> None:
    model = BookModel(capacity=10, slots=3)
    idle = Slot(0, tokens=[1, 2, 3, 4, 5, 6], last_used=1.0)
    model.cells.append(0, 6)
    reader = generation(1, prompt=8)
    reader.peers = [idle, reader.slot]
    room = batcher_on(model, [reader])._make_room([reader])
    # 8 prompt tokens want cells; 4 were free, the idle slot gave 4 of its own.
    assert room == 8 and idle.tokens == [1, 2] and model.cells.length(0) == 2


def test_when_running_requests_alone_fill_the_cache_the_newest_is_ended() -> None:
    model = BookModel(capacity=10, slots=2)
    events: dict[int, list[Event]] = {0: [], 1: []}
    running = []
    for seq in (0, 1):
        g = generation(seq, prompt=5, sampled=7)
        g.emit = events[seq].append
        g.slot.tokens = list(range(5))
        model.cells.append(seq, 5)
        g.peers = []
        running.append(g)
    batcher = batcher_on(model, running)
    room = batcher._make_room(running)
    assert [g.seq for g in running] == [0] and room == 5
    failed = events[1][-1]
    assert isinstance(failed, Failed) and isinstance(failed.error, KvCacheFullError)
    assert "KV cache is full" in str(failed.error) and events[0] == []
    assert model.cells.length(1) == 0
