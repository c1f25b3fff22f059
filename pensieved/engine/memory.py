"""How much memory a model may use, what its KV cache costs, and the sizes `auto` picks.

Pure functions over numbers and a GGUF file's header: nothing here loads a model or touches
llama.cpp, so the daemon can decide sizes before it creates a context, and decide which models
fit at all before it loads one.

The KV cache is either one pool of cells shared by every slot (llama.cpp's unified cache),
where a token position that several conversations share (an agent's system prompt and tools)
is stored once, or a cache per slot. The shared pool holds one conversation at the full context
plus `POOL_EXTRA` of it for the tokens the other conversations hold on their own; when that
runs out, idle conversations' own tokens are evicted (see `kvpool.py`).

Which layout: attention runs over every used cell of the cache a sequence lives in, the other
slots' cells masked out. llama.cpp's Metal and CUDA kernels skip masked blocks, its CPU kernel
tests each cell for each head: on a CPU, a conversation decoding beside other slots' idle
caches of 9,000 cells took 1.4 x the time of one with a cache of its own. So `auto` shares the
cache on a GPU, and on a CPU only when a cache per slot would not fit the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from pensieve.config import ModelConfig
from pensieve.gguf import read_gguf_metadata

KvCacheType = Literal["f16", "q8_0", "q4_0"]

# Bytes per stored element: ggml's f16 is 2 bytes; q8_0 and q4_0 store blocks of 32 values
# as one f16 scale plus 32 bytes or 16 bytes of quants.
_BLOCK_BYTES: dict[str, tuple[int, int]] = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}

# Half of physical memory: the other half stays with the system and the user's own programs,
# and it is below the ~2/3 of memory macOS lets the GPU wire on a 16 GB Mac.
DEFAULT_BUDGET_FRACTION = 0.5
# Room beyond one full conversation for what the other slots hold on their own.
POOL_EXTRA = 0.25
AUTO_SLOTS = 4
# What Claude Code needs: its system prompt and tools alone take about 20k tokens.
AGENT_CONTEXT = 32_768
# llama.cpp pads contexts to this; a size that is a multiple of it is what it allocates.
CONTEXT_STEP = 256
MIN_AUTO_CONTEXT = 1024


class MemoryBudgetError(ValueError):
    """The budget cannot hold the weights plus a usable KV cache."""


def physical_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def budget_bytes(model: ModelConfig, physical: int | None = None) -> int:
    """The memory budget: what one model's `auto` sizes fit in, and what the loaded models'
    weights and KV caches must fit in together (`lifecycle.py`)."""
    if model.memory_budget_mb is not None:
        return model.memory_budget_mb * 1024 * 1024
    total = physical if physical is not None else physical_memory_bytes()
    return int(total * DEFAULT_BUDGET_FRACTION)


def weights_bytes(path: Path) -> int:
    """What the weights take in memory: about the GGUF file's size (they are read in whole)."""
    return path.stat().st_size


def element_bytes(kv_cache_type: str, count: int) -> int:
    """Bytes of `count` K or V values stored as `kv_cache_type` (whole blocks)."""
    size, block = _BLOCK_BYTES[kv_cache_type]
    return math.ceil(count / block) * size


def kv_bytes_per_token(
    n_layer: int,
    n_head_kv: int,
    head_dim: int,
    kv_cache_type: str = "f16",
    head_dim_v: int | None = None,
) -> int:
    """Bytes one token position takes in the KV cache: K and V of every layer."""
    k = element_bytes(kv_cache_type, n_head_kv * head_dim)
    v = element_bytes(kv_cache_type, n_head_kv * (head_dim if head_dim_v is None else head_dim_v))
    return n_layer * (k + v)


@dataclass(frozen=True)
class ModelShape:
    """What sizes a model's KV cache, from its GGUF metadata."""

    n_layer: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ctx_train: int

    def bytes_per_token(self, kv_cache_type: str = "f16") -> int:
        return kv_bytes_per_token(
            self.n_layer, self.n_head_kv, self.head_dim, kv_cache_type, self.head_dim_v
        )


def shape_from_metadata(metadata: dict[str, str]) -> ModelShape:
    """The shape from GGUF metadata as llama.cpp reports it (every value a string)."""
    arch = metadata.get("general.architecture", "")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise KeyError(f"{arch}.{key}")
            return default
        text = str(value).strip()
        if text.startswith("["):  # a per-layer array: the largest sizes the cache
            return max(int(part) for part in text.strip("[]").split(",") if part.strip())
        return int(float(text))

    try:
        heads = number("attention.head_count")
        embd = number("embedding_length")
        key_length = number("attention.key_length", embd // heads)
        return ModelShape(
            n_layer=number("block_count"),
            n_head_kv=number("attention.head_count_kv", heads),
            head_dim=key_length,
            head_dim_v=number("attention.value_length", key_length),
            n_ctx_train=number("context_length", 0),
        )
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"the model's metadata does not give its shape ({exc})") from None


def read_shape(path: Path) -> ModelShape:
    """The shape of a GGUF file, from its header (cheap: the weights are not read)."""
    return shape_from_metadata(read_gguf_metadata(path))


