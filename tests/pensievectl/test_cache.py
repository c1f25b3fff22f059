"""`pensievectl cache` and the status rows for background prefills, from daemon replies."""

from __future__ import annotations

from typing import Any

from pensieve.wire import ModelEntryStatus, ModelStatus
from pensievectl.cache import format_cache
from pensievectl.status import _cache_rows
from tests.pensievectl.test_claude import model_status

NOW = 1_000.0


def entry(**model: Any) -> ModelEntryStatus:
    return ModelEntryStatus.model_validate(
        {
            "file": "Qwen3-8B-Q4_K_M.gguf",
            "path": "/m/Qwen3-8B-Q4_K_M.gguf",
            "names": ["(default)"],
            "state": "loaded",
            "since": 0.0,
            "model": {**model_status(), **model},
        }
    )


def report(**fields: Any) -> dict[str, Any]:
    base = {
        "time": NOW - 5,
        "prompt_tokens": 20_000,
        "cache_read_tokens": 19_000,
        "source": "slot 1",
        "candidate_tokens": 19_500,
    }
    return {**base, **fields}


def test_a_divergence_is_shown_with_both_sides() -> None:
    shown = format_cache(
        [
            entry(
                recent_requests=[
                    report(
                        diverged_at=19_000,
                        common="Primary working directory: /home/ana/",
                        prompt_next="blog\n",
                        cached_next="shop\n",
                    )
                ]
            )
        ],
        now=NOW,
    )
    assert "5s ago: 20000 prompt tokens, 19000 read from the cache (95%, slot 1)" in shown
    assert "diverged at token 19000 from the best cached candidate (19500 tokens)" in shown
    assert 'prompt: "blog\\n"' in shown and 'cached: "shop\\n"' in shown


def test_a_whole_prefix_nothing_cached_and_a_background_prefill() -> None:
    shown = format_cache(
        [
            entry(
                recent_requests=[
                    report(),
                    report(cache_read_tokens=0, source="none", candidate_tokens=0),
                ],
                background_prefills=[{"slot": 0, "evaluated": 512, "prompt_tokens": 4021}],
            )
        ],
        now=NOW,
    )
    assert "the cache held a whole prefix of the prompt" in shown
    assert "none cached\n    nothing was cached" in shown
    assert "slot 0: evaluating a hung-up client's prompt for its retry, 512 of 4021" in shown


def test_no_model_loaded() -> None:
    unloaded = ModelEntryStatus.model_validate(
        {"file": "a.gguf", "path": "/a.gguf", "names": [], "state": "unloaded", "since": 0.0}
    )
    assert format_cache([unloaded]) == "no model is loaded"


def test_status_lists_background_prefills() -> None:
    model = ModelStatus.model_validate(
        {
            **model_status(),
            "background_prefills": [{"slot": 1, "evaluated": 9, "prompt_tokens": 99}],
        }
    )
    rows = dict(_cache_rows(model))
    assert (
        rows["background"]
        == "slot 1: a hung-up client's prompt, 9 of 99 tokens evaluated for its retry"
    )
