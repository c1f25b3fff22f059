"""Test-only: slow down pensieved's model loads through the engine's own interface.

Put this directory on PYTHONPATH and set PENSIEVE_TEST_LOAD_DELAY_S: every call llama.cpp
makes to `ModelPool.keep_loading` while reading weights then takes that long, so a load of the
small bundled model lasts minutes, long enough to stop or kill the daemon in the middle of
it. Nothing in the product sleeps; processes that never import the engine (pensievectl)
are untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from types import ModuleType
from typing import Any

_DELAY = float(os.environ.get("PENSIEVE_TEST_LOAD_DELAY_S") or 0)
_TARGET = "pensieved.engine.lifecycle"


def _slow_down(module: ModuleType) -> None:
    pool = module.ModelPool
    original = pool.keep_loading

    def keep_loading(self: Any, path: Any, fraction: float) -> bool:
        time.sleep(_DELAY)
        return bool(original(self, path, fraction))

    pool.keep_loading = keep_loading


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        _slow_down(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if _DELAY > 0:
    sys.meta_path.insert(0, _Finder())
