from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.targets import (
    Settings,
    llama_cpp_python_lib_dir,
    llama_server_args,
    same_kernels_env,
)


def test_llama_server_gets_the_same_work_as_pensieved() -> None:
    settings = Settings(threads=3, slots=4, context_size=8192, batch_size=256, flash_attention="on")
    args = llama_server_args(Path("/bin/llama-server"), Path("/m.gguf"), 8123, settings)

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert args[0] == "/bin/llama-server"
    assert value("--model") == "/m.gguf" and value("--port") == "8123"
    assert value("--threads") == value("--threads-batch") == "3"
    assert value("--parallel") == "4"
    # One KV stream per slot, each with pensieved's per-slot context.
    assert "--no-kv-unified" in args
    assert value("--ctx-size") == str(4 * 8192)
    assert value("--batch-size") == value("--ubatch-size") == "256"
    assert value("--flash-attn") == "on"
    assert value("--cache-type-k") == value("--cache-type-v") == "f16"


def test_llama_server_unified_and_quantized() -> None:
    settings = Settings(3, 4, 8192, 256, "on", kv_cache_type="q8_0", llama_unified=True)
    args = llama_server_args(Path("/bin/llama-server"), Path("/m.gguf"), 8123, settings)
    assert "--kv-unified" in args and "--no-kv-unified" not in args
    assert args[args.index("--cache-type-v") + 1] == "q8_0"


def test_llama_server_runs_on_llama_cpp_pythons_own_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    lib = llama_cpp_python_lib_dir()
    assert lib is not None and any(lib.glob("libllama*"))
    env = same_kernels_env()
    assert env["LD_LIBRARY_PATH"] == f"{lib}{os.pathsep}/opt/other"
    assert env["DYLD_LIBRARY_PATH"].startswith(str(lib))
