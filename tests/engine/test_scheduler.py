from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pensieved.engine.batcher import DecodeStats
from pensieved.engine.generation import Generation
from pensieved.engine.scheduler import Scheduler, choose_slot
from pensieved.engine.slots import Slot


def slot(index: int, cached: list[int], last_used: float) -> Slot:
    return Slot(index=index, tokens=list(cached), last_used=last_used)


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


def test_template_header_alone_does_not_claim_a_warm_slot() -> None:
    # Every prompt starts with the chat template's header; sharing only that with a long
    # conversation must not make a short request overwrite it while an empty slot exists.
    header = [1, 2, 3]
    long_conversation = header + list(range(100, 1100))
    slots = [slot(0, long_conversation, 1.0), slot(1, [], 5.0)]
    assert choose_slot(slots, (*header, 7, 7, 7)).index == 1


def test_without_empty_slot_the_cheapest_cache_is_evicted() -> None:
    header = [1, 2, 3]
    slots = [
        slot(0, header + list(range(100, 1100)), 1.0),  # long, least recently used
        slot(1, header + [50] * 40, 9.0),  # short, used just now
    ]
    values = {0: 1003.0, 1: 43.0}
    assert choose_slot(slots, (*header, 8, 8), values).index == 1


def test_a_branching_prompt_takes_an_empty_slot_where_the_prefix_is_shared() -> None:
    # The shared KV cache gives the empty slot the system prompt's cells without a copy, so
    # the other conversation's own turns need not be overwritten.
    system = list(range(10, 60))
    slots = [slot(0, system + [1] * 20, 1.0), slot(1, [], 5.0)]
    assert choose_slot(slots, (*system, 2, 2)).index == 1


def test_without_empty_slot_a_branching_prompt_keeps_its_slot_when_it_reuses_more() -> None:
    system = list(range(10, 60))
    slots = [slot(0, system + [1] * 20, 1.0), slot(1, [7] * 30, 5.0)]
    assert choose_slot(slots, (*system, 2, 2)).index == 0


@dataclass
class FakeRunner:
    """Takes generations and never runs them: these tests drive `_acquire`/`_release`."""

    submitted: list[Generation] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)

    def submit(self, generation: Generation) -> None:
        self.submitted.append(generation)

    def close(self) -> None:
        pass


def run_turns(scheduler: Scheduler, prompts: list[list[int]]) -> list[tuple[int, int]]:
    """Acquire, 'evaluate' and release each prompt in turn; (slot, reused tokens) per prompt."""

    async def go() -> list[tuple[int, int]]:
        placed = []
        for prompt in prompts:
            tokens = tuple(prompt)
            chosen = await scheduler._acquire(tokens)
            placed.append((chosen.index, chosen.shared_prefix(tokens)))
            chosen.tokens = list(prompt)
            scheduler._release(chosen)
        return placed

    return asyncio.run(go())


def scheduler_with(slots: int) -> Scheduler:
    return Scheduler(slots, FakeRunner())


def test_interleaved_conversations_and_side_requests_stay_warm() -> None:
    header = [1, 2, 3]
    a1 = header + [10] * 500
    b1 = header + [20] * 500
    sides = [header + [30 + i] * 20 for i in range(6)]
    a2 = a1 + [11] * 30
    b2 = b1 + [21] * 30
    scheduler = scheduler_with(3)
    try:
        placed = run_turns(
            scheduler, [a1, sides[0], b1, sides[1], a2, sides[2], b2, sides[3], [*a2, 12]]
        )
    finally:
        scheduler.close()
    a_slot, b_slot = placed[0][0], placed[2][0]
    assert a_slot != b_slot
    assert placed[4] == (a_slot, len(a1))
    assert placed[6] == (b_slot, len(b1))
    assert placed[8] == (a_slot, len(a2))
    assert all(index not in (a_slot, b_slot) for index, _ in placed[1::2][:4])


def test_a_stale_conversation_ages_out_under_many_side_requests() -> None:
    header = [1, 2, 3]
    stale = header + [10] * 200
    sides = [header + [100 + i] * 20 for i in range(40)]
    scheduler = scheduler_with(2)
    try:
        placed = run_turns(scheduler, [stale, *sides])
    finally:
        scheduler.close()
    stale_slot = placed[0][0]
    evicted_at = [i for i, (index, _) in enumerate(placed[1:], 1) if index == stale_slot]
    # Protected for a while (its value is ~10 side requests' worth), but not forever.
    assert evicted_at, "a conversation nobody returns to must eventually give up its slot"
    assert evicted_at[0] > 5


def test_waiters_get_slots_in_arrival_order() -> None:
    scheduler = scheduler_with(1)

    async def go() -> list[str]:
        order: list[str] = []
        first = await scheduler._acquire((1,))

        async def wait(name: str) -> None:
            got = await scheduler._acquire((2,))
            order.append(name)
            scheduler._release(got)

        tasks = [asyncio.create_task(wait(name)) for name in ("second", "third", "fourth")]
        await asyncio.sleep(0)
        assert scheduler.queued == 3
        scheduler._release(first)
        await asyncio.gather(*tasks)
        return order

    try:
        assert asyncio.run(go()) == ["second", "third", "fourth"]
    finally:
        scheduler.close()


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    scheduler = scheduler_with(1)

    async def go() -> bool:
        first = await scheduler._acquire((1,))
        gone = asyncio.create_task(scheduler._acquire((2,)))
        staying = asyncio.create_task(scheduler._acquire((3,)))
        await asyncio.sleep(0)
        scheduler._release(first)
        gone.cancel()  # woken with the slot promised, then cancelled before it ran
        got = await asyncio.wait_for(staying, 5)
        scheduler._release(got)
        return scheduler.running == 0 and scheduler.queued == 0

    try:
        assert asyncio.run(go())
    finally:
        scheduler.close()
