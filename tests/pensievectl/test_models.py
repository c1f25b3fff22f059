"""`pensievectl models`: its table and its command line (the daemon side is in
tests/integration/test_models.py)."""

from __future__ import annotations

from pensieve.wire import ModelEntryStatus, ModelsResponse
from pensievectl.cli import build_parser
from pensievectl.models import format_models

NOW = 1_800_000_000.0


def status(**fields: object) -> ModelEntryStatus:
    base: dict[str, object] = {
        "file": "a.gguf",
        "path": "/m/a.gguf",
        "names": ["(default)"],
        "state": "loaded",
        "since": NOW - 90,
    }
    return ModelEntryStatus.model_validate({**base, **fields})


def test_the_table_shows_state_memory_caches_and_last_use() -> None:
    reply = ModelsResponse(
        models=[
            status(
                memory_bytes=300 * 1024 * 1024,
                cached_tokens=812,
                last_used=NOW - 5,
                tool_dialect="qwen3-xml",
                tool_dialect_source="detected",
            ),
            status(
                file="b.gguf",
                path="/m/b.gguf",
                names=["claude-haiku-*"],
                state="unloaded",
                since=NOW - 3600,
                unloaded_at=NOW - 3600,
                disk_cached_tokens=20_000,
                disk_cache_bytes=2 * 1024 * 1024,
                error="model file not found: /m/b.gguf",
            ),
        ],
        aliases={"claude-haiku-*": "/m/b.gguf"},
        idle_unload_s=900,
        max_loaded_models=2,
    )
    lines = format_models(reply, now=NOW).splitlines()
    assert lines[0].split() == [
        "MODEL", "STATE", "SINCE", "MEMORY", "CACHED", "ON", "DISK", "LAST", "USE", "TOOL",
        "DIALECT", "CACHE", "SERVES"
    ]  # fmt: skip
    assert lines[1].split() == [
        "a.gguf", "loaded", "1m", "30s", "ago", "300.0", "MB", "812", "0", "5s", "ago",
        "qwen3-xml", "(detected)", "-", "(default)",
    ]  # fmt: skip
    assert "b.gguf" in lines[2] and "unloaded" in lines[2] and "1h 0m ago" in lines[2]
    assert "20000 (2.0 MB)" in lines[2] and lines[2].endswith("claude-haiku-*")
    assert "(idle unload after 15m 0s; at most 2 loaded at once)" in lines
    assert "b.gguf: model file not found: /m/b.gguf" in lines


def test_no_idle_unload_is_said_plainly() -> None:
    reply = ModelsResponse(models=[], aliases={}, idle_unload_s=0, max_loaded_models=1)
    assert "(no idle unload; at most 1 loaded at once)" in format_models(reply, now=NOW)


def test_the_command_line() -> None:
    parser = build_parser()
    args = parser.parse_args(["models", "--json"])
    assert (args.command, args.models_command, args.json) == ("models", None, True)
    args = parser.parse_args(["models", "load", "claude-haiku-*", "--json"])
    assert (args.models_command, args.name, args.json_action) == ("load", "claude-haiku-*", True)
    args = parser.parse_args(["models", "unload", "b.gguf"])
    assert (args.models_command, args.name) == ("unload", "b.gguf")


def test_a_loaded_models_speculation_is_summed_up_in_one_line() -> None:
    from pensieve.wire import SpeculationStatus
    from pensievectl.status import speculation_summary

    idle = SpeculationStatus(mode="auto", note="n-gram drafts and jump-forward")
    assert speculation_summary(idle) == "n-gram drafts and jump-forward"
    busy = SpeculationStatus(
        mode="auto",
        note="n-gram drafts and jump-forward",
        drafts=40,
        drafted=160,
        accepted=120,
        forced=30,
        acceptance_rate=0.75,
        tokens_per_step=2.5,
        gained=150,
    )
    assert speculation_summary(busy) == (
        "n-gram drafts and jump-forward; 2.50 tokens per step, 150 tokens gained "
        "(120 of 160 drafted accepted, 75%; 30 forced by a grammar)"
    )
