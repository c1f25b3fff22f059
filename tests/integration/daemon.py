"""Starting and stopping a real pensieved process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_socket_path(tmp: Path) -> str:
    # Unix socket paths are limited to ~104 bytes; pytest's tmp paths can be longer.
    import tempfile

    d = tempfile.mkdtemp(prefix="pv-", dir="/tmp")
    return str(Path(d) / "ctl.sock")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    log_path: Path
    socket_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.base_url, api_key="test-key", max_retries=0, **kwargs
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0, want_status: str = "ok") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pensieved exited early:\n{self.log_text()}")
            try:
                r = httpx.get(self.base_url + "/health", timeout=2)
                last = r.json()
                if last.get("status") == want_status:
                    return dict(last)
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"pensieved not ready ({last}):\n{self.log_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_daemon(
    tmp: Path,
    config: dict[str, Any] | None = None,
    *,
    wait: bool = True,
    want_status: str = "ok",
    extra_args: list[str] | None = None,
) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sock = short_socket_path(tmp)
    data: dict[str, Any] = {"server": {}, "model": {"context_size": 2048, "slots": 2}}
    for section, values in (config or {}).items():
        data.setdefault(section, {}).update(values)
    data["server"].setdefault("port", port)
    data["server"].setdefault("socket_path", sock)
    port = data["server"]["port"]
    config_path = tmp / "config.json"
    config_path.write_text(json.dumps(data, indent=2))
    log_path = tmp / "pensieved.log"
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pensieved", "--config", str(config_path), *(extra_args or [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    daemon = Daemon(proc, port, config_path, log_path, data["server"]["socket_path"], env)
    if wait:
        daemon.wait_ready(want_status=want_status)
    return daemon
