"""Can the installed llama.cpp run on this CPU? A batched decode in a child process says.

A llama.cpp compiled with the build machine's every instruction set can still execute
instructions the process may not: on Xeons with AMX, llama.cpp's tile kernels run in worker
threads without the tile set-up the kernel wants, and the whole process dies on the first
prompt batch of more than one token (SIGILL, or SIGSEGV where the CPU raises a general
protection fault on `ldtilecfg`, as on the VMs this was found on). No Python code can catch
that, so the decode runs in a child and the way the child ended is the verdict.

The child decodes a few hundred tokens through a model written here (llama architecture,
8-bit quantized random weights, no vocabulary: token ids go in directly), so the check needs
no model file anywhere; it is shaped so that llama.cpp's AMX kernels take its matrices.

This module imports only the standard library at load time: packaging/llama_install.py runs
it before pensieve's dependencies are installed. The daemon-side gate (`ensure_runnable`)
imports pensieved's own modules when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Set to a signal name (ILL, SIGSEGV, ...) to make the child kill itself with it after loading
# llama.cpp, as a build that cannot run here would: the tests' way to reach the failure paths
# on any machine. A run with it set is never cached.
FAKE_SIGNAL_ENV = "PENSIEVE_SELFTEST_SIGNAL"
# Bumped whenever what the check does changes, so cached verdicts are not trusted across it.
CHECK_VERSION = 1
# What keeps a native x86 build off AMX: llama.cpp compiles its tile kernels only when the
# compiler targets AMX-INT8, and everything else -march=native gives stays.
X86_PORTABLE_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BATCH_TOKENS = 384
DEFAULT_TIMEOUT_S = 180.0
_OK_LINE = "pensieve-selftest: ok"

# ---- the model ----------------------------------------------------------------------------------

# Every matrix dimension is a multiple of 32 and the weights are Q8_0: what llama.cpp's AMX
# buffer type accepts, so a build with AMX kernels runs them on this model.
N_EMBD = 256
N_HEAD = 4
N_FF = 512
N_LAYER = 2
N_VOCAB = 512
N_CTX_TRAIN = 2048

_GGUF_ALIGNMENT = 32
_GGML_F32 = 0
_GGML_Q8_0 = 8
_Q8_BLOCK = 32
_KV_UINT32, _KV_FLOAT32, _KV_STRING = 4, 6, 8


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _q8_0(rows: int, cols: int, rng: random.Random) -> bytes:
    """A rows x cols matrix in Q8_0 blocks (an f16 scale, then 32 signed bytes) of noise."""
    scale = struct.pack("<e", 0.004)
    blocks = rows * cols // _Q8_BLOCK
    noise = rng.randbytes(blocks * _Q8_BLOCK)
    return b"".join(scale + noise[i * _Q8_BLOCK : (i + 1) * _Q8_BLOCK] for i in range(blocks))


def _ones(n: int) -> bytes:
    return struct.pack(f"<{n}f", *([1.0] * n))


def tiny_model() -> bytes:
    """A complete GGUF file: a two-layer llama with random weights and no tokenizer."""
    rng = random.Random(20240611)
    tensors: list[tuple[str, list[int], int, bytes]] = [
        ("token_embd.weight", [N_EMBD, N_VOCAB], _GGML_Q8_0, _q8_0(N_VOCAB, N_EMBD, rng)),
        ("output_norm.weight", [N_EMBD], _GGML_F32, _ones(N_EMBD)),
        ("output.weight", [N_EMBD, N_VOCAB], _GGML_Q8_0, _q8_0(N_VOCAB, N_EMBD, rng)),
    ]
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        tensors += [
            (f"{blk}.attn_norm.weight", [N_EMBD], _GGML_F32, _ones(N_EMBD)),
            (f"{blk}.ffn_norm.weight", [N_EMBD], _GGML_F32, _ones(N_EMBD)),
        ]
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append(
                (f"{blk}.{name}.weight", [N_EMBD, N_EMBD], _GGML_Q8_0, _q8_0(N_EMBD, N_EMBD, rng))
            )
        for name in ("ffn_gate", "ffn_up"):
            tensors.append(
                (f"{blk}.{name}.weight", [N_EMBD, N_FF], _GGML_Q8_0, _q8_0(N_FF, N_EMBD, rng))
            )
        tensors.append(
            (f"{blk}.ffn_down.weight", [N_FF, N_EMBD], _GGML_Q8_0, _q8_0(N_EMBD, N_FF, rng))
        )

    metadata: list[tuple[str, int, Any]] = [
        ("general.architecture", _KV_STRING, "llama"),
        ("general.name", _KV_STRING, "pensieve-selftest"),
        ("llama.context_length", _KV_UINT32, N_CTX_TRAIN),
        ("llama.embedding_length", _KV_UINT32, N_EMBD),
        ("llama.block_count", _KV_UINT32, N_LAYER),
        ("llama.feed_forward_length", _KV_UINT32, N_FF),
        ("llama.attention.head_count", _KV_UINT32, N_HEAD),
        ("llama.attention.head_count_kv", _KV_UINT32, N_HEAD),
        ("llama.attention.layer_norm_rms_epsilon", _KV_FLOAT32, 1e-5),
        ("llama.vocab_size", _KV_UINT32, N_VOCAB),
        ("tokenizer.ggml.model", _KV_STRING, "no_vocab"),
    ]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, kind, value in metadata:
        out += _gguf_string(key) + struct.pack("<I", kind)
        if kind == _KV_STRING:
            out += _gguf_string(value)
        elif kind == _KV_UINT32:
            out += struct.pack("<I", value)
        else:
            out += struct.pack("<f", value)
    offset = 0
    for name, dims, kind, data in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)
        offset += -(-len(data) // _GGUF_ALIGNMENT) * _GGUF_ALIGNMENT
    out += bytes(-len(out) % _GGUF_ALIGNMENT)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % _GGUF_ALIGNMENT)
    return bytes(out)


# ---- the child ----------------------------------------------------------------------------------


def _decode_batch(model_path: str, threads: int) -> None:
    """Load the model and decode one batch of BATCH_TOKENS tokens; raise on any failure."""
    from pensieved.engine import llama

    # Nobody reads the child's llama.cpp log: it is dropped, not forwarded.
    llama.init_backend(forward_log=False)
    fake = os.environ.get(FAKE_SIGNAL_ENV)
    if fake:
        name = fake.upper() if fake.upper().startswith("SIG") else f"SIG{fake.upper()}"
        os.kill(os.getpid(), signal.Signals[name])
    try:
        model = llama.Model(Path(model_path), gpu_layers=0)
    except llama.LlamaError:
        raise RuntimeError(f"llama.cpp cannot load the self-test model {model_path}") from None
    try:
        params = llama.ContextParams(
            n_ctx=BATCH_TOKENS * 2, n_batch=BATCH_TOKENS, n_threads=threads
        )
        try:
            ctx = llama.Context(model, params)
        except llama.LlamaError:
            raise RuntimeError(
                "llama.cpp cannot create a context for the self-test model"
            ) from None
        batch = llama.Batch(BATCH_TOKENS)
        try:
            for i in range(BATCH_TOKENS):
                batch.put(i, (i * 7) % N_VOCAB, i, 0, logits=i == BATCH_TOKENS - 1)
            code = ctx.decode(batch, BATCH_TOKENS)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
        finally:
            batch.close()
            ctx.close()
    finally:
        model.close()


def child_main() -> int:
    """The child's whole life: write the model, decode off the main thread, say ok."""
    # Several threads: the trap is in llama.cpp's worker threads, never in the caller's.
    threads = max(2, min(os.cpu_count() or 2, 8))
    errors: list[BaseException] = []

    def work(path: str) -> None:
        try:
            _decode_batch(path, threads)
        except BaseException as exc:
            errors.append(exc)

    with tempfile.TemporaryDirectory(prefix="pensieve-selftest-") as tmp:
        path = Path(tmp) / "selftest.gguf"
        path.write_bytes(tiny_model())
        # The daemon decodes in a thread of its own, not the main one: so does the check.
        thread = threading.Thread(target=work, args=(str(path),), name="selftest-decode")
        thread.start()
        thread.join()
    if errors:
        print(f"pensieve-selftest: {type(errors[0]).__name__}: {errors[0]}", file=sys.stderr)
        return 1
    print(_OK_LINE, flush=True)
    return 0


