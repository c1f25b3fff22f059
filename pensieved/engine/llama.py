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

import ctypes
import importlib
import logging
import threading
from collections.abc import Callable
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


def _forward_llama_log(level: int, text: bytes, _user_data: Any) -> None:
    global _last_level
    if level != 5:
        _last_level = level
    forwarded = _FORWARDED.get(_last_level)
    message = text.decode("utf-8", errors="replace").strip()
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


def attention_on_gpu(gpu_layers: int) -> bool:
    """Whether a model loaded with `gpu_layers` runs its attention on a GPU (Metal, CUDA):
    layers are offloaded and this llama.cpp build can offload at all."""
    return gpu_layers != 0 and bool(lib().llama_supports_gpu_offload())


def memory_cut_problem(model: Any, *, swa_full: bool) -> str | None:
    """Why a sequence's last positions cannot be removed from `model`'s memory (speculative
    drafts need it), or None when they can. A recurrent state has no positions to remove;
    a sliding-window cache not kept whole may already have dropped what a cut back needs."""
    c = lib()
    if c.llama_model_is_recurrent(model) or c.llama_model_is_hybrid(model):
        return "the model's recurrent memory cannot drop rejected draft tokens"
    if c.llama_model_n_swa(model) > 0 and not swa_full:
        return "its sliding-window KV cache may not hold what dropping draft tokens needs"
    return None


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
