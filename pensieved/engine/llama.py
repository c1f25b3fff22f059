"""The one module that touches llama-cpp-python: an upgrade of it is checked here.

Pensieve drives llama.cpp through the raw ctypes layer (`llama_cpp.llama_cpp`: models,
contexts, batches, memory sequences, samplers, grammars, state save/load, callbacks) and the
JSON-schema converter's private rule table. Neither is a stable API, which is why the version
is pinned exactly. Every native call the engine makes is a typed function or method here;
things with a native lifetime are small owners (`Model`, `Context`, `Batch`, `SamplerChain`,
`Grammar`, `Candidates`), freed by `close()` (or when collected). Only raw handles that live
as long as their owner leave this module, as the opaque ints `Vocab` and `ContextHandle`.
`tests/engine/test_boundary.py` fails when another module reaches llama.cpp on its own, and
new native calls (checkpoints, speculation) belong here too.

The import is lazy, and this module imports only the standard library at load time: loading
the shared library takes a while, importing the engine should not cost that, and the build
check (`selftest.py`, run before pensieve's dependencies are installed) uses the model,
context and batch owners against a stand-in package that has only the calls they make there.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NewType

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# A model's vocabulary: valid while its `Model` is open.
Vocab = NewType("Vocab", int)
# A `Context`'s llama_context, for the per-token calls (sampling) that take it.
ContextHandle = NewType("ContextHandle", int)

CacheType = Literal["f16", "q8_0", "q4_0"]
FlashAttention = Literal["on", "off", "auto"]


class LlamaError(RuntimeError):
    """llama.cpp refused to create something (a model, a context)."""


@cache
def lib() -> Any:
    """llama.cpp's C API as ctypes functions (llama-cpp-python's annotations are partial).
    For this module only: everything else calls the typed functions below.

    The package re-exports `llama_cpp.llama_cpp` whole; the install check's stand-in wheel
    provides only the package.
    """
    return importlib.import_module("llama_cpp")


def package_dir() -> Path | None:
    """Where llama-cpp-python is installed, found without loading it."""
    importlib.invalidate_caches()  # the installer looks again after each pip install
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


# ---- process-wide setup and callbacks -------------------------------------------------------

_backend_lock = threading.Lock()
_backend_ready = False
_llama_log = logging.getLogger("pensieved.llama")
# ggml's log levels: 3 warning, 4 error, 5 continues the previous line; the rest (info,
# debug: hundreds of lines per context) stays out of our log.
_FORWARDED = {3: logging.WARNING, 4: logging.ERROR}
_log_callback: Any = None
_last_level = 0


# The memory buffers a context allocates, as llama.cpp reports them (at info level): KV cells,
# and the recurrent states (RS). Read while `memory_buffers` is open on the creating thread.
_BUFFER_SIZE = re.compile(r"(?:KV|RS) buffer size\s*=\s*([\d.]+) MiB")
_buffers: dict[int, list[int]] = {}


def _forward_llama_log(level: int, text: bytes, _user_data: Any) -> None:
    global _last_level
    if level != 5:
        _last_level = level
    forwarded = _FORWARDED.get(_last_level)
    message = text.decode("utf-8", errors="replace").strip()
    sizes = _buffers.get(threading.get_ident())
    if sizes is not None and (found := _BUFFER_SIZE.search(message)):
        sizes.append(round(float(found.group(1)) * 1024 * 1024))
    if forwarded is not None and message:
        _llama_log.log(forwarded, "%s", message)


def _drop_llama_log(_level: int, _text: bytes, _user_data: Any) -> None:
    pass


def init_backend(*, forward_log: bool = True) -> None:
    """llama.cpp's process-wide setup, once (what `Llama` does on first use), and its log
    routed into ours (llama-cpp-python's own handler prints everything to stderr), or dropped
    where nobody reads it (the build check's child)."""
    global _backend_ready, _log_callback
    c = lib()
    with _backend_lock:
        if not _backend_ready:
            handler = _forward_llama_log if forward_log else _drop_llama_log
            _log_callback = c.llama_log_callback(handler)
            c.llama_log_set(_log_callback, ctypes.c_void_p(0))
            c.llama_backend_init()
            _backend_ready = True


@contextlib.contextmanager
def memory_buffers() -> Iterator[list[int]]:
    """Collects the sizes of the KV and recurrent-state buffers of a context created inside
    (on this thread): what the cache really takes, sliding windows and states included."""
    sizes: list[int] = []
    _buffers[threading.get_ident()] = sizes
    try:
        yield sizes
    finally:
        _buffers.pop(threading.get_ident(), None)


def attention_on_gpu(gpu_layers: int) -> bool:
    """Whether a model loaded with `gpu_layers` runs its attention on a GPU (Metal, CUDA):
    layers are offloaded and this llama.cpp build can offload at all."""
    return gpu_layers != 0 and bool(lib().llama_supports_gpu_offload())


# ---- models and contexts --------------------------------------------------------------------


class Model:
    """A llama_model: the weights and vocabulary of one GGUF file."""

    def __init__(
        self,
        path: Path,
        *,
        gpu_layers: int,
        mmap: bool | None = None,
        progress: Callable[[float], bool] | None = None,
    ) -> None:
        """Load `path` (`mmap` None: llama.cpp's default). `progress(fraction)` is called as
        the weights are read; returning False abandons the load (LlamaError). It must not
        raise: an exception cannot cross into C."""
        self._pointer: int | None = None
        self._contexts: weakref.WeakSet[Context] = weakref.WeakSet()
        c = lib()
        if not os.path.exists(path):
            raise LlamaError(f"Model path does not exist: {path}")
        params = c.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        if mmap is not None:
            params.load_mode = c.LLAMA_LOAD_MODE_MMAP if mmap else c.LLAMA_LOAD_MODE_NONE
        self._progress: Any = None
        if progress is not None:
            # Kept on the instance: llama.cpp calls it for as long as the load runs.
            self._progress = c.llama_progress_callback(lambda fraction, _data: progress(fraction))
            params.progress_callback = self._progress
        pointer = c.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not pointer:
            raise LlamaError(f"Failed to load model from file: {path}")
        self._pointer = pointer
        self._vocab: Vocab | None = None

    def _open(self) -> int:
        if self._pointer is None:
            raise LlamaError("the model was unloaded")
        return self._pointer

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = Vocab(lib().llama_model_get_vocab(self._open()))
        return self._vocab

    def metadata(self) -> dict[str, str]:
        """The GGUF file's key-value metadata, every value as a string."""
        c = lib()
        pointer = self._open()
        size = 1024
        buffer = ctypes.create_string_buffer(size)
        found: dict[str, str] = {}

        def read(getter: Any, i: int) -> str:
            nonlocal size, buffer
            n = getter(pointer, i, buffer, size)
            if n > size:  # truncated: n is the length it needs
                size = n + 1
                buffer = ctypes.create_string_buffer(size)
                getter(pointer, i, buffer, size)
            return buffer.value.decode("utf-8")

        for i in range(c.llama_model_meta_count(pointer)):
            key = read(c.llama_model_meta_key_by_index, i)
            found[key] = read(c.llama_model_meta_val_str_by_index, i)
        return found

    def n_ctx_train(self) -> int:
        return int(lib().llama_model_n_ctx_train(self._open()))

    def n_swa(self) -> int:
        """The sliding attention window (0: none)."""
        return int(lib().llama_model_n_swa(self._open()))

    def is_recurrent(self) -> bool:
        """Every layer keeps a recurrent state (Mamba, RWKV): no per-position cache at all."""
        return bool(lib().llama_model_is_recurrent(self._open()))

    def is_hybrid(self) -> bool:
        """Some layers keep a recurrent state, the others attention (Qwen3.5, LFM2)."""
        return bool(lib().llama_model_is_hybrid(self._open()))

    def n_vocab(self) -> int:
        return int(lib().llama_vocab_n_tokens(self.vocab))

    def memory_cut_problem(self, *, swa_full: bool | None = None) -> str | None:
        """Why a sequence's last positions cannot be removed from this model's memory
        (speculative drafts need it), or None when they can. A recurrent state has no
        positions to remove; a sliding-window cache not kept whole (`swa_full`, None:
        llama.cpp's default) may already have dropped what a cut back needs."""
        c = lib()
        pointer = self._open()
        if c.llama_model_is_recurrent(pointer) or c.llama_model_is_hybrid(pointer):
            return "the model's recurrent memory cannot drop rejected draft tokens"
        if swa_full is None:
            swa_full = bool(c.llama_context_default_params().swa_full)
        if self.n_swa() > 0 and not swa_full:
            return "its sliding-window KV cache may not hold what dropping draft tokens needs"
        return None

    def token_bos(self) -> int:
        return int(lib().llama_vocab_bos(self.vocab))

    def token_eos(self) -> int:
        return int(lib().llama_vocab_eos(self.vocab))

    def add_bos(self) -> bool:
        """Whether the vocabulary wants a BOS token before a prompt."""
        return bool(lib().llama_vocab_get_add_bos(self.vocab))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lib().llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        c = lib()
        vocab = self.vocab
        room = self.n_ctx_train()
        tokens = (c.llama_token * room)()
        n = c.llama_tokenize(vocab, text, len(text), tokens, room, add_bos, special)
        if n < 0:  # more tokens than room: -n is how many
            room = -n
            tokens = (c.llama_token * room)()
            n = c.llama_tokenize(vocab, text, len(text), tokens, room, add_bos, special)
            if n < 0:
                raise LlamaError(f"cannot tokenize {text[:80]!r}: llama_tokenize returned {n}")
        return list(tokens[:n])

    def token_to_piece(self, token: int, *, special: bool) -> bytes:
        """A token's text bytes; control tokens render as nothing unless `special`."""
        c = lib()
        vocab = self.vocab
        buf = ctypes.create_string_buffer(64)
        n = c.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        if n < 0:  # the piece is longer than the buffer: -n is the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = c.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def close(self) -> None:
        """Free the weights, after every context of the model (they point into them)."""
        for context in list(self._contexts):
            context.close()
        if self._pointer is not None:
            lib().llama_model_free(self._pointer)
            self._pointer = None

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class ContextParams:
    """What a context is created with; None leaves llama.cpp's default."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_seq_max: int | None = None
    kv_unified: bool | None = None
    cache_type: CacheType | None = None  # K and V alike
    flash_attention: FlashAttention | None = None
    no_perf: bool | None = None
    swa_full: bool | None = None  # every position in the sliding-window layers


class Context:
    """A llama_context: the KV cache (one memory sequence per slot) and decode buffers."""

    def __init__(self, model: Model, params: ContextParams) -> None:
        self._closed = True  # until there is something to free
        c = lib()
        native = c.llama_context_default_params()
        native.n_ctx = params.n_ctx
        native.n_batch = native.n_ubatch = params.n_batch
        native.n_threads = native.n_threads_batch = params.n_threads
        if params.n_seq_max is not None:
            native.n_seq_max = params.n_seq_max
        if params.kv_unified is not None:
            native.kv_unified = params.kv_unified
        if params.cache_type is not None:
            native.type_k = native.type_v = {
                "f16": c.GGML_TYPE_F16,
                "q8_0": c.GGML_TYPE_Q8_0,
                "q4_0": c.GGML_TYPE_Q4_0,
            }[params.cache_type]
        if params.flash_attention is not None:
            native.flash_attn_type = {
                "on": c.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                "off": c.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                "auto": c.LLAMA_FLASH_ATTN_TYPE_AUTO,
            }[params.flash_attention]
        if params.no_perf is not None:
            native.no_perf = params.no_perf
        if params.swa_full is not None:
            native.swa_full = params.swa_full
        pointer = c.llama_init_from_model(model._open(), native)
        if not pointer:
            raise LlamaError("Failed to create llama_context")
        self.handle = ContextHandle(pointer)
        self._closed = False
        self._model = model  # freed after this context, never before
        model._contexts.add(self)
        self._memory: int | None = None
        self._decode = c.llama_decode

    @property
    def _kv(self) -> int:
        if self._memory is None:
            self._memory = lib().llama_get_memory(self.handle)
        return self._memory

    def n_ctx(self) -> int:
        """Cells in the KV cache, every sequence's together."""
        return int(lib().llama_n_ctx(self.handle))

    def n_ctx_seq(self) -> int:
        """The cells one sequence may use."""
        return int(lib().llama_n_ctx_seq(self.handle))

    def decode(self, batch: Batch, n_tokens: int) -> int:
        """Evaluate the batch's first `n_tokens` entries; llama_decode's status (0: done)."""
        native = batch._native
        native.n_tokens = n_tokens
        return int(self._decode(self.handle, native))

    # Memory sequences; p1 -1 means to the end, and p0 -1 from the start.

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """Drop `seq`'s cells in [p0, p1); False if the memory cannot cut there."""
        return bool(lib().llama_memory_seq_rm(self._kv, seq, p0, p1))

    def seq_cp(self, source: int, target: int, p0: int, p1: int) -> None:
        """Give `target` `source`'s cells in [p0, p1) (shared, not copied, in one pool)."""
        lib().llama_memory_seq_cp(self._kv, source, target, p0, p1)

    def seq_pos_min(self, seq: int) -> int:
        return int(lib().llama_memory_seq_pos_min(self._kv, seq))

    def seq_pos_max(self, seq: int) -> int:
        return int(lib().llama_memory_seq_pos_max(self._kv, seq))

    def seq_state(self, seq: int, *, partial: bool = False) -> memoryview | None:
        """Sequence `seq`'s cells as bytes (for `load_seq_state`); None if llama.cpp fails.

        `partial`: only what cannot be cut back afterwards, the recurrent states and the
        sliding window's cells (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY); the per-position
        attention cache stays out, so a checkpoint costs a window or a state, not a prefix."""
        c = lib()
        flags = c.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else c.LLAMA_STATE_SEQ_FLAGS_NONE
        size = int(c.llama_state_seq_get_size_ext(self.handle, seq, flags))
        if size == 0:
            return None
        buffer = (ctypes.c_uint8 * size)()
        got = int(c.llama_state_seq_get_data_ext(self.handle, buffer, size, seq, flags))
        return memoryview(buffer)[:got] if got else None

    def load_seq_state(self, seq: int, state: bytes | bytearray, *, partial: bool = False) -> bool:
        """Read `seq_state`'s bytes into sequence `seq` (replacing what it held of the same
        parts); False if llama.cpp refuses them."""
        c = lib()
        flags = c.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else c.LLAMA_STATE_SEQ_FLAGS_NONE
        if isinstance(state, bytearray):
            buffer: Any = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:
            buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return bool(c.llama_state_seq_set_data_ext(self.handle, buffer, len(state), seq, flags))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            lib().llama_free(self.handle)

    def __del__(self) -> None:
        self.close()


class Batch:
    """A llama_batch of up to `capacity` tokens, one sequence each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._native: Any = lib().llama_batch_init(capacity, 0, 1)

    def put(self, i: int, token: int, position: int, seq: int, *, logits: bool) -> None:
        native = self._native
        native.token[i] = token
        native.pos[i] = position
        native.n_seq_id[i] = 1
        native.seq_id[i][0] = seq
        native.logits[i] = logits

    def close(self) -> None:
        if self._native is not None:
            lib().llama_batch_free(self._native)
            self._native = None

    def __del__(self) -> None:
        self.close()


# ---- sampling -------------------------------------------------------------------------------


def logits_at(ctx: ContextHandle, index: int, n_vocab: int) -> npt.NDArray[np.float32]:
    """The logits at `index` of the last batch (a view: the next decode overwrites it)."""
    import numpy as np

    pointer = lib().llama_get_logits_ith(ctx, index)
    view: npt.NDArray[np.float32] = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
    return view


def _free_sampler(pointer: int) -> None:
    lib().llama_sampler_free(pointer)


class Candidates:
    """A llama_token_data_array of up to `capacity` tokens, for samplers to filter and pick
    from. `entries` is a numpy view of its tokens (fields id, logit, p) to fill."""

    def __init__(self, capacity: int) -> None:
        import numpy as np

        c = lib()
        self._data = (c.llama_token_data * capacity)()
        self._array = c.llama_token_data_array(self._data, 1, -1, False)
        self._ref = ctypes.byref(self._array)
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self.entries: npt.NDArray[np.void] = np.frombuffer(self._data, dtype=dtype)

    def use(self, size: int) -> None:
        """Make the first `size` entries the candidates, unsorted, none selected."""
        array = self._array
        array.size = size
        array.selected = -1
        array.sorted = False

    def single(self, token: int) -> None:
        """Make `token` the one candidate, at logit 0."""
        first = self._data[0]
        first.id = token
        first.logit = 0.0
        self.use(1)

    def first_allowed(self) -> bool:
        """Whether the first candidate survived the samplers applied (kept a finite logit)."""
        return not math.isinf(self._data[0].logit)

    def selected(self) -> int:
        """The token the last sampler applied picked."""
        return int(self._data[self._array.selected].id)


class Grammar:
    """A grammar sampler: owned here until it is added to a `SamplerChain`, then by it."""

    def __init__(self, pointer: int) -> None:
        self._pointer = pointer
        self._finalizer = weakref.finalize(self, _free_sampler, pointer)
        c = lib()
        self._accept = c.llama_sampler_accept
        self._apply = c.llama_sampler_apply
        self._one: Candidates | None = None

    @classmethod
    def parse(
        cls, vocab: Vocab, text: str, *, lazy_patterns: Sequence[str] | None
    ) -> Grammar | None:
        """`text` (GBNF, rule `root`) parsed for `vocab`, or None when llama.cpp refuses it (it
        says why on stderr). With `lazy_patterns` it constrains nothing until one of these
        regular expressions matches the output, and from there on."""
        c = lib()
        if lazy_patterns is None:
            pointer = c.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        else:
            patterns = (ctypes.c_char_p * len(lazy_patterns))(
                *(pattern.encode() for pattern in lazy_patterns)
            )
            tokens = (c.llama_token * 0)()
            pointer = c.llama_sampler_init_grammar_lazy_patterns(
                vocab, text.encode(), b"root", patterns, len(lazy_patterns), tokens, 0
            )
        return cls(pointer) if pointer else None

    def clone(self) -> Grammar | None:
        """A copy in this one's state (nothing is reparsed); None if llama.cpp fails."""
        pointer = lib().llama_sampler_clone(self._pointer)
        return Grammar(pointer) if pointer else None

    def accept(self, token: int) -> None:
        """Advance the grammar past `token`."""
        self._accept(self._pointer, token)

    def apply(self, candidates: Candidates) -> None:
        """Set the logit of every candidate the grammar does not allow next to -inf."""
        self._apply(self._pointer, candidates._ref)

    def allows(self, token: int) -> bool:
        """Whether the grammar allows `token` next (a lazy one not yet triggered allows all)."""
        if self._one is None:
            self._one = Candidates(1)
        self._one.single(token)
        self.apply(self._one)
        return self._one.first_allowed()

    def close(self) -> None:
        """Free it, unless a chain owns it (the chain frees it then)."""
        self._finalizer()


class SamplerChain:
    """A llama.cpp sampler chain: the samplers added, applied in order, pick a token."""

    def __init__(self) -> None:
        c = lib()
        self._pointer: int = c.llama_sampler_chain_init(c.llama_sampler_chain_default_params())
        self._finalizer = weakref.finalize(self, _free_sampler, self._pointer)
        self._sample = c.llama_sampler_sample
        self._apply = c.llama_sampler_apply
        self._grammars: list[Grammar] = []

    def _add(self, sampler: int) -> None:
        lib().llama_sampler_chain_add(self._pointer, sampler)

    def add_grammar(self, grammar: Grammar) -> None:
        """Add `grammar`; the chain owns it from here on (it stays usable until the chain
        closes)."""
        grammar._finalizer.detach()
        self._grammars.append(grammar)
        self._add(grammar._pointer)

    def add_greedy(self) -> None:
        self._add(lib().llama_sampler_init_greedy())

    def add_top_k(self, k: int) -> None:
        self._add(lib().llama_sampler_init_top_k(k))

    def add_top_p(self, p: float, min_keep: int) -> None:
        self._add(lib().llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int) -> None:
        self._add(lib().llama_sampler_init_min_p(p, min_keep))

    def add_temperature(self, temperature: float) -> None:
        self._add(lib().llama_sampler_init_temp(temperature))

    def add_dist(self, seed: int) -> None:
        self._add(lib().llama_sampler_init_dist(seed))

    def sample(self, ctx: ContextHandle, index: int) -> int:
        """The token the chain picks from the logits at `index` of the last batch (accepted
        by every sampler of the chain)."""
        return int(self._sample(self._pointer, ctx, index))

    def apply(self, candidates: Candidates) -> None:
        """Run the chain over `candidates`; `candidates.selected()` is its pick."""
        self._apply(self._pointer, candidates._ref)

    def close(self) -> None:
        """Free the chain and every sampler in it, grammars included."""
        self._finalizer()


# ---- the JSON-schema converter --------------------------------------------------------------


class SchemaConverter:
    """llama-cpp-python's JSON-schema-to-GBNF converter, with the rule table opened up.

    The grammar builder adds rules of its own (integer ranges) and swaps the converter's
    `char` for a stricter one, so it reads and writes the converter's private `_rules`.
    """

    def __init__(self) -> None:
        converter: Any = importlib.import_module("llama_cpp.llama_grammar").SchemaConverter
        self._converter: Any = converter(
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )

    def visit(self, schema: dict[str, Any], name: str) -> str:
        """Add rules for `schema`; the name of its rule. Asserts on shapes it cannot express."""
        return str(self._converter.visit(schema, name))

    @property
    def rules(self) -> dict[str, str]:
        """The rules so far, by name (the live table: edits change the grammar)."""
        rules: dict[str, str] = self._converter._rules
        return rules

    @rules.setter
    def rules(self, rules: dict[str, str]) -> None:
        self._converter._rules = rules

    def literal(self, text: str) -> str:
        """How the converter writes `text` as a GBNF literal."""
        return str(self._converter._format_literal(text))

    def add_rule(self, name: str, body: str) -> str:
        """Add a rule under a free name close to `name`; the name it got."""
        return str(self._converter._add_rule(name, body))

    def format(self) -> str:
        return str(self._converter.format_grammar())
