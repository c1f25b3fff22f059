from __future__ import annotations

from pathlib import Path

import pytest

from bench.claude_code import (
    FIRST,
    FIXTURE,
    compare,
    continued,
    llama_server_kv_bytes,
    load_request,
    sides,
    target_ratios,
    with_first_message,
)


def captured() -> dict[str, object]:
    base = load_request(FIXTURE)
    if base is None:
        pytest.skip(f"no captured Claude Code request at {FIXTURE}")
    return base


def test_the_fixture_is_read_from_the_shared_folder_beside_the_repository() -> None:
    assert FIXTURE.resolve().parts[-4:] == (
        "shared",
        "fixtures",
        "claude-code",
        "default-tools.json",
    )


def test_an_absent_request_is_none(tmp_path: Path) -> None:
    assert load_request(tmp_path / "none.json") is None


def test_a_new_session_keeps_system_tools_and_reminder_and_changes_the_first_message() -> None:
    base = captured()
    new = with_first_message(base, "Another task.", 8)
    assert new["system"] == base["system"] and new["tools"] == base["tools"]
    assert FIRST in str(base["messages"]) and FIRST not in str(new["messages"])
    assert "Another task." in str(new["messages"])
    assert "system-reminder" in str(new["messages"][0])
    assert new["max_tokens"] == 8 and "metadata" not in new
    turn2 = continued(new, "Hi.", "Next.", 4)
    assert turn2["messages"][-2:] == [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Next."},
    ]


def test_llama_servers_kv_buffers_are_summed_from_its_log() -> None:
    log = (
        "llama_kv_cache:        CPU KV buffer size =   720.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    80.50 MiB\n"
    )
    assert llama_server_kv_bytes(log) == round(800.5 * 1024 * 1024)
    assert llama_server_kv_bytes("nothing") is None


def test_a_new_session_is_compared_with_evaluating_only_its_new_tokens() -> None:
    # Usage as the Messages API gives it: input_tokens are those not read from the cache.
    turn = {"ttft_s": 2.0, "input_tokens": 100, "cache_read_tokens": 20_000}
    new = {"ttft_s": 1.5, "input_tokens": 50, "cache_read_tokens": 20_000}
    result = {"turn2": turn, "new_session": new, "kv": {}, "cold": turn}
    # 100 new tokens took 2 s, so 50 should take 1 s; 1.5 s is 1.5 times that.
    assert target_ratios(result)["new_session_over_new_tokens_only"] == pytest.approx(1.5)


def _target(decode: float, kv: int, ttft: float) -> dict[str, object]:
    step = {"ttft_s": ttft}
    return {
        "four_sessions": {"aggregate_tokens_per_s": decode},
        "kv": {"allocated_bytes": kv},
        "cold": step,
        "turn2": step,
        "new_session": step,
    }


def test_targets_are_compared_per_cache_type_layout_and_server() -> None:
    report = {
        "targets": {
            "pensieved f16": _target(20.0, 900, 0.7),
            "pensieved q8_0": _target(45.0, 477, 0.3),
            "pensieved f16 per slot": _target(0.0, 2880, 0.84),
            "llama-server": _target(7.0, 2880, 0.7),
            "llama-server unified": {"error": "did not start"},
        }
    }
    ratios = compare(report)
    assert ratios["q8_0_decode_over_f16"] == pytest.approx(2.25)
    assert ratios["q8_0_kv_over_f16"] == pytest.approx(0.53)
    # A per-slot rate of 0 gives no decode ratio, not a division by zero.
    assert "shared_f16_decode_over_per_slot" not in ratios
    assert ratios["shared_f16_kv_over_per_slot"] == pytest.approx(900 / 2880)
    assert ratios["new_session_ttft_shared_f16_over_per_slot"] == pytest.approx(0.7 / 0.84)
    assert ratios["cold_ttft_pensieved_f16_over_llama-server"] == pytest.approx(1.0)
    assert not any("unified" in key for key in ratios)


def test_the_workload_runs_the_shared_cache_per_type_and_f16_per_slot() -> None:
    from bench.targets import Settings

    names = {name: side for name, side, _ in sides(Settings(2, 4, 32768, 512, "auto"), ["f16"])}
    assert names["pensieved f16"].kv_unified is True
    assert names["pensieved f16 per slot"].kv_unified is False
    assert names["llama-server unified"].llama_unified is True
