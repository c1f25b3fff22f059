"""The things the benchmark measures: pensieved and llama-server over HTTP, llama-cpp-python
in-process, and a streaming Messages client that timestamps every event.

The client is stdlib `http.client`, not an SDK: the SDKs' own per-event cost would blur the
comparison, and both servers speak the same `/v1/messages` SSE.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pensieve.paths import cache_dir

# The benchmark starts servers the way the integration tests do.
from tests.integration.daemon import free_port

# Where a llama-server built for the comparison is looked for, besides --llama-server and PATH.
BUILD_DIR_VARIABLE = "PENSIEVE_LLAMA_SERVER_BUILD"


def llama_server_build_dir() -> Path:
    """$PENSIEVE_LLAMA_SERVER_BUILD, else llama-server-build in the per-user cache directory."""
    named = os.environ.get(BUILD_DIR_VARIABLE)
    return Path(named).expanduser() if named else cache_dir() / "llama-server-build"


@dataclass
class StreamResult:
    """One streamed request: when each text delta arrived, relative to sending it."""

    ttft_s: float  # first text delta, or the end of the message when it had no text
    delta_times: list[float]
    output_tokens: int
    input_tokens: int
    cache_read_tokens: int
    total_s: float
    text: str = ""


def stream_events(
    port: int, body: dict[str, Any], timeout: float = 900, *, path: str = "/v1/messages"
) -> Iterator[tuple[float, dict[str, Any]]]:
    """POST a streamed request (Messages, or Chat Completions at its path); yield each SSE
    event with its arrival time in seconds since sending, up to message_stop or [DONE]. An
    HTTP or stream error raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.request(
            "POST",
            path,
            body=json.dumps({**body, "stream": True}).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
        )
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        for raw in response:
            if not raw.startswith(b"data:"):
                continue
            if raw[5:].strip() == b"[DONE]":
                return
            event = json.loads(raw[5:])
            if event.get("type") == "error" or "error" in event:
                raise RuntimeError(f"stream error: {event}")
            yield time.perf_counter() - started, event
            if event.get("type") == "message_stop":
                return
    finally:
        conn.close()


def stream_chat(
    port: int, body: dict[str, Any], timeout: float = 900, *, echo: str = ""
) -> StreamResult:
    """A streamed /v1/chat/completions request with every text delta timestamped: the one
    endpoint where llama-server, like pensieved, continues a final assistant message.
    llama-server sends that message's text back first; `echo`, when the reply starts with
    it, is left out of the text and the timings."""
    deltas: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] = {}
    last = 0.0
    pending = echo  # what of the echo has not come yet
    request = {**body, "stream_options": {"include_usage": True}}
    for at, event in stream_events(port, request, timeout, path="/v1/chat/completions"):
        last = at
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if pending and text and not parts:
                shared = next(
                    (i for i, (a, b) in enumerate(zip(pending, text, strict=False)) if a != b),
                    min(len(pending), len(text)),
                )
                pending, text = pending[shared:], text[shared:]
                if shared == 0:
                    pending = ""  # no echo: the reply itself
            if text:
                deltas.append(at)
                parts.append(text)
        usage.update(event.get("usage") or {})
    return StreamResult(
        ttft_s=deltas[0] if deltas else last,
        delta_times=deltas,
        output_tokens=int(usage.get("completion_tokens") or len(deltas)),
        input_tokens=int(usage.get("prompt_tokens") or 0),
        cache_read_tokens=0,
        total_s=last,
        text="".join(parts),
    )


def stream_message(port: int, body: dict[str, Any], timeout: float = 900) -> StreamResult:
    """A streamed /v1/messages request with every text delta timestamped."""
    deltas: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] = {}
    end: float | None = None
    last = 0.0
    for at, event in stream_events(port, body, timeout):
        last = at
        kind = event.get("type")
        if kind == "content_block_delta":
            text = event.get("delta", {}).get("text", "")
            if text:
                deltas.append(at)
                parts.append(text)
        elif kind == "message_start":
            usage.update(event.get("message", {}).get("usage") or {})
        elif kind == "message_delta":
            usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            end = at
    total = end if end is not None else last  # a stream cut short: its last event
    return StreamResult(
        ttft_s=deltas[0] if deltas else total,
        delta_times=deltas,
        output_tokens=int(usage.get("output_tokens") or len(deltas)),
        input_tokens=int(usage.get("input_tokens") or 0),
        cache_read_tokens=int(usage.get("cache_read_input_tokens") or 0),
        total_s=total,
        text="".join(parts),
    )


