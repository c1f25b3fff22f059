"""Only `pensieved/engine/llama.py` touches llama-cpp-python.

An upgrade of llama-cpp-python is then checked in one file, and the native calls the other
modules need are typed functions there. Every module of the three packages is parsed (not
imported) and searched for the ways around the boundary: importing `llama_cpp` (by a statement,
`importlib` or `find_spec`), calling the boundary's raw accessors `lib()`/`internals()`, and
ctypes, which is how llama.cpp's structs and pointers are read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pensieve", "pensieved", "pensievectl")
BOUNDARY = Path("pensieved/engine/llama.py")
# Modules that use ctypes for something other than llama.cpp, and what for.
CTYPES_ELSEWHERE = {
    Path("pensieved/engine/lifecycle.py"): "libc's malloc_trim after a model is unloaded",
}
RAW_ACCESSORS = {"lib", "internals"}
IMPORTERS = {"import_module", "__import__", "find_spec"}


def _is_llama_cpp(name: str) -> bool:
    return name == "llama_cpp" or name.startswith("llama_cpp.")


def violations(path: Path, source: str) -> Iterator[str]:
    """Where `source` (the module at `path`, relative to the checkout) goes around the
    boundary, as `path:line: what`."""
    tree = ast.parse(source, filename=str(path))
    ctypes_allowed = path in CTYPES_ELSEWHERE
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_llama_cpp(alias.name):
                    yield f"{path}:{line}: imports {alias.name}"
                elif alias.name == "ctypes" and not ctypes_allowed:
                    yield f"{path}:{line}: imports ctypes"
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_llama_cpp(module):
                yield f"{path}:{line}: imports from {module}"
            elif module == "ctypes" and not ctypes_allowed:
                yield f"{path}:{line}: imports from ctypes"
            elif module == "pensieved.engine.llama" or (
                module.endswith("llama") and node.level > 0
            ):
                for alias in node.names:
                    if alias.name in RAW_ACCESSORS:
                        yield f"{path}:{line}: imports the boundary's raw {alias.name}()"
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name in RAW_ACCESSORS and not node.args:
                yield f"{path}:{line}: calls {name}()"
            elif name in IMPORTERS and node.args:
                first = node.args[0]
                if (
                    isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                    and _is_llama_cpp(first.value)
                ):
                    yield f"{path}:{line}: {name}({first.value!r})"
        elif isinstance(node, ast.Attribute) and node.attr == "ctypeslib":
            yield f"{path}:{line}: uses numpy's ctypeslib"


def modules() -> list[Path]:
    found = [
        path.relative_to(ROOT)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    ]
    assert BOUNDARY in found, "the boundary module moved: update this test"
    return found


def test_only_the_boundary_touches_llama_cpp() -> None:
    found = [
        problem
        for path in modules()
        if path != BOUNDARY
        for problem in violations(path, (ROOT / path).read_text(encoding="utf-8"))
    ]
    assert not found, "llama.cpp is reached outside engine/llama.py:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import llama_cpp\n",
        "import llama_cpp.llama_cpp as c\n",
        "from llama_cpp import llama_grammar\n",
        "from llama_cpp._internals import LlamaModel\n",
        "import importlib\nm = importlib.import_module('llama_cpp._internals')\n",
        "import importlib.util\nspec = importlib.util.find_spec('llama_cpp')\n",
        "from pensieved.engine.llama import lib\n",
        "from .llama import internals\n",
        "from pensieved.engine import llama\nllama.lib().llama_decode(0, 0)\n",
        "import ctypes\n",
        "from ctypes import byref\n",
        "import numpy as np\nx = np.ctypeslib.as_array(p, shape=(3,))\n",
    ],
)
def test_each_way_around_the_boundary_is_found(source: str) -> None:
    problems = list(violations(Path("pensieved/engine/elsewhere.py"), source))
    assert len(problems) == 1, problems
    assert problems[0].startswith("pensieved/engine/elsewhere.py:")


def test_typed_calls_through_the_boundary_pass() -> None:
    source = (
        "from pensieved.engine.llama import Batch, Context\n"
        "from pensieved.engine import llama\n"
        "version = llama.package_version()\n"
    )
    assert list(violations(Path("pensieved/engine/batcher.py"), source)) == []