@dataclass(frozen=True)
class KvPlan:
    """The sizes a model runs with, and why, for the startup log, `status` and `config show`."""

    context_size: int  # one conversation's limit, prompt plus reply
    slots: int
    pool_tokens: int  # cells in the KV cache, all slots together
    bytes_per_token: int
    kv_cache_type: str
    budget_bytes: int
    weights_bytes: int
    reason: str
    unified: bool = True  # one cache shared by all slots, or one per slot

    @property
    def kv_bytes(self) -> int:
        return self.pool_tokens * self.bytes_per_token

    @property
    def total_bytes(self) -> int:
        """Weights plus the KV cache: what loading the model takes, compute buffers aside."""
        return self.weights_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def below_agent_context(self) -> bool:
        return self.context_size < AGENT_CONTEXT


def pool_tokens(context_size: int, slots: int, unified: bool = True) -> int:
    """Cells of the KV cache: shared, one full conversation plus room for the others' own;
    per slot, every slot's full context."""
    if not unified:
        return context_size * slots
    if slots <= 1:
        return context_size
    return _round_up(context_size + int(context_size * POOL_EXTRA))


def choose_layout(
    setting: bool | Literal["auto"], slots: int, per_slot_fits: bool, gpu: bool
) -> tuple[bool, str]:
    """Whether the slots share one KV cache, and why (see the module's docstring)."""
    if setting is True or setting is False:
        return setting, f"as configured (model.kv_unified {str(setting).lower()})"
    if slots <= 1:
        return False, "one slot: nothing to share (model.kv_unified auto)"
    if gpu:
        why = "attention on a GPU skips the other slots' cells"
        return True, f"shared because {why} (model.kv_unified auto)"
    if not per_slot_fits:
        return (
            True,
            "shared because caches per slot would not fit the budget (model.kv_unified auto)",
        )
    why = "on a CPU a shared cache slows every decode by the other slots' cells"
    return False, f"a cache per slot because {why}, and they fit the budget (model.kv_unified auto)"


def plan_kv(
    model: ModelConfig,
    shape: ModelShape,
    weights: int,
    physical: int | None = None,
    *,
    gpu: bool = False,
) -> KvPlan:
    """Resolve `auto` context, slots and layout against the budget; explicit values are kept.
    `gpu`: attention runs on a GPU (Metal, CUDA), not the CPU.

    Raises MemoryBudgetError when `auto` cannot fit even a small context.
    """
    budget = budget_bytes(model, physical)
    per_token = shape.bytes_per_token(model.kv_cache_type)
    slots = AUTO_SLOTS if model.slots == "auto" else model.slots
    source = (
        f"model.memory_budget_mb {model.memory_budget_mb}"
        if model.memory_budget_mb is not None
        else f"the default budget, half of physical memory ({_gb(budget)})"
    )
    if model.context_size != "auto":
        context = model.context_size
        reason = f"context {context} as configured"
    else:
        left = budget - weights
        share = 1.0 if slots <= 1 else 1.0 + POOL_EXTRA
        affordable = int(left / per_token / share) if left > 0 else 0
        affordable -= affordable % CONTEXT_STEP
        while affordable > 0 and pool_tokens(affordable, slots) * per_token > left:
            affordable -= CONTEXT_STEP  # the pool is rounded up to whole steps
        train = shape.n_ctx_train or AGENT_CONTEXT
        if affordable < MIN_AUTO_CONTEXT:
            raise MemoryBudgetError(
                f"the memory budget ({source}: {_gb(budget)}) leaves {_gb(max(left, 0))} "
                f"beside the weights ({_gb(weights)}), under {MIN_AUTO_CONTEXT} tokens of KV "
                "cache: raise model.memory_budget_mb, use a smaller model or "
                "model.kv_cache_type q8_0, or set model.context_size"
            )
        if train <= affordable:
            context = train
            reason = f"context {context}: the model's training context, which fits {source}"
        else:
            context = affordable
            reason = (
                f"context {context}: the model's training context {train} is capped by "
                f"{source}, {_gb(left)} of it left beside the weights"
            )
    slots_reason = f"{slots} slots" + (" (auto)" if model.slots == "auto" else "")
    per_slot_fits = weights + pool_tokens(context, slots, unified=False) * per_token <= budget
    unified, why = choose_layout(model.kv_unified, slots, per_slot_fits, gpu)
    pool = pool_tokens(context, slots, unified)
    held = "share a KV cache" if unified else "each have a KV cache, together"
    return KvPlan(
        context_size=context,
        slots=slots,
        pool_tokens=pool,
        bytes_per_token=per_token,
        kv_cache_type=model.kv_cache_type,
        budget_bytes=budget,
        weights_bytes=weights,
        reason=f"{reason}; {slots_reason} {held} of {pool} tokens "
        f"({_gb(pool * per_token)} at {model.kv_cache_type}), {why}",
        unified=unified,
    )


def plan_for_file(
    model: ModelConfig, path: Path, physical: int | None = None, *, gpu: bool = False
) -> KvPlan:
    """`plan_kv` for a GGUF file, read from its header: what loading it would take."""
    return plan_kv(model, read_shape(path), weights_bytes(path), physical, gpu=gpu)


def _round_up(tokens: int) -> int:
    return -(-tokens // CONTEXT_STEP) * CONTEXT_STEP


def _gb(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GB"
    return f"{n / 1024**2:.0f} MB"
