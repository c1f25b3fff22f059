from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.grammar import decode_bodies, load_tools, table, without_descriptions


def test_missing_capture_skips(tmp_path: Path) -> None:
    assert load_tools(tmp_path / "absent.json") is None
    capture = tmp_path / "capture.json"
    capture.write_text(json.dumps({"body": {"tools": [{"name": "Read"}]}}))
    assert load_tools(capture) == [{"name": "Read"}]


def test_only_prose_descriptions_go() -> None:
    tool = {
        "name": "Edit",
        "description": "Edits a file.",
        "input_schema": {
            "type": "object",
            # A property that happens to be called "description" is schema, not prose.
            "properties": {"description": {"type": "string", "description": "a summary"}},
        },
    }
    assert without_descriptions(tool) == {
        "name": "Edit",
        "input_schema": {"type": "object", "properties": {"description": {"type": "string"}}},
    }


def test_the_compared_requests_share_tools_and_differ_in_tool_choice() -> None:
    bodies = decode_bodies([{"name": "Write", "input_schema": {}}], 64)
    assert {b["tool_choice"]["type"] for b in bodies.values()} == {"none", "tool", "auto"}
    assert all(b["tools"] == bodies["free_text"]["tools"] for b in bodies.values())


def test_table_says_whether_the_goals_are_met() -> None:
    report: dict[str, Any] = {
        "generated_at": "2026-01-01T00:00:00+00:00",
        "model": {"path": "m.gguf"},
        "settings": {"reps": 3},
        "prompt_tokens": 5000,
        "build": {
            "tools": 25,
            "grammar_bytes": 92_000,
            "grammar_rules": 8_000,
            "grammar_depth": 256,
            "cold_s": 0.12,
            "cold_python_build_s": 0.03,
            "cached_s": 0.004,
            "cached_clone_s": 0.001,
        },
        "decode": {
            "max_tokens": 256,
            "tokens_per_s": {"free_text": 80.0, "forced_tool_call": 60.0, "auto_free_text": 79.0},
            "forced_over_free": 0.75,
            "auto_over_free": 0.99,
        },
    }
    report["sampling"] = {
        "tokens": 64,
        "threads": 1,
        "decode_ms_per_token": 20.0,
        "sample_ms_per_token": {
            "no_grammar": 0.2,
            "grammar_first": 6.1,
            "grammar_checked_after": 1.2,
        },
        "refused_first_picks": 46,
        "whole_vocabulary_steps": 4,
        "same_tokens": True,
    }
    text = table(report)
    assert "grammar first in llama.cpp's chain 6.10 ms" in text
    assert "Same tokens both ways: yes." in text
    assert "| grammar for the tool set, cached < 50 ms | 4.00 ms (cold 120 ms) | yes |" in text
    assert "| 0.75 (60.0 vs 80.0 tok/s) | no |" in text
