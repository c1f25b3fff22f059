from __future__ import annotations

import threading

from pensieved.engine.batcher import plan_step
from pensieved.engine.generation import Generation
from pensieved.engine.slots import Slot
from pensieved.engine.types import ChatMessage, GenerationRequest, PreparedPrompt


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
