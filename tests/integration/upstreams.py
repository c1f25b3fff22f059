"""Real upstream servers for the upstream-route tests: llama-cpp-python's own OpenAI-compatible
server, on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

from pensieve.paths import bundled_model_path
from tests.integration.daemon import REPO, control_request, free_port


@dataclass
class LlamaServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_llama_server(tmp: Path, timeout: float = 120.0) -> LlamaServer:
    """`python -m llama_cpp.server` on the bundled model; `chatml-function-calling` is its
    chat format that answers `tools` with `tool_calls`."""
    model = bundled_model_path()
    assert model is not None, "the bundled model is not installed (make install)"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp / "llama-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                "1",
                "--chat_format",
                "chatml-function-calling",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    server = LlamaServer(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited early:\n{server.log_text()}")
        try:
            if httpx.get(server.base_url + "/v1/models", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"llama_cpp.server did not come up:\n{server.log_text()}")


def unused_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


def control_reload(socket_path: str, timeout: float = 30.0) -> dict[str, Any]:
    """POST /v1/reload on a daemon's control socket: the config file is re-read now."""
    return control_request(socket_path, "POST", "/v1/reload", body=b"{}", timeout=timeout)
