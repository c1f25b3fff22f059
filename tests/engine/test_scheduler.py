from __future__ import annotations

from dataclasses import dataclass, field

from pensieved.engine.generate import Slot
from pensieved.engine.scheduler import choose_slot


@dataclass
class FakeLlama:
    _input_ids: list[int] = field(default_factory=list)


def slot(index: int, cached: list[int], last_used: float) -> Slot:
    return Slot(index=index, llm=FakeLlama(cached), last_used=last_used)


def test_longest_prefix_wins() -> None:
    slots = [slot(0, [1, 2], 5.0), slot(1, [1, 2, 3, 4], 1.0), slot(2, [9], 0.0)]
    assert choose_slot(slots, (1, 2, 3, 4, 5)).index == 1


def test_no_match_takes_least_recently_used() -> None:
    slots = [slot(0, [7], 5.0), slot(1, [8], 1.0), slot(2, [9], 3.0)]
    assert choose_slot(slots, (1, 2)).index == 1


def test_interleaved_conversations_keep_their_slots() -> None:
    a, b = [1, 1, 1, 1], [2, 2, 2, 2]
    slots = [slot(0, a, 1.0), slot(1, b, 2.0)]
    assert choose_slot(slots, (*a, 5)).index == 0
    assert choose_slot(slots, (*b, 6)).index == 1
