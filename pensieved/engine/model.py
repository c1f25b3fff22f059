"""Loading a GGUF model with llama-cpp-python, and what we need to know about it.

A `LoadedModel` owns the weights and one llama.cpp context with a KV sequence per slot, so
several conversations stay warm and are decoded together. The native calls are in llama.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from pensieve.config import ModelConfig
from pensieve.hfref import missing_message
from pensieve.wire import KvSlotStatus, KvStatus
from pensieved.engine import selftest
from pensieved.engine.grammar_cache import GrammarCache, ParsedGrammar
from pensieved.engine.kvpool import CellPool
from pensieved.engine.llama import (
    Context,
    ContextParams,
    FlashAttention,
    Model,
    Vocab,
    attention_on_gpu,
    init_backend,
)
from pensieved.engine.memory import (
    AGENT_CONTEXT,
    KvCacheType,
    KvPlan,
    plan_kv,
    pool_tokens,
    shape_from_metadata,
)
from pensieved.engine.speculation import SpeculationMode
from pensieved.errors import GrammarError, LoadCancelledError, ModelLoadError

log = logging.getLogger("pensieved.engine")


@dataclass(frozen=True)
class ModelSettings:
    """Everything that requires reloading the model when it changes."""

    path: Path
    context_size: int | Literal["auto"]
    gpu_layers: int
    threads: int | None
    batch_size: int
    slots: int | Literal["auto"]
    mmap: bool = False
    flash_attention: FlashAttention = "auto"
    kv_cache_type: KvCacheType = "f16"
    memory_budget_mb: int | None = None
    kv_unified: bool | Literal["auto"] = "auto"
    speculative: SpeculationMode = "auto"

    def sizing(self) -> ModelConfig:
        """The config keys `memory.plan_kv` resolves `auto` from."""
        return ModelConfig(
            context_size=self.context_size,
            slots=self.slots,
            kv_cache_type=self.kv_cache_type,
            memory_budget_mb=self.memory_budget_mb,
            kv_unified=self.kv_unified,
        )

    @property
    def effective_threads(self) -> int:
        if self.threads:
            return self.threads
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def flash_attention_for(settings: ModelSettings) -> FlashAttention:
    """`on`, `off` or `auto`: a quantized V cache needs flash attention, so `auto` turns it
    on (the config refuses `off` with a quantized cache)."""
    if settings.kv_cache_type != "f16" and settings.flash_attention == "auto":
        return "on"
    return settings.flash_attention


class LoadedModel:
    """One llama_model and one llama.cpp context holding a KV sequence per slot.

    A single context decodes every slot's next token in one batch (llama-server's continuous
    batching), and its scratch buffers are allocated once, not once per slot. The KV cache is
    unified: one pool of cells for every slot, where a prefix several slots share is stored
    once (`share_prefix`); `cells` keeps the books of who holds what.
    """

    def __init__(
        self, settings: ModelSettings, keep_loading: Callable[[float], bool] | None = None
    ) -> None:
        """Load the model; `keep_loading(fraction)` is called as the weights are read, and
        returning False abandons the load (LoadCancelledError)."""
        # A build that dies on this CPU is found in a child first: a load error, not a
        # daemon killed by SIGILL on its first request.
        selftest.ensure_runnable()
        init_backend()
        self.settings = settings
        path = settings.path
        if not path.is_file():
            not_found = f"model file not found: {path}; set model.model_path to a GGUF file"
            raise ModelLoadError(missing_message(path) or not_found)
        stat = path.stat()
        self.size_bytes = stat.st_size
        # What the weights were read from: saved KV caches are filed under this, not under
        # whatever the path holds when they are saved (the file may be replaced meanwhile).
        self.file_identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        self._load_cancelled = False
        self._grammars: GrammarCache | None = None
        weights: Model | None = None
        try:
            # Read in, not mapped, unless asked: a mapped file that is replaced in place under
            # a running daemon takes the process down with SIGBUS.
            weights = Model(
                path,
                gpu_layers=settings.gpu_layers,
                mmap=settings.mmap,
                progress=None if keep_loading is None else self._progress(keep_loading),
            )
            self.metadata: dict[str, str] = weights.metadata()
            self.plan: KvPlan = self._plan(settings)
            self.flash_attention = flash_attention_for(settings)
            context = Context(weights, self._context_params(settings))
        except (ValueError, RuntimeError, OSError) as exc:
            if weights is not None:
                weights.close()
            if self._load_cancelled:
                raise LoadCancelledError(f"loading model {path} was abandoned") from None
            raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
        self.weights = weights
        self.context = context
        self.vocab: Vocab = weights.vocab
        self.n_vocab: int = weights.n_vocab()
        self._grammars = GrammarCache(self.vocab)
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")
        self.slots: int = self.plan.slots
        self.unified: bool = self.plan.unified
        # Shared cache only: the sequence persistence stages a slot's own tail in.
        self.scratch_seq = self.slots
        # Per slot: what one conversation may hold, prompt and reply together. A shared pool
        # is larger; a slot's limit in it is ours to keep (prompts are fitted to it).
        self.pool_tokens: int = context.n_ctx()
        per_slot = self.pool_tokens if self.unified else context.n_ctx_seq()
        self.n_ctx: int = min(self.plan.context_size, per_slot)
        self.cells = CellPool(self.pool_tokens, self.slots + 1, copies=not self.unified)
        self.n_batch: int = settings.batch_size
        self.n_ctx_train: int = weights.n_ctx_train()
        # Sliding-window attention: a sequence's saved state keeps only the window.
        self.sliding_window: int = weights.n_swa()
        # Why speculative drafts cannot run on this model (None: they can).
        self.cut_problem = weights.memory_cut_problem()
        self.bos_id: int = weights.token_bos()
        self.eos_id: int = weights.token_eos()
        self.add_bos: bool = weights.add_bos()
        self.bos_text = self._piece(self.bos_id)
        self.eos_text = self._piece(self.eos_id)
        self.name = path.stem
        self._pieces: dict[int, bytes] = {}
        if self.n_ctx > self.n_ctx_train:
            log.warning(
                "context_size %d exceeds %s's training context %d: quality may degrade",
                self.n_ctx,
                path.name,
                self.n_ctx_train,
            )

    def _plan(self, settings: ModelSettings) -> KvPlan:
        """Context and slots, `auto` resolved against the memory budget (see memory.py)."""
        try:
            shape = shape_from_metadata(self.metadata)
        except ValueError:
            if settings.context_size == "auto":
                raise
            # An unusual architecture: explicit sizes still load, only the estimates are off.
            slots = 4 if settings.slots == "auto" else settings.slots
            unified = settings.kv_unified is True  # no estimate to weigh `auto` by
            return KvPlan(
                context_size=settings.context_size,
                slots=slots,
                pool_tokens=pool_tokens(settings.context_size, slots, unified),
                bytes_per_token=0,
                kv_cache_type=settings.kv_cache_type,
                budget_bytes=0,
                weights_bytes=self.size_bytes,
                reason=f"context {settings.context_size} as configured, "
                + ("one shared KV cache" if unified else "a KV cache per slot"),
                unified=unified,
            )
        gpu = attention_on_gpu(settings.gpu_layers)
        plan = plan_kv(settings.sizing(), shape, self.size_bytes, gpu=gpu)
        log.info("%s: %s", settings.path.name, plan.reason)
        if not plan.fits:
            log.warning(
                "%s needs %.1f GB (weights and KV cache), over its memory budget of %.1f GB",
                settings.path.name,
                plan.total_bytes / 1024**3,
                plan.budget_bytes / 1024**3,
            )
        return plan

    def _context_params(self, settings: ModelSettings) -> ContextParams:
        plan = self.plan
        # Shared: one pool of cells for every slot (see kvpool.py), and one more sequence
        # than slots, the scratch sequence persistence stages a slot's own tail in. Per slot:
        # llama.cpp gives each sequence an equal part of n_ctx.
        return ContextParams(
            n_ctx=plan.pool_tokens,
            n_batch=settings.batch_size,
            n_threads=settings.effective_threads,
            n_seq_max=plan.slots + 1 if plan.unified else plan.slots,
            kv_unified=plan.unified,
            cache_type=settings.kv_cache_type,
            flash_attention=self.flash_attention,
            no_perf=True,
        )

    def _progress(self, keep_loading: Callable[[float], bool]) -> Callable[[float], bool]:
        def progress(fraction: float) -> bool:
            try:
                go = bool(keep_loading(fraction))
            except Exception:  # an exception cannot cross into C; ctypes would return False
                log.exception("model load progress callback failed")
                go = True
            if not go:
                self._load_cancelled = True
            return go

        return progress

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.weights.token_to_piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        if not text and not add_bos:
            return []
        return self.weights.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The text bytes of a generated token (control tokens render as nothing)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self.weights.token_to_piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def token_text(self, tokens: Sequence[int]) -> str:
        """Tokens as text for people to read, control tokens included (`<|im_start|>`)."""
        return b"".join(self.weights.token_to_piece(t, special=True) for t in tokens).decode(
            "utf-8", "replace"
        )

    def is_end_of_generation(self, token: int) -> bool:
        return self.weights.is_end_of_generation(token)

    def parsed_grammar(self, grammar: str, *, lazy: bool) -> ParsedGrammar | None:
        """`grammar` parsed for this model's vocabulary (once; see grammar_cache.py), or None
        if llama.cpp refuses it. Call it off the event loop: a first parse takes a while."""
        if self._grammars is None:
            raise GrammarError("the model was unloaded while preparing this request")
        return self._grammars.get(grammar, lazy=lazy)

    @property
    def training_context_exceeded(self) -> bool:
        return self.n_ctx > self.n_ctx_train

    def kv_bytes_per_slot(self) -> int:
        """What one slot at the full context would take on its own (its tokens unshared)."""
        return self.n_ctx * self.plan.bytes_per_token

    def forget(self, seq: int, keep: int) -> int:
        """Drop sequence `seq`'s KV cells from position `keep` on; the positions kept.

        Recurrent and hybrid models cannot cut a sequence in the middle: theirs is cleared.
        """
        if keep > 0 and self.context.seq_rm(seq, keep, -1):
            self.cells.trim(seq, keep)
            return keep
        self.context.seq_rm(seq, -1, -1)
        self.cells.trim(seq, 0)
        return 0

    def share_prefix(self, source: int, target: int, count: int) -> None:
        """Make sequence `target` hold `source`'s first `count` positions. In the shared cache
        these are the same cells (`llama_memory_seq_cp` only marks them); with a cache per
        slot, llama.cpp copies `source`'s whole cache at the start of the next decode."""
        context = self.context
        context.seq_rm(target, -1, -1)
        if self.unified:
            context.seq_cp(source, target, 0, count)
        else:
            context.seq_cp(source, target, -1, -1)
            context.seq_rm(target, count, -1)
        self.cells.share(source, target, count)

    def kv_status(self) -> KvStatus:
        """The shared KV cache for `status`: sizes and why, use, sharing, each slot's cost."""
        used, shared, parts = self.cells.snapshot()
        per_token = self.plan.bytes_per_token
        flash: str = self.flash_attention
        if flash != self.settings.flash_attention:
            flash += f" (a {self.settings.kv_cache_type} V cache needs flash attention)"
        elif flash == "auto":
            flash += " (llama.cpp uses it where the backend supports it)"
        warning = None
        if self.n_ctx < AGENT_CONTEXT:
            remedies = "model.memory_budget_mb or model.context_size"
            if self.settings.kv_cache_type == "f16":
                remedies += ", or use model.kv_cache_type q8_0"  # half the bytes per token
            warning = (
                f"context {self.n_ctx} is below the {AGENT_CONTEXT} tokens Claude Code needs "
                f"(its system prompt and tools alone take about 20k): raise {remedies}"
            )
        return KvStatus(
            cache_type=self.settings.kv_cache_type,
            unified=self.unified,
            flash_attention=flash,
            pool_cells=self.pool_tokens,
            cells_used=used,
            cells_shared=shared,
            bytes_per_token=per_token,
            allocated_bytes=self.kv_bytes(),
            budget_bytes=self.plan.budget_bytes,
            sizing=self.plan.reason,
            warning=warning,
            slots=[
                KvSlotStatus(
                    slot=part.index,
                    tokens=part.tokens,
                    own_cells=part.own,
                    cost_bytes=round(part.cost * per_token),
                )
                for part in parts[: self.slots]
            ],
        )

    def kv_bytes(self) -> int:
        """The KV cache allocated: every cell of the pool, used or not."""
        return self.pool_tokens * self.plan.bytes_per_token

    def close(self) -> None:
        # Parsed grammars point at the model's vocabulary; the context goes before the model.
        if self._grammars is not None:
            self._grammars.close()
        self.context.close()
        self.weights.close()
