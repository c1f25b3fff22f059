from __future__ import annotations

from typing import Any

from bench.report import ratios, table

MB = 1024 * 1024


def report() -> dict[str, Any]:
    return {
        "settings": {"threads": 2, "slots": 4, "context_size": 8192, "reps": 3},
        "decode": {
            "tokens_per_s": {"pensieved": 90.0, "llama-server": 100.0},
            # The machine slows down in the middle: pairs stay comparable, medians less so.
            "runs": {"pensieved": [96.0, 50.0, 90.0], "llama-server": [100.0, 52.0, 100.0]},
        },
        "ttft": {
            "ttft_s": {
                "pensieved": {"cold": 10.0, "warm": 1.1, "warm_interleaved": 1.3},
                "llama-server": {"cold": 10.0, "warm": 1.0, "warm_interleaved": 1.4},
            },
            "in_process_eval_floor": {
                "warm": {"eval_new_tokens_s": 1.0, "cached_tokens": 4900, "new_tokens": 76},
                "warm_interleaved": {"eval_new_tokens_s": 1.0},
            },
        },
        "concurrency": {
            "by_clients": {
                "4": {
                    "pensieved": {"aggregate_tokens_per_s": 80.0},
                    "llama-server": {"aggregate_tokens_per_s": 100.0},
                }
            }
        },
        "memory": {
            "model_file_bytes": 100 * MB,
            "kv_bytes_total": 700 * MB,
            "pensieved": {"rss_peak_under_load_bytes": 900 * MB},
        },
    }


def test_ratios_and_goals_follow_the_measurements() -> None:
    r = ratios(report())
    assert r["decode_vs_llama_server"] == 0.9
    assert r["decode_vs_llama_server_paired"] == 0.96
    assert r["ttft_warm_vs_eval_new_tokens"] == 1.1
    assert r["pensieved_rss_beyond_model_and_kv_mb"] == 100
    # decode, warm, warm interleaved (1.3 against 1.0), cold, 4 clients, memory
    assert [goal["met"] for goal in r["goals"]] == [False, True, False, True, False, True]


def test_unequal_run_lists_give_no_paired_ratio() -> None:
    data = report()
    data["decode"]["runs"]["pensieved"].pop()
    assert ratios(data)["decode_vs_llama_server_paired"] is None


def test_the_table_shows_each_goal_and_marks_misses() -> None:
    data = report()
    data["ratios"] = ratios(data)
    text = table(data)
    assert "| decode throughput >= 0.95 x llama-server | 0.90 | **no** |" in text
    assert "median of per-repetition ratios: 0.96" in text
