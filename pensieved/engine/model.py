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
from pensieved.engine import llama, selftest
from pensieved.engine.caching import CacheStrategy, architecture, choose
from pensieved.engine.checkpoints import Checkpoint, Checkpoints
from pensieved.engine.dialects import is_markup
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
from pensieved.engine.markers import TOOL_CALL_OPEN
from pensieved.engine.memory import (
    AGENT_CONTEXT,
    KvCacheType,
    KvPlan,
    plan_kv,
    pool_tokens,
    shape_from_metadata,
)
from pensieved.engine.speculation import DraftModel, SpeculationMode
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
    swa_full: bool | Literal["auto"] = "auto"
    speculative: SpeculationMode = "auto"
    draft_path: Path | None = None  # model.draft_model_path, resolved

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
            self.strategy: CacheStrategy = self._strategy(settings, weights)
            with llama.memory_buffers() as buffers:
                context = Context(weights, self._context_params(settings))
            # Window layers and recurrent states are not the plan's every-layer-every-cell
            # estimate: what llama.cpp logged it allocated (in MiB to two decimals) stands.
            estimated = self.strategy.architecture.kind == "full" or not buffers
            self.allocated_bytes: int = self.plan.kv_bytes if estimated else sum(buffers)
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
        # What the budget leaves beside the weights and the KV cache (unknown sizes: no cap).
        spare = self.plan.budget_bytes - self.plan.total_bytes if self.plan.budget_bytes else None
        self.checkpoints = Checkpoints(
            self.slots + 1, max_bytes=None if spare is None else max(spare, 0)
        )
        self.n_batch: int = settings.batch_size
        self.n_ctx_train: int = weights.n_ctx_train()
        # Sliding-window attention: a sequence's saved state keeps only the window.
        self.sliding_window: int = weights.n_swa()
        # Why speculative drafts cannot run on this model (None: they can).
        self.cut_problem = weights.memory_cut_problem(swa_full=self.strategy.swa_full)
        self.draft_model: DraftModel | None = None
        self.draft_model = self._draft_model(settings)
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

    def _draft_model(self, settings: ModelSettings) -> DraftModel | None:
        """The draft model `settings` ask for, where drafts can run (ModelLoadError if it
        cannot draft for this model)."""
        if settings.draft_path is None or settings.speculative not in ("auto", "draft"):
            return None
        if self.cut_problem is not None:
            log.warning(
                "%s: draft model %s not loaded: %s",
                settings.path.name,
                settings.draft_path.name,
                self.cut_problem,
            )
            return None
        try:
            draft = DraftModel(
                settings.draft_path,
                self.weights,
                slots=self.slots,
                n_ctx=self.pool_tokens,
                n_batch=settings.batch_size,
                threads=settings.effective_threads,
                gpu_layers=settings.gpu_layers,
                cache_type=settings.kv_cache_type,
                flash_attention=self.flash_attention,
            )
        except ModelLoadError:
            self.close()
            raise
        log.info("%s: drafts from %s", settings.path.name, settings.draft_path.name)
        return draft

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

    def _strategy(self, settings: ModelSettings, weights: Model) -> CacheStrategy:
        """How this architecture keeps a slot's prefix reusable (caching/), and why."""
        arch = architecture(
            recurrent=weights.is_recurrent(),
            hybrid=weights.is_hybrid(),
            window=weights.n_swa(),
        )
        strategy, why = choose(
            arch,
            settings.swa_full,
            pool_tokens=self.plan.pool_tokens,
            slots=self.plan.slots,
            batch=settings.batch_size,
        )
        self.strategy_reason = f"{strategy.describe()}: {why}"
        log.info(
            "%s: %s; cache strategy %s, %s",
            settings.path.name,
            arch.describe(),
            strategy.name,
            self.strategy_reason,
        )
        return strategy

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
            swa_full=self.strategy.swa_full,
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
        """The text bytes of a generated token. Control tokens render as nothing, except
        those a tool dialect writes its calls and reasoning with (`<|channel|>`,
        `[TOOL_CALLS]`, …), which its parser must see."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self.weights.token_to_piece(token, special=False)
            if not piece:
                special = self.weights.token_to_piece(token, special=True)
                if is_markup(special.decode("utf-8", errors="replace")):
                    piece = special
            self._pieces[token] = piece
        return piece

    def token_text(self, tokens: Sequence[int]) -> str:
        """Tokens as text for people to read, control tokens included (`<|im_start|>`)."""
        return b"".join(self.weights.token_to_piece(t, special=True) for t in tokens).decode(
            "utf-8", "replace"
        )

    def is_end_of_generation(self, token: int) -> bool:
        return self.weights.is_end_of_generation(token)

    def parsed_grammar(
        self, grammar: str, *, lazy: bool, trigger: str = TOOL_CALL_OPEN
    ) -> ParsedGrammar | None:
        """`grammar` parsed for this model's vocabulary (once; see grammar_cache.py), or None
        if llama.cpp refuses it; `lazy`: it applies from `trigger` on. Call it off the event
        loop: a first parse takes a while."""
        if self._grammars is None:
            raise GrammarError("the model was unloaded while preparing this request")
        return self._grammars.get(grammar, lazy=lazy, trigger=trigger)

    def kv_bytes_per_slot(self) -> int:
        """What one slot at the full context would take on its own (its tokens unshared)."""
        return self.n_ctx * self.plan.bytes_per_token

    def forget(self, seq: int, keep: int) -> int:
        """Drop sequence `seq`'s KV cells from position `keep` on; the positions kept.

        Where the memory cannot be cut there (a recurrent state, a sliding window that moved
        on), the newest checkpoint at or before `keep` is restored, and the positions kept are
        its; without one the sequence is cleared.
        """
        length = self.cells.length(seq)
        cuttable = keep >= length or self.strategy.can_cut(self._pos_min, seq, length, keep)
        if keep > 0 and cuttable and self.context.seq_rm(seq, keep, -1):
            self._trimmed(seq, keep)
            return keep
        if keep > 0 and self.strategy.checkpoints:
            checkpoint = self.checkpoints.newest_at_or_before(seq, keep)
            if checkpoint is not None and self._restore(seq, checkpoint):
                return checkpoint.position
        self.context.seq_rm(seq, -1, -1)
        self._trimmed(seq, 0)
        return 0

    def _pos_min(self, seq: int) -> int:
        return self.context.seq_pos_min(seq)

    def _trimmed(self, seq: int, keep: int) -> None:
        self.cells.trim(seq, keep)
        self.checkpoints.trim(seq, keep)

    def _restore(self, seq: int, checkpoint: Checkpoint) -> bool:
        """Put `checkpoint`'s partial state into `seq` (which holds at least its positions in
        the attention cells) and cut the rest; False (and `seq` cleared) if refused."""
        position = checkpoint.position
        if (
            self.context.load_seq_state(seq, checkpoint.state, partial=True)
            and self.context.seq_rm(seq, position, -1)
            and self.context.seq_pos_max(seq) == position - 1
        ):
            self._trimmed(seq, position)
            return True
        log.warning("slot %d: llama.cpp refused a checkpoint at %d; clearing it", seq, position)
        self.context.seq_rm(seq, -1, -1)
        self._trimmed(seq, 0)
        return False

    def checkpoint(self, seq: int) -> None:
        """Keep sequence `seq`'s partial state at its current end (see checkpoints.py)."""
        position = self.cells.length(seq)
        state = self.context.seq_state(seq, partial=True)
        if position > 0 and state is not None:
            self.checkpoints.add(seq, Checkpoint(position, bytes(state)))

    def share_prefix(self, source: int, target: int, count: int, minimum: int = 0) -> int:
        """Make sequence `target` hold `source`'s first `count` positions, or fewer (a
        checkpoint's) where `source`'s memory cannot be cut at `count`; the positions shared,
        0 (and `target` untouched) when that would not be more than `minimum`.

        In the shared cache the attention cells are the same cells (`llama_memory_seq_cp`
        only marks them); with a cache per slot, llama.cpp copies `source`'s whole cache at
        the start of the next decode. A checkpoint is restored into `target` over that."""
        length = self.cells.length(source)
        checkpoint = None
        if (
            self.strategy.checkpoints
            and count < length
            and not self.strategy.can_cut(self._pos_min, source, length, count)
        ):
            checkpoint = self.checkpoints.newest_at_or_before(source, count)
            if checkpoint is None:
                return 0
            count = checkpoint.position
        if count <= minimum:
            return 0
        self.context.seq_rm(target, -1, -1)
        copied = count  # positions `target` holds once the copy is done
        if self.unified:
            self.context.seq_cp(source, target, 0, count)
        elif checkpoint is None:
            self.context.seq_cp(source, target, -1, -1)
            self.context.seq_rm(target, count, -1)
        else:
            # A copy between per-slot caches happens at the next decode, and would overwrite
            # the checkpoint's window cells: the source's state is copied now instead.
            state = self.context.seq_state(source)
            if state is None or not self.context.load_seq_state(target, bytearray(state)):
                self.context.seq_rm(target, -1, -1)
                self._trimmed(target, 0)
                return 0
            copied = length
        self.cells.share(source, target, copied)
        self.checkpoints.share(source, target, count)
        if checkpoint is None:
            return count
        return count if self._restore(target, checkpoint) else 0

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
            allocated_bytes=self.allocated_bytes,
            budget_bytes=self.plan.budget_bytes,
            sizing=self.plan.reason,
            warning=warning,
            slots=[
                KvSlotStatus(
                    slot=part.index,
                    tokens=part.tokens,
                    own_cells=part.own,
                    cost_bytes=round(part.cost * per_token),
                    checkpoints=self.checkpoints.status(part.index),
                )
                for part in parts[: self.slots]
            ],
            architecture=self.strategy.architecture.describe(),
            cache_strategy=self.strategy.name,
            cache_strategy_reason=self.strategy_reason,
            checkpoint_bytes=self.checkpoints.total_bytes(),
        )

    def kv_bytes(self) -> int:
        """The KV cache allocated (every cell of the pool, used or not, and recurrent states),
        and the checkpoints kept."""
        return self.allocated_bytes + self.checkpoints.total_bytes()

    def close(self) -> None:
        # Parsed grammars point at the model's vocabulary; the context goes before the model.
        if self._grammars is not None:
            self._grammars.close()
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        self.context.close()
        self.weights.close()
