"""The cache strategies: one table of architectures and settings, what each picks and does."""

from __future__ import annotations

from typing import Literal

import pytest

from pensieved.engine.caching import architecture, choose
from pensieved.engine.caching.base import Architecture

SWA = Architecture("swa", 512)
HYBRID = Architecture("hybrid")
RECURRENT = Architecture("recurrent")
FULL = Architecture("full")
SLOTS, BATCH = 4, 512
AGENT_POOL = 4 * 32_768  # four slots of 32k, a cache each
SMALL_POOL = 2 * 2048


@pytest.mark.parametrize(
    ("arch", "swa_full", "pool", "name", "swa_full_param", "checkpoints", "persistable"),
    [
        (FULL, "auto", AGENT_POOL, "full-attention", True, False, True),
        (FULL, False, AGENT_POOL, "full-attention", True, False, True),
        # At an agent's context the small window cache plus checkpoints is far smaller...
        (SWA, "auto", AGENT_POOL, "swa-checkpoints", False, True, True),
        # ...at a short one the full-size cache is no larger, and needs no checkpoints.
        (SWA, "auto", SMALL_POOL, "swa-full", True, False, False),
        (SWA, True, AGENT_POOL, "swa-full", True, False, False),
        (SWA, False, SMALL_POOL, "swa-checkpoints", False, True, True),
        (HYBRID, "auto", AGENT_POOL, "recurrent-checkpoints", False, True, True),
        (HYBRID, True, AGENT_POOL, "recurrent-checkpoints", False, True, True),
        (RECURRENT, "auto", SMALL_POOL, "recurrent-checkpoints", False, True, True),
    ],
)
def test_each_architecture_gets_its_strategy(
    arch: Architecture,
    swa_full: bool | Literal["auto"],
    pool: int,
    name: str,
    swa_full_param: bool,
    checkpoints: bool,
    persistable: bool,
) -> None:
    strategy, why = choose(arch, swa_full, pool_tokens=pool, slots=SLOTS, batch=BATCH)
    assert strategy.name == name and why
    assert strategy.architecture == arch
    assert (strategy.swa_full, strategy.checkpoints) == (swa_full_param, checkpoints)
    assert strategy.persistable == persistable
    if arch.kind == "swa" and swa_full == "auto":
        assert "model.swa_full auto" in why


@pytest.mark.parametrize(
    ("arch", "pos_min", "length", "keep", "cuttable"),
    [
        (FULL, 0, 1000, 10, True),
        (RECURRENT, 999, 1000, 999, False),  # a recurrent state is the last position's only
        (RECURRENT, 999, 1000, 1000, True),  # nothing to cut
        (HYBRID, 999, 1000, 500, False),
        (SWA, 300, 1000, 900, True),  # the window before 900 is still held
        (SWA, 600, 1000, 900, False),  # it moved on: positions 389..599 are gone
        (SWA, 0, 1000, 100, True),
    ],
)
def test_where_a_sequence_can_be_cut(
    arch: Architecture, pos_min: int, length: int, keep: int, cuttable: bool
) -> None:
    strategy, _ = choose(arch, False, pool_tokens=AGENT_POOL, slots=SLOTS, batch=BATCH)
    assert strategy.can_cut(lambda seq: pos_min, 0, length, keep) == cuttable


def test_llama_cpp_facts_name_the_architecture() -> None:
    assert architecture(recurrent=True, hybrid=False, window=0).kind == "recurrent"
    assert architecture(recurrent=False, hybrid=True, window=0).describe() == (
        "hybrid recurrent + attention"
    )
    assert architecture(recurrent=False, hybrid=False, window=512).describe() == (
        "sliding-window attention (window 512)"
    )
    assert architecture(recurrent=False, hybrid=False, window=0).describe() == "full attention"