@dataclass
class ServerProcess:
    """A server under test, started by the benchmark and always stopped by it."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready_s: float = 0.0
    peak_rss: int = 0
    workdir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def sample_rss(self) -> int:
        value = self.rss()
        self.peak_rss = max(self.peak_rss, value)
        return value

    def wait_ready(self, started: float, timeout: float = 300) -> None:
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    self.ready_s = time.monotonic() - started
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True)
class Settings:
    """What every target runs with, so that they do the same work."""

    threads: int
    slots: int
    context_size: int  # per slot
    batch_size: int
    flash_attention: str  # auto, on, off
    kv_cache_type: str = "f16"  # f16, q8_0, q4_0 on every side
    kv_unified: bool | str = "auto"  # pensieved's model.kv_unified
    llama_unified: bool = False  # llama-server with --kv-unified (one pool of cells)
    # More of pensieved's `model` keys (swa_full, chat_template), and more llama-server flags.
    pensieved_model: tuple[tuple[str, Any], ...] = ()
    llama_args: tuple[str, ...] = ()
    speculative: str = "auto"  # pensieved's model.speculative


def start_pensieved(model: Path, settings: Settings) -> ServerProcess:
    workdir = Path(tempfile.mkdtemp(prefix="pensieve-bench-"))
    port = free_port()
    config = {
        "server": {
            "port": port,
            "socket_path": str(workdir / "ctl.sock"),
            "max_concurrent_requests": 64,
            "request_timeout_ms": 3_600_000,
        },
        "logging": {"level": "warning"},
        "model": {
            "model_path": str(model),
            "threads": settings.threads,
            "slots": settings.slots,
            "context_size": settings.context_size,
            "batch_size": settings.batch_size,
            "flash_attention": settings.flash_attention,
            "kv_cache_type": settings.kv_cache_type,
            "kv_unified": settings.kv_unified,
            "speculative": settings.speculative,
            "max_output_tokens": settings.context_size,
            # Cold means cold: no KV caches saved by an earlier run.
            "prefix_cache_mb": 0,
            **dict(settings.pensieved_model),
        },
    }
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / "pensieved.log"
    env = {k: v for k, v in os.environ.items() if k != "PENSIEVE_CONFIG"}
    args = [sys.executable, "-m", "pensieved", "--config", str(config_path)]
    return _launch("pensieved", args, port, log_path, workdir, env)


def find_llama_server(explicit: str | None) -> tuple[Path | None, str]:
    """The llama-server binary to compare against, or None and why not."""
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"given: {path}"
        return None, f"--llama-server {explicit} is not an executable file"
    build_dir = llama_server_build_dir()
    built = build_dir / "bin" / "llama-server"
    if built.is_file():
        return built, f"built in {build_dir}: {built}"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), f"found on PATH: {on_path} (may not match llama-cpp-python's build)"
    return None, (
        "llama-server not found: build it from the llama.cpp sources in llama-cpp-python's "
        "sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==<version>`, "
        f"unpack it, then `cmake -S <sdist>/vendor/llama.cpp -B {build_dir} -DLLAMA_CURL=OFF "
        f"&& cmake --build {build_dir} --target llama-server`; ${BUILD_DIR_VARIABLE} names "
        "another build directory), or pass --llama-server PATH"
    )


def start_llama_server(
    binary: Path, model: Path, settings: Settings, extra: Sequence[str] = ()
) -> ServerProcess:
    workdir = Path(tempfile.mkdtemp(prefix="llama-server-bench-"))
    port = free_port()
    log_path = workdir / "llama-server.log"
    args = [*llama_server_args(binary, model, port, settings), *extra]
    return _launch("llama-server", args, port, log_path, workdir, same_kernels_env())


def llama_cpp_python_lib_dir() -> Path | None:
    """Where llama-cpp-python's own libllama and libggml are."""
    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib"
        if lib.is_dir():
            return lib
    return None


