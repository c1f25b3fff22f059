"""Starting and stopping a real pensieved process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx

REPO = Path(__file__).resolve().parents[2]
# Signals no test sends on purpose: a daemon that dies of one crashed in native code.
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE}
)
LOG_TAIL_LINES = 40
# Every daemon a test started, so a waiting helper can notice one that crashed.
STARTED: list[DaemonProcess] = []


class DaemonCrashed(AssertionError):
    """A pensieved started by the tests died of a fatal signal."""


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
class DaemonProcess:
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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def crash(self) -> str | None:
        """What killed the process, if it died of a fatal signal; else None."""
        code = self.proc.poll()
        if code is None or code >= 0 or -code not in CRASH_SIGNALS:
            return None
        name = signal.Signals(-code).name
        return f"pensieved (pid {self.proc.pid}) died of {name}; its log ends:\n{self.log_tail()}"

    def check_alive(self) -> None:
        """Fail at once, with the log's tail, if the daemon crashed."""
        if (reason := self.crash()) is not None:
            raise DaemonCrashed(reason)

    def wait_ready(self, timeout: float = 90.0, want_status: str = "ok") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.check_alive()
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


# llama.cpp's CPU kernels give a step of one position other logits than a step of several once
# the context passes a few hundred tokens, but only with more than one thread (measured: up to
# 1.2 apart at 500 tokens with 2 threads; the same bit for bit with 1). Drafts, batching and
# cache hits change a request's step shapes, so with more threads a repeated greedy request can
# flip a near tie. One thread makes repeated greedy requests the same token for token.
EXACT: dict[str, Any] = {"model": {"threads": 1}}


def start_daemon(
    tmp: Path,
    config: dict[str, Any] | None = None,
    *,
    wait: bool = True,
    want_status: str = "ok",
    extra_args: list[str] | None = None,
) -> DaemonProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sock = short_socket_path(tmp)
    data: dict[str, Any] = {
        "server": {},
        # Saved KV caches stay with the test, never in the user's cache directory.
        "model": {"context_size": 2048, "slots": 2, "prefix_cache_dir": str(tmp / "kv")},
    }
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
    daemon = DaemonProcess(proc, port, config_path, log_path, data["server"]["socket_path"], env)
    STARTED.append(daemon)
    if wait:
        daemon.wait_ready(want_status=want_status)
    return daemon


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_http(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    host: str | None = "127.0.0.1",
    timeout: float = 60.0,
) -> RawResponse:
    """One HTTP request with exactly the headers given (Host included, or none at all).

    The SDK and httpx normalise what they send; attacks need the offending bytes verbatim.
    """
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if body is not None and not any(k.lower() == "content-length" for k, _ in items):
            items.append(("Content-Length", str(len(body))))
        for name, value in items:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


# ---- pensievectl and control-socket helpers (issue 3) ---------------------------------------


def run_ctl(
    *args: str,
    config: Path | None = None,
    socket_path: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run the real `pensievectl` in a subprocess (as a user would)."""
    argv = [sys.executable, "-m", "pensievectl"]
    if config is not None:
        argv += ["--config", str(config)]
    if socket_path is not None:
        argv += ["--socket", socket_path]
    run_env = dict(env or os.environ)
    run_env.pop("PENSIEVE_CONFIG", None)
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=run_env,
        check=False,
    )


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Replace a config file the way editors do: write a temporary file, rename it over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def ctl_status(config: Path) -> dict[str, Any]:
    result = run_ctl("status", "--json", config=config, timeout=30)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def check_daemons_alive() -> None:
    """Raise DaemonCrashed for the first daemon started by the tests that died of a signal."""
    for daemon in STARTED:
        daemon.check_alive()


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until `predicate()` is true; raises AssertionError after `timeout`, and at once
    if a daemon crashed meanwhile (nothing it was to do will happen)."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        check_daemons_alive()
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def control_status(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /v1/status on the control socket directly (fast: no subprocess)."""
    return control_request(socket_path, "GET", "/v1/status", timeout=timeout)


def control_request(
    socket_path: str, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """One request to a daemon's control socket, its JSON reply parsed."""
    import http.client

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(socket_path)
            self.sock = s

    conn = _Conn("localhost", timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        data: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return data


def prompt_tokens(usage: Any) -> int:
    """The whole prompt's size from a usage object or dict: Anthropic's `input_tokens` leaves
    out the tokens read from the cache."""
    if isinstance(usage, dict):
        return int(usage["input_tokens"]) + int(usage.get("cache_read_input_tokens") or 0)
    return int(usage.input_tokens) + int(usage.cache_read_input_tokens or 0)


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream, from its lines (a response's iter_lines or text)."""
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))
