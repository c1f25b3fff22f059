"""The one module that touches llama-cpp-python: an upgrade of it is checked here.

Pensieve drives llama.cpp through the raw ctypes layer (`llama_cpp.llama_cpp`: batches, memory
sequences, samplers, grammars, state save/load, callbacks), the private `llama_cpp._internals`
(model and context ownership) and the JSON-schema converter's private rule table. None of these
are a stable API, which is why the version is pinned exactly; everything else in the engine
goes through this module (`selftest.py` only looks up where the package is installed).

The import is lazy: loading the shared library takes a while, and importing the engine should
not cost that.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any


@cache
def lib() -> Any:
    """llama.cpp's C API as ctypes functions (llama-cpp-python's annotations are partial).

    The package re-exports `llama_cpp.llama_cpp` whole; the install check's stand-in wheel
    provides only the package.
    """
    return importlib.import_module("llama_cpp")


@cache
def internals() -> Any:
    """llama-cpp-python's owners of a model, a context and a sampler chain."""
    return importlib.import_module("llama_cpp._internals")


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


def init_backend() -> None:
    """llama.cpp's process-wide setup, once (what `Llama` does on first use), and its log
    routed into ours: llama-cpp-python's own handler prints everything to stderr."""
    global _backend_ready, _log_callback
    c = lib()
    with _backend_lock:
        if not _backend_ready:
            _log_callback = c.llama_log_callback(_forward_llama_log)
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


def progress_callback(progress: Callable[[float, Any], bool]) -> Any:
    """A C callback for a model load's progress; the caller keeps it alive during the load."""
    return lib().llama_progress_callback(progress)


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


# ---- memory kinds and partial sequence states (context checkpoints) -------------------------


def model_is_recurrent(model: Any) -> bool:
    """Every layer keeps a recurrent state (Mamba, RWKV): no per-position cache at all."""
    return bool(lib().llama_model_is_recurrent(model))


def model_is_hybrid(model: Any) -> bool:
    """Some layers keep a recurrent state, the others attention (Qwen3.5, LFM2, Granite 4)."""
    return bool(lib().llama_model_is_hybrid(model))


def model_sliding_window(model: Any) -> int:
    """The sliding-window attention span in tokens, 0 when every attention layer is global."""
    return int(lib().llama_model_n_swa(model))


def seq_pos_min(memory: Any, seq: int) -> int:
    """The smallest position sequence `seq` still holds in every layer's memory (-1: empty).

    For a sliding-window cache it is the oldest position the window layers kept."""
    return int(lib().llama_memory_seq_pos_min(memory, seq))


def seq_pos_max(memory: Any, seq: int) -> int:
    """The largest position sequence `seq` holds (-1: empty)."""
    return int(lib().llama_memory_seq_pos_max(memory, seq))


def seq_rm(memory: Any, seq: int, start: int, end: int = -1) -> bool:
    """Remove positions [start, end) of `seq` (-1: open); False when the memory cannot cut
    there (a recurrent state), in which case nothing changed."""
    return bool(lib().llama_memory_seq_rm(memory, seq, start, end))


def seq_cp(memory: Any, source: int, target: int, start: int = -1, end: int = -1) -> None:
    """Give `target` `source`'s positions [start, end) (-1: open)."""
    lib().llama_memory_seq_cp(memory, source, target, start, end)


def seq_state(ctx: Any, seq: int, *, partial: bool) -> bytes | None:
    """Sequence `seq`'s state as bytes, or None if llama.cpp exported nothing.

    `partial`: only what cannot be cut back afterwards, the recurrent state and the sliding
    window's cells (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY); the per-position attention cache stays
    out, so a checkpoint costs a window or a state, not the whole prefix."""
    c = lib()
    flags = c.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else c.LLAMA_STATE_SEQ_FLAGS_NONE
    size = int(c.llama_state_seq_get_size_ext(ctx, seq, flags))
    if size == 0:
        return None
    buffer = (ctypes.c_uint8 * size)()
    got = int(c.llama_state_seq_get_data_ext(ctx, buffer, size, seq, flags))
    return bytes(memoryview(buffer)[:got]) if got else None


def set_seq_state(ctx: Any, seq: int, state: bytes, *, partial: bool) -> bool:
    """Read a state from `seq_state` into sequence `seq` (replacing what it held of the same
    parts); False when llama.cpp refused it."""
    c = lib()
    flags = c.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else c.LLAMA_STATE_SEQ_FLAGS_NONE
    buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    return int(c.llama_state_seq_set_data_ext(ctx, buffer, len(state), seq, flags)) > 0
