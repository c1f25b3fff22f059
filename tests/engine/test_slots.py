from __future__ import annotations

from pensieved.engine.slots import Slot, best_donor


def test_the_slot_with_the_longest_shared_prefix_donates() -> None:
    system = list(range(1000))
    own = Slot(0)
    short = Slot(1, tokens=system[:100])
    long = Slot(2, tokens=[*system, 7, 7, 7])
    donor, shared = best_donor(own, [own, short, long], (*system, 9))
    assert donor is long and shared == len(system)


def test_the_own_slot_wins_ties() -> None:
    prompt = tuple(range(50))
    own = Slot(0, tokens=list(prompt[:30]))
    other = Slot(1, tokens=list(prompt[:30]))
    assert best_donor(own, [other, own], prompt) == (own, 30)
