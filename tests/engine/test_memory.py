from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pensieve.config import ModelConfig
from pensieve.gguf import read_gguf_metadata
from pensieve.paths import bundled_model_path
from pensieved.engine import memory
from pensieved.engine.memory import (
    AGENT_CONTEXT,
    MemoryBudgetError,
    ModelShape,
    budget_bytes,
    choose_layout,
    kv_bytes_per_token,
    plan_kv,
    pool_tokens,
    read_shape,
    shape_from_metadata,
)

MB = 1024 * 1024
GB = 1024 * MB
# A 7B model with grouped-query attention (Qwen2.5-7B's shape).
SEVEN_B = ModelShape(n_layer=28, n_head_kv=4, head_dim=128, head_dim_v=128, n_ctx_train=131_072)


def test_f16_bytes_per_token_is_k_and_v_of_every_layer() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64.
    assert kv_bytes_per_token(30, 3, 64, "f16") == 30 * 2 * 3 * 64 * 2


def test_quantized_caches_are_whole_blocks() -> None:
    f16 = kv_bytes_per_token(28, 4, 128, "f16")
    q8 = kv_bytes_per_token(28, 4, 128, "q8_0")
    q4 = kv_bytes_per_token(28, 4, 128, "q4_0")
    assert q8 == 28 * 2 * (512 // 32) * 34
    assert q4 == 28 * 2 * (512 // 32) * 18
    assert q8 <= 0.55 * f16 and q4 <= 0.3 * f16


def test_a_separate_value_head_size_counts() -> None:
    assert kv_bytes_per_token(1, 1, 192, "f16", head_dim_v=128) == (192 + 128) * 2


def test_the_default_budget_is_half_of_physical_memory() -> None:
    assert budget_bytes(ModelConfig(), physical=16 * GB) == 8 * GB
    assert budget_bytes(ModelConfig(memory_budget_mb=3000), physical=16 * GB) == 3000 * MB


def test_auto_takes_the_training_context_when_it_fits() -> None:
    small = ModelShape(30, 3, 64, 64, n_ctx_train=8192)
    plan = plan_kv(ModelConfig(), small, weights=100 * MB, physical=16 * GB)
    assert plan.context_size == 8192 and plan.slots == 4
    assert "training context" in plan.reason and "fits" in plan.reason
    assert plan.fits


@pytest.mark.parametrize("budget_mb", [6000, 8192, 12000])
def test_auto_caps_the_context_to_fit_a_budget(budget_mb: int) -> None:
    weights = int(4.4 * GB)
    config = ModelConfig(memory_budget_mb=budget_mb)
    plan = plan_kv(config, SEVEN_B, weights=weights)
    assert plan.context_size < SEVEN_B.n_ctx_train
    assert plan.total_bytes <= budget_mb * MB
    assert plan.context_size % memory.CONTEXT_STEP == 0
    # The largest that fits: one step more would not.
    bigger = pool_tokens(plan.context_size + memory.CONTEXT_STEP, plan.slots)
    assert weights + bigger * plan.bytes_per_token > budget_mb * MB
    assert "capped by model.memory_budget_mb" in plan.reason


def test_a_16gb_laptop_gets_an_agent_context_for_a_7b_model_with_q8() -> None:
    plan = plan_kv(
        ModelConfig(kv_cache_type="q8_0"), SEVEN_B, weights=int(4.4 * GB), physical=16 * GB
    )
    assert plan.context_size >= 2 * AGENT_CONTEXT and not plan.below_agent_context
    assert plan.fits


def test_a_small_context_is_flagged_for_agents() -> None:
    plan = plan_kv(ModelConfig(context_size=8192), SEVEN_B, weights=GB, physical=16 * GB)
    assert plan.below_agent_context and plan.reason.startswith("context 8192 as configured")


def test_a_budget_too_small_for_any_context_is_an_error_naming_the_key() -> None:
    with pytest.raises(MemoryBudgetError, match=r"model\.memory_budget_mb"):
        plan_kv(ModelConfig(memory_budget_mb=4500), SEVEN_B, weights=int(4.4 * GB))


def test_the_shared_pool_holds_one_conversation_and_a_quarter() -> None:
    assert pool_tokens(32_768, 1) == 32_768
    assert pool_tokens(32_768, 4) == 40_960
    # Four sessions' worth of cells would be 4x; the pool stays far below.
    assert pool_tokens(65_536, 8) <= 1.3 * 65_536


def test_explicit_slots_are_kept() -> None:
    plan = plan_kv(ModelConfig(slots=2, context_size=4096, kv_unified=True), SEVEN_B, weights=GB)
    assert (plan.slots, plan.context_size, plan.pool_tokens) == (2, 4096, 5120)


@pytest.mark.parametrize(
    ("setting", "slots", "fits", "gpu", "unified", "why"),
    [
        (True, 4, True, False, True, "model.kv_unified true"),
        (False, 4, False, True, False, "model.kv_unified false"),
        ("auto", 1, False, True, False, "one slot"),
        ("auto", 4, True, True, True, "GPU"),
        ("auto", 4, False, False, True, "would not fit"),
        ("auto", 4, True, False, False, "on a CPU"),
    ],
)
def test_the_layout_follows_the_setting_the_backend_and_the_budget(
    setting: bool | str, slots: int, fits: bool, gpu: bool, unified: bool, why: str
) -> None:
    chosen, reason = choose_layout(setting, slots, fits, gpu)  # type: ignore[arg-type]
    assert chosen is unified and why in reason


def test_on_a_cpu_auto_gives_each_slot_its_own_cache_when_they_fit() -> None:
    small = ModelShape(30, 3, 64, 64, n_ctx_train=8192)
    plan = plan_kv(ModelConfig(), small, weights=100 * MB, physical=16 * GB)
    assert not plan.unified and plan.pool_tokens == 4 * 8192
    assert "per slot" in plan.reason and plan.fits
    on_gpu = plan_kv(ModelConfig(), small, weights=100 * MB, physical=16 * GB, gpu=True)
    assert on_gpu.unified and on_gpu.pool_tokens == pool_tokens(8192, 4)


def test_on_a_cpu_auto_shares_the_cache_when_caches_per_slot_would_not_fit() -> None:
    # 4 x 64k cells of a 7B model do not fit 8 GB beside its weights; one shared pool does.
    config = ModelConfig(context_size=65_536, kv_cache_type="q8_0")
    plan = plan_kv(config, SEVEN_B, weights=int(4.4 * GB), physical=16 * GB)
    assert plan.unified and plan.pool_tokens == pool_tokens(65_536, 4) and plan.fits
    assert "would not fit" in plan.reason


def test_a_cache_per_slot_holds_every_slots_full_context() -> None:
    assert pool_tokens(8192, 4, unified=False) == 32_768
    plan = plan_kv(ModelConfig(slots=2, context_size=4096, kv_unified=False), SEVEN_B, weights=GB)
    assert (plan.unified, plan.pool_tokens) == (False, 8192)


def test_shape_from_llama_cpp_metadata() -> None:
    shape = shape_from_metadata(
        {
            "general.architecture": "qwen2",
            "qwen2.block_count": "28",
            "qwen2.embedding_length": "3584",
            "qwen2.attention.head_count": "28",
            "qwen2.attention.head_count_kv": "4",
            "qwen2.context_length": "32768",
        }
    )
    assert shape == ModelShape(28, 4, 128, 128, 32768)


def test_metadata_without_a_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        shape_from_metadata({"general.architecture": "llama"})


def _gguf(path: Path, entries: list[tuple[str, int, bytes]]) -> Path:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for key, kind, payload in entries:
        data += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload
    path.write_bytes(data)
    return path


def test_reads_a_gguf_header(tmp_path: Path) -> None:
    arch = b"llama"
    path = _gguf(
        tmp_path / "m.gguf",
        [
            ("general.architecture", 8, struct.pack("<Q", len(arch)) + arch),
            ("llama.block_count", 4, struct.pack("<I", 2)),
            ("llama.embedding_length", 4, struct.pack("<I", 256)),
            ("llama.attention.head_count", 4, struct.pack("<I", 4)),
            ("llama.attention.head_count_kv", 9, struct.pack("<IQ", 5, 2) + b"\2\0\0\0\1\0\0\0"),
            ("llama.context_length", 10, struct.pack("<Q", 4096)),
            ("tokenizer.flag", 7, b"\1"),
        ],
    )
    assert read_gguf_metadata(path)["tokenizer.flag"] == "true"
    assert read_shape(path) == ModelShape(2, 2, 64, 64, 4096)


def test_a_truncated_or_foreign_file_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "x.gguf"
    foreign.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(foreign)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5))
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(truncated)


def test_the_bundled_models_header_matches_llama_cpp() -> None:
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    # SmolLM2-135M: 30 layers, 9 heads of 64 over 576, 3 of them for K/V, trained on 8k.
    assert read_shape(path) == ModelShape(30, 3, 64, 64, 8192)
