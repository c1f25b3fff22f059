"""Loading a GGUF model with llama-cpp-python, and what we need to know about it.

A `LoadedModel` owns one llama.cpp context per KV slot. Weights are memory-mapped, so the
contexts share them; each context has its own KV cache, so several conversations stay warm.
Nothing outside `pensieved.engine` touches llama_cpp.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pensieved.errors import ModelLoadError

log = logging.getLogger("pensieved.engine")


@dataclass(frozen=True)
class ModelSettings:
    """Everything that requires reloading the model when it changes."""

    path: Path
    context_size: int
    gpu_layers: int
    threads: int | None
    batch_size: int
    slots: int
    mmap: bool = False

    @property
    def effective_threads(self) -> int:
        if self.threads:
            return self.threads
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LoadedModel:
    def __init__(self, settings: ModelSettings) -> None:
        import llama_cpp  # deferred: importing it loads the native library

        self.settings = settings
        path = settings.path
        if not path.is_file():
            raise ModelLoadError(
                f"model file not found: {path}; set model.model_path in the config to a GGUF file"
            )
        self.size_bytes = path.stat().st_size
        self.contexts: list[Any] = []
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": settings.context_size,
            "n_batch": settings.batch_size,
            "n_ubatch": settings.batch_size,
            "n_gpu_layers": settings.gpu_layers,
            "n_threads": settings.effective_threads,
            "n_threads_batch": settings.effective_threads,
            "use_mmap": settings.mmap,
            "verbose": False,
        }
        try:
            first = llama_cpp.Llama(**kwargs)
            self.contexts.append(first)
            for _ in range(settings.slots - 1):
                self.contexts.append(_context_on(first._model, kwargs))
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
        first = self.contexts[0]
        self.metadata: dict[str, str] = dict(first.metadata)
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")
        self.n_ctx: int = first.n_ctx()
        self.n_ctx_train: int = first._model.n_ctx_train()
        self.bos_id: int = first.token_bos()
        self.eos_id: int = first.token_eos()
        self.add_bos: bool = bool(first._model.add_bos_token())
        self.bos_text = self._piece(self.bos_id)
        self.eos_text = self._piece(self.eos_id)
        self.name = path.stem
        # One decode at a time across this model's contexts: on a CPU, two concurrent decodes
        # only fight for the same cores; interleaving per step keeps every stream moving.
        self.compute_lock = threading.Lock()
        self._pieces: dict[int, bytes] = {}
        if self.n_ctx > self.n_ctx_train:
            log.warning(
                "context_size %d exceeds %s's training context %d: quality may degrade",
                self.n_ctx,
                path.name,
                self.n_ctx_train,
            )

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        import llama_cpp

        vocab = self.contexts[0]._model.vocab
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        if n < 0:  # the piece is longer than the buffer: -n is the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        if not text and not add_bos:
            return []
        return list(
            self.contexts[0].tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        )

    def token_bytes(self, token: int) -> bytes:
        """The text bytes of a generated token (control tokens render as nothing)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._to_piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.contexts[0]._model.vocab, token))

    @property
    def training_context_exceeded(self) -> bool:
        return self.n_ctx > self.n_ctx_train

    def kv_bytes_per_slot(self) -> int:
        """Size of one slot's KV cache (f16 K and V), from the model's shape metadata."""
        arch = self.metadata.get("general.architecture", "")
        try:
            layers = int(self.metadata[f"{arch}.block_count"])
            embd = int(self.metadata[f"{arch}.embedding_length"])
            heads = int(self.metadata[f"{arch}.attention.head_count"])
            kv_heads = int(self.metadata.get(f"{arch}.attention.head_count_kv", heads))
        except (KeyError, ValueError):
            return 0
        return self.n_ctx * layers * 2 * kv_heads * (embd // heads) * 2

    def close(self) -> None:
        # Borrowers first: the first context owns the llama_model the others run on.
        for ctx in reversed(self.contexts):
            ctx.close()
        self.contexts.clear()


class _LentModel:
    """A llama_model lent to a further context: everything delegates, closing does nothing."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        pass


_lend_lock = threading.Lock()


def _context_on(model: Any, kwargs: dict[str, Any]) -> Any:
    """A further `Llama` (own context, KV cache and batch) on an already loaded llama_model.

    `Llama` always loads its own model, and each load keeps its own copy of the weights that
    llama.cpp repacks for the CPU kernels (and its own GPU copy), about the model's size per
    slot. llama.cpp supports many contexts on one model, so the load step is swapped for the
    loaded model while this one `Llama` is built.
    """
    import llama_cpp
    from llama_cpp import _internals

    with _lend_lock:
        original = _internals.LlamaModel
        _internals.LlamaModel = lambda **_: _LentModel(model)  # type: ignore[assignment,misc]
        try:
            return llama_cpp.Llama(**kwargs)
        finally:
            _internals.LlamaModel = original  # type: ignore[misc]
