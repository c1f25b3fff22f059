"""The llama.cpp self-test: the model it writes, how a child's end is judged, the cache."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from pensieved.engine import selftest
from pensieved.errors import LlamaBuildError, ModelLoadError

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)

# ---- the model ----------------------------------------------------------------------------------


def read_gguf(data: bytes) -> tuple[dict[str, Any], dict[str, tuple[list[int], int, int]], int]:
    """Metadata, tensors ({name: (dims, type, offset)}) and where the data starts."""
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n : pos].decode()

    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<IQQ")
    assert version == 3
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        kind = take("<I")
        meta[key] = {4: lambda: take("<I"), 6: lambda: take("<f"), 8: string}[kind]()
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos))
        pos += 8 * n_dims
        kind, offset = take("<IQ")
        tensors[name] = (dims, kind, offset)
    return meta, tensors, pos + (-pos % 32)


def test_the_model_is_a_well_formed_gguf() -> None:
    data = selftest.tiny_model()
    assert data == selftest.tiny_model()  # the same bytes every time
    meta, tensors, start = read_gguf(data)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "no_vocab"
    assert meta["llama.vocab_size"] == selftest.N_VOCAB
    assert len(tensors) == 3 + 9 * selftest.N_LAYER
    end = start
    for name, (dims, kind, offset) in tensors.items():
        assert offset % 32 == 0, name
        count = 1
        for dim in dims:
            count *= dim
        size = count * 4 if kind == 0 else count // 32 * 34  # F32, or Q8_0 blocks
        # What llama.cpp's AMX kernels take: rows and columns in multiples of 32, Q8_0.
        if kind == 8:
            assert all(dim % 32 == 0 for dim in dims), name
        end = max(end, start + offset + size)
    assert end <= len(data) < end + 32


# ---- the child ----------------------------------------------------------------------------------


@needs_llama
def test_the_installed_build_runs_a_batched_decode() -> None:
    verdict = selftest.run_check()
    assert verdict == selftest.Verdict("ok"), verdict.detail


@needs_llama
@pytest.mark.parametrize("name", ["ILL", "SIGSEGV"])
def test_a_child_killed_by_a_signal_is_told_apart(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(selftest.FAKE_SIGNAL_ENV, name)
    verdict = selftest.run_check()
    expected = name if name.startswith("SIG") else f"SIG{name}"
    assert verdict == selftest.Verdict("signal", signal_name=expected)
    assert verdict.crashed and not verdict.ok
    assert f"killed the process with {expected}" in verdict.describe()


def test_a_child_that_cannot_load_llama_is_a_failure_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path / "nowhere"))
    verdict = selftest.run_check()
    assert verdict.outcome == "failed" and not verdict.crashed
    assert "exit status 1" in verdict.detail


def test_a_child_that_hangs_is_a_timeout() -> None:
    verdict = selftest.run_check(timeout=0.01)
    assert verdict.outcome == "timeout" and not verdict.crashed


def test_a_python_that_cannot_start_is_a_failure(tmp_path: Path) -> None:
    verdict = selftest.run_check(str(tmp_path / "no-python"))
    assert verdict.outcome == "failed" and "cannot start" in verdict.detail


# ---- identities and the cache -------------------------------------------------------------------


def test_the_key_follows_the_library_files(tmp_path: Path) -> None:
    lib = tmp_path / "libggml-cpu.so"
    lib.write_bytes(b"one build")
    first = selftest.verdict_key(tmp_path)
    (tmp_path / "README").write_text("not a library")
    assert selftest.verdict_key(tmp_path) == first
    lib.write_bytes(b"another build")
    assert selftest.verdict_key(tmp_path) != first


def test_the_cpu_identity_names_the_instruction_sets() -> None:
    identity = selftest.cpu_identity()
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        assert "flags=" in identity
    assert identity.splitlines()[0] in ("Linux", "Darwin")


@pytest.fixture
def fake_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library directory of its own, so verdicts here never meet the real build's."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libllama.so").write_bytes(b"build")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(lib))
    monkeypatch.setattr(selftest, "_gate_verdicts", {})
    return lib


def counting_check(verdict: selftest.Verdict, calls: list[int]) -> Any:
    def check(**_: Any) -> selftest.Verdict:
        calls.append(1)
        return verdict

    return check


def test_a_verdict_is_checked_once_per_build(
    fake_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(selftest, "run_check", counting_check(selftest.Verdict("ok"), calls))
    cache = tmp_path / "verdicts.json"
    assert selftest.cached_verdict(cache).ok
    assert selftest.cached_verdict(cache).ok
    assert len(calls) == 1
    # Another process (an empty memo) reads the file.
    monkeypatch.setattr(selftest, "_gate_verdicts", {})
    assert selftest.cached_verdict(cache).ok
    assert len(calls) == 1
    assert [v["outcome"] for v in json.loads(cache.read_text()).values()] == ["ok"]
    # A rebuilt library is checked again.
    (fake_library / "libllama.so").write_bytes(b"rebuilt")
    assert selftest.cached_verdict(cache).ok
    assert len(calls) == 2


def test_inconclusive_and_faked_verdicts_are_not_remembered(
    fake_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    failed = selftest.Verdict("failed", detail="exit status 1")
    monkeypatch.setattr(selftest, "run_check", counting_check(failed, calls))
    cache = tmp_path / "verdicts.json"
    selftest.cached_verdict(cache)
    selftest.cached_verdict(cache)
    assert len(calls) == 2 and not cache.exists()
    crashed = selftest.Verdict("signal", signal_name="SIGILL")
    monkeypatch.setattr(selftest, "run_check", counting_check(crashed, calls))
    monkeypatch.setenv(selftest.FAKE_SIGNAL_ENV, "ILL")
    assert selftest.cached_verdict(cache).crashed
    assert not cache.exists()


def test_a_build_that_dies_is_a_load_error_that_says_what_to_do(
    fake_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    crashed = selftest.Verdict("signal", signal_name="SIGILL")
    monkeypatch.setattr(selftest, "run_check", counting_check(crashed, []))
    with pytest.raises(LlamaBuildError) as info:
        selftest.ensure_runnable()
    assert isinstance(info.value, ModelLoadError)  # the engine's load-failure path takes it
    message = str(info.value)
    assert "cannot run on this CPU" in message and "SIGILL" in message
    assert str(fake_library) in message
    assert "make clean install" in message and "brew reinstall pensieve" in message
    assert "--no-cache-dir" in message


def test_an_inconclusive_check_does_not_block_loading(
    fake_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    failed = selftest.Verdict("timeout", detail="no answer within 180 s")
    monkeypatch.setattr(selftest, "run_check", counting_check(failed, []))
    selftest.ensure_runnable()  # no exception: the model load reports its own errors


def test_the_check_needs_nothing_but_the_standard_library() -> None:
    """packaging/llama_install.py loads this module before `pip install -e .`: at load time
    it imports only the standard library (llama_cpp and pensieved's own modules, lazily)."""
    source = Path(selftest.__file__).read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__")
    }
    assert imports <= set(sys.stdlib_module_names)
