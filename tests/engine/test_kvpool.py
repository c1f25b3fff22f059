from __future__ import annotations

from pensieved.engine.kvpool import CellPool, Eviction


def four_sessions_on_one_prefix(prefix: int = 1000, tail: int = 50) -> CellPool:
    pool = CellPool(capacity=2000, slots=4)
    pool.append(0, prefix + tail)
    for index in (1, 2, 3):
        pool.share(0, index, prefix)
        pool.append(index, tail)
    return pool


def test_a_shared_prefix_is_counted_once() -> None:
    pool = four_sessions_on_one_prefix()
    assert pool.used == 1000 + 4 * 50
    assert pool.shared == 1000
    assert [pool.own(i) for i in range(4)] == [50] * 4
    # The real cost of a session: its own cells plus a quarter of the prefix.
    assert pool.cost(2) == 50 + 1000 / 4


def test_cells_are_freed_by_their_last_holder() -> None:
    pool = four_sessions_on_one_prefix()
    assert pool.trim(0, 0) == 50  # the prefix stays: three others hold it
    assert pool.shared == 1000
    for index in (1, 2):
        pool.trim(index, 0)
    assert pool.shared == 0 and pool.own(3) == 1050
    assert pool.trim(3, 0) == 1050 and pool.used == 0


def test_sharing_replaces_what_the_target_held() -> None:
    pool = CellPool(capacity=100, slots=2)
    pool.append(0, 10)
    pool.append(1, 7)
    pool.share(0, 1, 4)
    assert pool.used == 10 and pool.shared == 4 and pool.length(1) == 4


def test_private_from_is_where_a_slots_own_tail_starts() -> None:
    pool = four_sessions_on_one_prefix()
    assert pool.private_from(1) == 1000
    pool.append(0, 0)
    lone = CellPool(capacity=10, slots=1)
    lone.append(0, 5)
    assert lone.private_from(0) == 0


def test_no_eviction_while_cells_are_free() -> None:
    pool = four_sessions_on_one_prefix()
    assert pool.plan_eviction(pool.free, idle=[1, 2]) == []


def test_eviction_takes_the_least_recent_idle_tails_first_and_only_what_is_missing() -> None:
    pool = four_sessions_on_one_prefix()  # 1200 used of 2000
    plan = pool.plan_eviction(830, idle=[2, 1])  # slot 2 least recently used
    assert plan == [Eviction(2, 1020)]  # 30 of its own 50 cells, its prefix kept
    plan = pool.plan_eviction(870, idle=[2, 1])
    assert plan == [Eviction(2, 1000), Eviction(1, 1030)]


def test_eviction_never_frees_a_running_sessions_prefix() -> None:
    pool = four_sessions_on_one_prefix()
    # Slots 0 and 3 are running; 1 and 2 idle. Even asked for everything, the prefix the
    # running ones hold stays: clearing idle slots whole frees only their own cells.
    plan = pool.plan_eviction(2000, idle=[1, 2])
    for eviction in plan:
        pool.trim(eviction.index, eviction.keep)
    assert pool.length(1) == pool.length(2) == 0
    assert pool.length(0) == pool.length(3) == 1050
    assert pool.used == 1100 and pool.shared == 1000


def test_a_prefix_only_idle_slots_share_goes_last() -> None:
    pool = CellPool(capacity=300, slots=3)
    pool.append(0, 100)
    pool.share(0, 1, 100)
    pool.append(1, 20)
    pool.append(2, 150)  # running, unrelated
    plan = pool.plan_eviction(pool.free + 30, idle=[0, 1])
    # Own tails first (slot 1's 20), then a whole slot; the shared prefix becomes slot 1's
    # own once slot 0 lets go, which frees nothing yet, so slot 1 goes whole as well.
    assert plan == [Eviction(1, 100), Eviction(0, 0), Eviction(1, 0)]


def test_with_a_cache_per_slot_a_shared_prefix_is_a_copy() -> None:
    pool = CellPool(capacity=300, slots=3, copies=True)
    pool.append(0, 100)
    pool.share(0, 1, 60)
    used, shared, parts = pool.snapshot()
    assert (used, shared) == (160, 0) and pool.common(0, 1) == 0
    assert [(p.tokens, p.own, p.cost) for p in parts[:2]] == [(100, 100, 100.0), (60, 60, 60.0)]
    assert pool.trim(0, 0) == 100 and pool.length(1) == 60
