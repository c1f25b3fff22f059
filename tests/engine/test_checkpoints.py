"""The checkpoint books: bounded per slot and in bytes, trimmed with the slot, shared."""

from __future__ import annotations

from pensieved.engine.checkpoints import Checkpoint, Checkpoints


def at(position: int, size: int = 10) -> Checkpoint:
    return Checkpoint(position, bytes(size))


def test_the_newest_at_or_before_a_position_is_the_one_restored() -> None:
    books = Checkpoints(2)
    for position in (100, 500, 900):
        books.add(0, at(position))
    found = books.newest_at_or_before(0, 899)
    assert found is not None and found.position == 500
    assert books.newest_at_or_before(0, 99) is None
    assert books.newest_at_or_before(1, 10_000) is None


def test_a_slot_keeps_at_most_its_share_and_always_its_first() -> None:
    books = Checkpoints(1, per_slot=3)
    for position in (100, 200, 300, 400, 500):
        books.add(0, at(position))
    assert books.status(0).positions == [100, 400, 500]
    books.add(0, at(400, size=99))  # the same position again replaces it
    assert books.status(0).positions == [100, 400, 500] and books.status(0).bytes == 119


def test_the_byte_limit_drops_checkpoints_of_the_slot_holding_most() -> None:
    books = Checkpoints(2, max_bytes=35)
    books.add(0, at(100))
    books.add(0, at(200))
    books.add(0, at(300))
    books.add(1, at(50))
    assert books.total_bytes() == 30
    assert books.status(0).positions == [200, 300] and books.status(1).positions == [50]
    assert not books.add(1, at(60, size=36))  # alone over the limit: not kept


def test_trimming_a_slot_drops_what_lies_beyond_and_sharing_copies_what_lies_before() -> None:
    books = Checkpoints(2)
    for position in (100, 500, 900):
        books.add(0, at(position))
    books.share(0, 1, 600)
    assert books.status(1).positions == [100, 500]
    assert books.total_bytes() == 30  # shared checkpoints are counted once
    books.trim(0, 499)
    assert books.status(0).positions == [100]
    assert books.status(1).count == 2