def same_kernels_env() -> dict[str, str]:
    """The environment for llama-server: llama-cpp-python's libllama and libggml first on the
    library path, so that both sides run the same llama.cpp build and kernels (a llama-server
    built on its own picks its build's libraries, compiled for another CPU target)."""
    env = dict(os.environ)
    lib = llama_cpp_python_lib_dir()
    if lib is not None:
        for name in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
            env[name] = os.pathsep.join(p for p in (str(lib), env.get(name, "")) if p)
    return env


def llama_server_args(binary: Path, model: Path, port: int, settings: Settings) -> list[str]:
    """llama-server doing the same work as pensieved with `settings`."""
    return [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(settings.threads),
        "--threads-batch",
        str(settings.threads),
        "--parallel",
        str(settings.slots),
        # Not unified: every slot gets the same context pensieved gives each of its slots.
        # Unified: one pool of that total size, any slot may use all of it.
        "--kv-unified" if settings.llama_unified else "--no-kv-unified",
        "--ctx-size",
        str(settings.context_size * settings.slots),
        "--cache-type-k",
        settings.kv_cache_type,
        "--cache-type-v",
        settings.kv_cache_type,
        "--batch-size",
        str(settings.batch_size),
        "--ubatch-size",
        str(settings.batch_size),
        "--flash-attn",
        settings.flash_attention,  # the same on every side, so the attention kernels match
        "--jinja",
        "--no-webui",
        *settings.llama_args,
    ]


def _launch(
    name: str,
    args: list[str],
    port: int,
    log_path: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start a server and wait until it answers; never leaves a half-started one behind."""
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(name, proc, port, log_path, workdir=workdir)
    try:
        server.wait_ready(started)
    except BaseException:
        server.stop()
        raise
    return server


class InProcess:
    """llama-cpp-python called directly: the floor any Python server on it can reach."""

    def __init__(
        self, model: Path, *, threads: int, context_size: int, batch_size: int, flash_attention: str
    ) -> None:
        import llama_cpp

        started = time.monotonic()
        # Any: llama-cpp-python's annotations are partial; this is a thin timing harness.
        self.llm: Any = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=context_size,
            n_batch=batch_size,
            n_ubatch=batch_size,
            n_threads=threads,
            n_threads_batch=threads,
            # `Llama` takes on/off only; auto resolves to on for CPU and Metal.
            flash_attn=flash_attention != "off",
            verbose=False,
        )
        self.load_s = time.monotonic() - started

    def chat_stream(self, messages: list[dict[str, str]], max_tokens: int) -> StreamResult:
        """The high-level `create_chat_completion(stream=True)` most scripts would use."""
        self.llm.reset()
        started = time.perf_counter()
        deltas: list[float] = []
        parts: list[str] = []
        for chunk in self.llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True
        ):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                deltas.append(time.perf_counter() - started)
                parts.append(text)
        total = time.perf_counter() - started
        return StreamResult(
            ttft_s=deltas[0] if deltas else total,
            delta_times=deltas,
            output_tokens=len(deltas),
            input_tokens=0,
            cache_read_tokens=0,
            total_s=total,
            text="".join(parts),
        )

    def raw_decode(self, prompt: str, tokens: int) -> float:
        """Seconds per token of a bare eval/sample loop, no text handling at all."""
        llm = self.llm
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True))
        token = llm.sample(temp=0.0)
        started = time.perf_counter()
        for _ in range(tokens):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return (time.perf_counter() - started) / tokens

    def eval_suffix_s(self, cached: int, new: int, repeats: int = 3) -> float:
        """Time to evaluate `new` tokens after `cached` ones and sample: a warm turn's floor.

        Token identities do not change the cost, so any tokens of the right count will do.
        """
        llm = self.llm
        llm.reset()
        filler = llm.tokenize(b"The quick brown fox jumps over the lazy dog. ", add_bos=False)
        prefix = (filler * (cached // len(filler) + 1))[:cached]
        suffix = (filler * (new // len(filler) + 1))[:new]
        llm.eval(prefix)
        times = []
        for _ in range(repeats):
            llm.n_tokens = cached
            started = time.perf_counter()
            llm.eval(suffix)
            llm.sample(temp=0.0)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def close(self) -> None:
        self.llm.close()