# ---- the parent ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How the child ended: `ok`, `signal` (killed by `signal_name`), `failed` or `timeout`."""

    outcome: str
    signal_name: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def crashed(self) -> bool:
        return self.outcome == "signal"

    def describe(self) -> str:
        if self.outcome == "ok":
            return "a batched decode ran"
        if self.outcome == "signal":
            return f"a batched decode killed the process with {self.signal_name}"
        if self.outcome == "timeout":
            return f"the check did not finish: {self.detail}"
        return f"the check could not run: {self.detail}"


def _package_root() -> Path:
    """The directory that holds the `pensieved` package, for the child's import path."""
    return Path(__file__).resolve().parents[2]


def run_check(
    python: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> Verdict:
    """Run the decode in a child of `python` (this interpreter by default) and judge its end."""
    child_env = dict(os.environ if env is None else env)
    root = str(_package_root())
    path = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    try:
        done = subprocess.run(
            [python or sys.executable, "-m", "pensieved.engine.selftest"],
            env=child_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Verdict("timeout", detail=f"no answer within {timeout:g} s")
    except OSError as exc:
        return Verdict("failed", detail=f"cannot start {python or sys.executable}: {exc}")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return Verdict("signal", signal_name=name)
    if done.returncode == 0 and _OK_LINE in done.stdout:
        return Verdict("ok")
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    return Verdict("failed", detail=f"exit status {done.returncode}: {tail}")


# ---- identities ---------------------------------------------------------------------------------


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags: what a native build was compiled for."""
    parts = [platform.system(), platform.machine()]
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            parts.append(f"{key.strip()}={value.strip()}")
        elif not line.strip() and len(parts) > 2:
            break  # the first processor is enough: they are all alike
    if len(parts) == 2 and platform.system() == "Darwin":
        for key in ("machdep.cpu.brand_string", "machdep.cpu.features"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    ["sysctl", "-n", key], capture_output=True, text=True, timeout=10
                ).stdout
                parts.append(f"{key}={out.strip()}")
    return "\n".join(parts)


def llama_library_dir() -> Path | None:
    """Where llama-cpp-python's shared libraries are, found without loading them."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    from pensieved.engine.llama import package_dir  # stdlib only at import time

    package = package_dir()
    return None if package is None else package / "lib"


def library_identity(lib_dir: Path) -> str:
    """Every shared library's name, size and mtime: changes whenever llama.cpp is rebuilt."""
    entries = []
    with contextlib.suppress(OSError):
        for path in sorted(lib_dir.iterdir()):
            if path.is_file() and any(s in path.name for s in (".so", ".dylib", ".dll")):
                stat = path.stat()
                entries.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(entries)


def verdict_key(lib_dir: Path) -> str:
    text = "\n".join(
        [f"check={CHECK_VERSION}", sys.version, cpu_identity(), library_identity(lib_dir)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- the daemon's gate --------------------------------------------------------------------------

_gate_lock = threading.Lock()
_gate_verdicts: dict[str, Verdict] = {}


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, verdict: Verdict) -> None:
    data = _read_cache(path)
    data[key] = {**dataclasses.asdict(verdict), "checked_at": time.time()}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def cached_verdict(cache_file: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """The verdict for the llama.cpp this process would load, checked at most once per build.

    Only `ok` and `signal` are remembered (in `cache_file` and in this process): a failure to
    run the check says nothing about the build and is tried again next time.
    """
    lib_dir = llama_library_dir()
    if lib_dir is None:
        return Verdict("failed", detail="llama_cpp is not installed")
    faked = bool(os.environ.get(FAKE_SIGNAL_ENV))
    key = verdict_key(lib_dir)
    with _gate_lock:
        if not faked:
            known = _gate_verdicts.get(key)
            if known is not None:
                return known
            entry = _read_cache(cache_file).get(key)
            if isinstance(entry, dict) and entry.get("outcome") in ("ok", "signal"):
                verdict = Verdict(entry["outcome"], entry.get("signal_name"))
                _gate_verdicts[key] = verdict
                return verdict
        verdict = run_check(timeout=timeout)
        if not faked and verdict.outcome in ("ok", "signal"):
            _gate_verdicts[key] = verdict
            _write_cache(cache_file, key, verdict)
        return verdict


def rebuild_advice() -> str:
    """What to do about a build that dies here, for each way pensieve is installed."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "X.Y.Z"
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = X86_PORTABLE_FLAGS
        cmake_args = f"-DCMAKE_C_FLAGS='{flags}' -DCMAKE_CXX_FLAGS='{flags}'"
    else:
        cmake_args = "-DGGML_NATIVE=OFF"
    return (
        "Rebuild it portably, then restart pensieved: in a source checkout `make clean install`; "
        "with Homebrew `brew reinstall pensieve`; with pip "
        f'`CMAKE_ARGS="{cmake_args}" pip install --force-reinstall --no-cache-dir '
        f"llama-cpp-python=={version}`."
    )


def ensure_runnable() -> None:
    """Raise LlamaBuildError when the installed llama.cpp dies on this CPU.

    Called before any model is loaded, so a build that cannot run here leaves the daemon up
    and degraded with the reason, instead of killing it on its first request.
    """
    import logging

    from pensieve.paths import cache_dir
    from pensieved.errors import LlamaBuildError

    verdict = cached_verdict(cache_dir() / "llama-selftest.json")
    if verdict.crashed:
        raise LlamaBuildError(
            f"the installed llama.cpp cannot run on this CPU: {verdict.describe()} "
            f"(library: {llama_library_dir()}). It was compiled for instructions this machine "
            f"traps (on Intel Xeons: AMX). {rebuild_advice()}"
        )
    if not verdict.ok:
        logging.getLogger("pensieved.engine").warning(
            "llama.cpp self-test inconclusive (%s); loading the model anyway", verdict.describe()
        )


if __name__ == "__main__":
    raise SystemExit(child_main())
