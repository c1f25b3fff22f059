"""Attacks on the HTTP API with raw requests carrying the offending headers, against real daemons.

Two daemons: the shared default one (no key, CORS off: what a developer runs) and one with an
API key file, CORS for chosen origins, an extra allowed host and debug logging (to prove that
neither keys nor prompts reach the log).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import psutil
import pytest

from tests.integration.daemon import (
    REPO,
    DaemonProcess,
    RawResponse,
    free_port,
    raw_http,
    short_socket_path,
    start_daemon,
    wait_for,
)

BODY = json.dumps(
    {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]}
).encode()
JSON = {"Content-Type": "application/json"}
KEY = "pv-test-key-3f9c2a7e51b84d06"
ROTATED_KEY = "pv-rotated-key-8d1e4b2c9a"
PROMPT_CANARY = "zebra-canary-7731-prompt"


def assert_error(r: RawResponse, status: int, error_type: str) -> str:
    assert r.status == status, (r.status, r.body[:300])
    data = r.json()
    assert data["type"] == "error"
    assert data["error"]["type"] == error_type
    assert r.headers.get("request-id", "").startswith("req_")
    return str(data["error"]["message"])


# ---- the default daemon: loopback only, no CORS --------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "attacker.com:80",
        "127.0.0.1.nip.io:{port}",
        "localhost.evil.com",
        "localhostx:{port}",
        "[::2]:{port}",
        "10.0.0.1:{port}",
        "",
    ],
)
def test_foreign_host_header_is_refused(daemon: DaemonProcess, host: str) -> None:
    host = host.format(port=daemon.port)
    r = raw_http(daemon.port, "POST", "/v1/messages", JSON, BODY, host=host)
    message = assert_error(r, 403, "permission_error")
    assert "server.allowed_hosts" in message
    assert "DNS rebinding" in message


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "localhost.", "[::1]:{port}"]
)
def test_loopback_host_headers_are_accepted(daemon: DaemonProcess, host: str) -> None:
    r = raw_http(daemon.port, "GET", "/v1/models", host=host.format(port=daemon.port))
    assert r.status == 200, r.body


def test_dns_rebinding_is_refused_on_every_path(daemon: DaemonProcess) -> None:
    host = f"rebind.attacker.example:{daemon.port}"
    for method, path in [
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/health"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/x"),
        ("POST", "/v1/messages/count_tokens"),
        ("OPTIONS", "/v1/messages"),
        ("GET", "/no/such/path"),
    ]:
        body = BODY if method == "POST" else None
        r = raw_http(daemon.port, method, path, JSON, body, host=host)
        assert r.status == 403, (method, path, r.status)
        if method != "HEAD":
            assert r.json()["error"]["type"] == "permission_error"


def test_http11_request_without_host_header_is_refused(daemon: DaemonProcess) -> None:
    # HTTP/1.1 requires Host (Tornado answers 400); only HTTP/1.0 tools may omit it.
    r = raw_http(daemon.port, "GET", "/v1/models", host=None)
    assert r.status == 400


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://localhost:3000", "null", "file://"]
)
def test_cross_origin_request_is_refused_when_cors_is_off(
    daemon: DaemonProcess, origin: str
) -> None:
    # A "simple" request (text/plain, no preflight): the browser would send it and only hide the
    # reply, so the server itself must refuse to do the work.
    headers = {"Content-Type": "text/plain", "Origin": origin}
    r = raw_http(daemon.port, "POST", "/v1/messages", headers, BODY)
    message = assert_error(r, 403, "permission_error")
    assert "server.enable_cors" in message
    assert "access-control-allow-origin" not in r.headers


def test_preflight_is_refused_when_cors_is_off(daemon: DaemonProcess) -> None:
    r = raw_http(
        daemon.port,
        "OPTIONS",
        "/v1/messages",
        {
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert_error(r, 403, "permission_error")
    assert not any(k.startswith("access-control-") for k in r.headers)


def test_no_cors_headers_without_origin(daemon: DaemonProcess) -> None:
    r = raw_http(daemon.port, "POST", "/v1/messages", JSON, BODY)
    assert r.status == 200
    assert not any(k.startswith("access-control-") for k in r.headers)


def test_options_without_origin_lists_methods(daemon: DaemonProcess) -> None:
    r = raw_http(daemon.port, "OPTIONS", "/v1/messages")
    assert r.status == 204
    assert "POST" in r.headers["allow"]
    assert "access-control-allow-origin" not in r.headers


def test_oversized_headers_get_413(daemon: DaemonProcess) -> None:
    headers = {"X-Padding": "a" * 40_000, **JSON}
    r = raw_http(daemon.port, "POST", "/v1/messages", headers, BODY)
    message = assert_error(r, 413, "request_too_large")
    assert "headers" in message


def test_headers_beyond_the_hard_cap_are_cut_off(daemon: DaemonProcess) -> None:
    # Past Tornado's own header limit no handler runs: the connection is simply dropped.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 200_000)
        with pytest.raises(OSError):
            while True:
                if not s.recv(65536):
                    raise ConnectionResetError("closed")
    assert daemon.wait_ready(timeout=10)["status"] == "ok"


def test_declared_oversized_body_gets_413_before_it_is_sent(daemon: DaemonProcess) -> None:
    # Nothing but headers: the answer must not wait for a gigabyte that never comes.
    r = raw_http(
        daemon.port,
        "POST",
        "/v1/messages",
        {**JSON, "Content-Length": str(1024**3)},
        timeout=10,
    )
    message = assert_error(r, 413, "request_too_large")
    assert "server.max_body_bytes" in message


def test_non_loopback_bind_without_key_is_refused_by_flag(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "pensieved", "--config", str(config), "--host", "0.0.0.0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "server.host" in proc.stderr
    assert "server.api_key" in proc.stderr


def test_non_loopback_bind_without_key_in_the_file_never_listens_beyond_loopback(
    tmp_path: Path,
) -> None:
    # A bad file degrades the daemon (it serves 503s that say why) instead of exiting, but it
    # must not bind the address the file asks for.
    port = free_port()
    d = start_daemon(
        tmp_path,
        {"server": {"host": "0.0.0.0", "port": port}},
        wait=False,
        extra_args=["--port", str(port), "--socket", short_socket_path(tmp_path)],
    )
    try:
        health: dict[str, object] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not health:
            try:
                health = raw_http(port, "GET", "/health", timeout=5).json()
            except OSError:
                time.sleep(0.2)
        assert "server.api_key" in str(health.get("error")), health
        listening = {
            c.laddr.ip
            for c in psutil.Process(d.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening and all(ip in ("127.0.0.1", "::1") for ip in listening), listening
    finally:
        d.stop()


# ---- a daemon with an API key, CORS for chosen origins, an extra host ------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = Path(tmp_path_factory.mktemp("guarded"))
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    d = start_daemon(
        tmp,
        {
            "server": {
                "api_key_file": str(key_file),
                "enable_cors": True,
                "cors_origins": ["http://localhost:*", "https://app.example.com"],
                "allowed_hosts": ["pensieve.lan"],
                "max_body_bytes": 64 * 1024,
                "idle_connection_timeout_s": 3.0,
            },
            "logging": {"level": "debug"},
        },
    )
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


def _key_file(d: DaemonProcess) -> Path:
    return d.config_path.parent / "api-key"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"x-api-key": ""},
        {"x-api-key": KEY + "x"},
        {"x-api-key": KEY[:-1]},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"X-Api-Key": "wrong", "Authorization": "Bearer also-wrong"},
    ],
)
def test_missing_or_wrong_key_gets_401(guarded: DaemonProcess, headers: dict[str, str]) -> None:
    r = raw_http(guarded.port, "POST", "/v1/messages", {**JSON, **headers}, BODY)
    message = assert_error(r, 401, "authentication_error")
    assert KEY not in message


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer  {KEY} "},
        {"x-api-key": "stale", "Authorization": f"Bearer {KEY}"},
    ],
)
def test_right_key_is_accepted(guarded: DaemonProcess, headers: dict[str, str]) -> None:
    r = raw_http(guarded.port, "POST", "/v1/messages", {**JSON, **headers}, BODY)
    assert r.status == 200, r.body
    assert r.json()["type"] == "message"


def test_every_api_path_needs_the_key_but_probes_do_not(guarded: DaemonProcess) -> None:
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/claude"),
        ("POST", "/v1/messages/count_tokens"),
        ("GET", "/v1/nope"),
    ]:
        r = raw_http(guarded.port, method, path, JSON, BODY if method == "POST" else None)
        assert_error(r, 401, "authentication_error")
    health = raw_http(guarded.port, "GET", "/health")
    assert health.status == 200
    assert health.json()["model_path"] is None, "no file paths for callers without the key"
    assert raw_http(guarded.port, "GET", "/").status == 200
    assert raw_http(guarded.port, "HEAD", "/").status == 200


def test_sdk_with_wrong_key_gets_authentication_error(guarded: DaemonProcess) -> None:
    wrong = anthropic.Anthropic(base_url=guarded.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    right = anthropic.Anthropic(base_url=guarded.base_url, api_key=KEY, max_retries=0)
    assert right.models.list().data
    bearer = anthropic.Anthropic(base_url=guarded.base_url, auth_token=KEY, max_retries=0)
    reply = bearer.messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.usage.output_tokens >= 1


def test_preflight_for_an_allowed_origin(guarded: DaemonProcess) -> None:
    # No key: browsers never send credentials or custom headers on a preflight.
    r = raw_http(
        guarded.port,
        "OPTIONS",
        "/v1/messages",
        {
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key, anthropic-version",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert r.status == 204, r.body
    assert r.body == b""
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-api-key", "anthropic-version"} <= allowed
    assert r.headers["access-control-allow-private-network"] == "true"
    assert "Origin" in r.headers["vary"]
    assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://localhost:5173",  # scheme is part of the origin
        "http://localhost.evil.example:5173",
        "http://127.0.0.1:5173",  # not in this daemon's list
        "https://sub.app.example.com",
        "https://app.example.com.evil.example",
        "null",
    ],
)
def test_preflight_for_a_foreign_origin_is_refused(guarded: DaemonProcess, origin: str) -> None:
    r = raw_http(
        guarded.port,
        "OPTIONS",
        "/v1/messages",
        {"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    message = assert_error(r, 403, "permission_error")
    assert "server.cors_origins" in message
    assert not any(k.startswith("access-control-") for k in r.headers)


def test_cors_request_from_an_allowed_origin(guarded: DaemonProcess) -> None:
    for origin in ("http://localhost:5173", "http://localhost", "https://app.example.com"):
        r = raw_http(
            guarded.port,
            "POST",
            "/v1/messages",
            {**JSON, "Origin": origin, "x-api-key": KEY},
            BODY,
        )
        assert r.status == 200, (origin, r.body)
        assert r.headers["access-control-allow-origin"] == origin
        assert "request-id" in r.headers["access-control-expose-headers"]
        assert "access-control-allow-credentials" not in r.headers
    # An allowed page that forgot its key can read why it failed.
    r = raw_http(
        guarded.port, "POST", "/v1/messages", {**JSON, "Origin": "http://localhost:3000"}, BODY
    )
    assert_error(r, 401, "authentication_error")
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_foreign_origin_with_the_right_key_is_still_refused(guarded: DaemonProcess) -> None:
    headers = {**JSON, "Origin": "http://evil.example", "x-api-key": KEY}
    r = raw_http(guarded.port, "POST", "/v1/messages", headers, BODY)
    assert_error(r, 403, "permission_error")


def test_allowed_hosts_extend_the_loopback_names(guarded: DaemonProcess) -> None:
    headers = {"x-api-key": KEY}
    ok = raw_http(guarded.port, "GET", "/v1/models", headers, host=f"pensieve.lan:{guarded.port}")
    assert ok.status == 200
    bad = raw_http(guarded.port, "GET", "/v1/models", headers, host="other.lan")
    assert_error(bad, 403, "permission_error")


def test_body_over_the_limit_is_drained_and_refused(guarded: DaemonProcess) -> None:
    big = json.dumps(
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "x" * 100_000}],
        }
    ).encode()
    r = raw_http(guarded.port, "POST", "/v1/messages", {**JSON, "x-api-key": KEY}, big)
    message = assert_error(r, 413, "request_too_large")
    assert str(64 * 1024) in message
    # The same with chunked encoding (no Content-Length to refuse up front).
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as s:
        head = (
            "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"x-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(big[i : i + 8192]), big[i : i + 8192])
            for i in range(0, len(big), 8192)
        )
        s.sendall(head + chunks + b"0\r\n\r\n")
        reply = b""
        while data := s.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply


def test_rotated_key_file_applies_at_once(guarded: DaemonProcess) -> None:
    path = _key_file(guarded)
    try:
        path.write_text(ROTATED_KEY + "\n")
        old = raw_http(guarded.port, "GET", "/v1/models", {"x-api-key": KEY})
        assert_error(old, 401, "authentication_error")
        new = raw_http(guarded.port, "GET", "/v1/models", {"x-api-key": ROTATED_KEY})
        assert new.status == 200
        path.unlink()
        # An unreadable key file fails closed.
        gone = raw_http(guarded.port, "GET", "/v1/models", {"x-api-key": ROTATED_KEY})
        message = assert_error(gone, 401, "authentication_error")
        assert "server.api_key_file" in message
    finally:
        path.write_text(KEY + "\n")
    assert raw_http(guarded.port, "GET", "/v1/models", {"x-api-key": KEY}).status == 200


def test_slow_loris_connection_is_closed(guarded: DaemonProcess) -> None:
    # idle_connection_timeout_s is 3 here: a client dribbling its headers is cut off.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=20) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        for _ in range(30):
            try:
                s.sendall(b"X-Slow: 1\r\n")
                s.settimeout(0.5)
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed, "a slow client kept its connection open"
    assert time.monotonic() - started < 10


def test_logs_hold_neither_keys_nor_prompts(guarded: DaemonProcess) -> None:
    # The daemon logs at debug level here; log_prompts is off.
    body = json.dumps(
        {
            "model": "m",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": f"Repeat: {PROMPT_CANARY}"}],
        }
    ).encode()
    for headers in ({"x-api-key": KEY}, {"x-api-key": "wrong-key-canary-5521"}):
        raw_http(guarded.port, "POST", "/v1/messages", {**JSON, **headers}, body)
        raw_http(guarded.port, "POST", "/v1/messages/count_tokens", {**JSON, **headers}, body)
    # A prompt that fails validation must not be echoed into the log either. It goes last,
    # with a query string of its own (ignored by the API), so that its access line says
    # everything these requests made the daemon log has been written.
    bad = json.dumps({"model": "m", "max_tokens": "x", "messages": [PROMPT_CANARY]}).encode()
    last = f"/v1/messages?log-probe={uuid.uuid4().hex}"
    r = raw_http(guarded.port, "POST", last, {**JSON, "x-api-key": KEY}, bad)
    assert r.status == 400, r.body[:300]
    wait_for(lambda: f"400 POST {last}" in guarded.log_text(), timeout=30)
    text = guarded.log_text()
    for secret in (KEY, ROTATED_KEY, "wrong-key-canary-5521", PROMPT_CANARY):
        assert secret not in text, f"{secret!r} leaked into the log"


def test_log_prompts_is_the_only_way_prompts_reach_the_log(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, {"logging": {"log_prompts": True}})
    try:
        body = json.dumps(
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": PROMPT_CANARY}],
            }
        ).encode()
        assert raw_http(d.port, "POST", "/v1/messages", JSON, body).status == 200
        wait_for(lambda: PROMPT_CANARY in d.log_text(), timeout=30)
    finally:
        assert d.stop() == 0
