"""The API reaches the engine only through its interface (and its plain request, event and
tool-text modules): never the Engine, its model pool or llama.cpp."""

from __future__ import annotations

import ast
from pathlib import Path

import pensieved.api

ALLOWED = {
    "pensieved.engine.interface",
    "pensieved.engine.types",
    "pensieved.engine.tools",
}


def engine_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith(("pensieved.engine", "llama_cpp"))}


def test_the_api_imports_nothing_of_the_engine_but_its_interface() -> None:
    root = Path(pensieved.api.__file__).parent
    found = {
        str(path.relative_to(root)): sorted(engine_imports(path) - ALLOWED)
        for path in sorted(root.rglob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {}
