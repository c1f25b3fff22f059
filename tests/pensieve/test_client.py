"""The control client's refusals and error messages, against real sockets in tmp."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import UnixStreamServer

import pytest

from pensieve.client import (
    ControlClient,
    DaemonError,
    ForeignSocketError,
    NotASocketError,
    NotRunningError,
    StaleSocketError,
)
from pensieve.exitcodes import CtlExit
from pensievectl.errors import exit_status_for


@pytest.fixture
def sock_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pvc-", dir="/tmp"))
    yield directory / "ctl.sock"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def test_no_socket_is_not_running(sock_path: Path) -> None:
    with pytest.raises(NotRunningError) as info:
        ControlClient(sock_path).status()
    assert str(sock_path) in str(info.value) and "pensievectl start" in str(info.value)
    assert exit_status_for(info.value) == CtlExit.NOT_RUNNING == 3


def test_dead_socket_is_stale(sock_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()  # the file stays, nobody listens: what a killed daemon leaves
    with pytest.raises(StaleSocketError) as info:
        ControlClient(sock_path).status()
    assert f"stale socket at {sock_path}" in str(info.value)
    assert exit_status_for(info.value) == CtlExit.NOT_RUNNING


def test_regular_file_is_not_a_socket(sock_path: Path) -> None:
    sock_path.write_text("x")
    with pytest.raises(NotASocketError) as info:
        ControlClient(sock_path).status()
    assert exit_status_for(info.value) == CtlExit.UNKNOWN


def test_socket_of_another_user_is_refused(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.listen(1)
    try:
        real_uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)
        with pytest.raises(ForeignSocketError) as info:
            ControlClient(sock_path).stop()
        assert "refusing" in str(info.value) and str(sock_path) in str(info.value)
        assert exit_status_for(info.value) == CtlExit.UNKNOWN == 4
    finally:
        s.close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body, status = (
            (b'{"pid": 1, "state": "ready"}', 200)
            if self.path == "/v1/status"
            else (json.dumps({"error": "no control operation there"}).encode(), 404)
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(UnixStreamServer):
    def get_request(self):  # type: ignore[no-untyped-def]
        request, _ = super().get_request()
        return request, ("local", 0)


def test_talks_http_over_the_socket_and_reports_daemon_errors(sock_path: Path) -> None:
    server = _Server(str(sock_path), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ControlClient(sock_path)
        assert client.request("GET", "/v1/status") == {"pid": 1, "state": "ready"}
        # A reply that is not a StatusResponse (another version's daemon) is a clear error.
        with pytest.raises(DaemonError) as info:
            client.status()
        assert "cannot read" in str(info.value) and str(sock_path) in str(info.value)
        assert exit_status_for(info.value) == CtlExit.FAILURE
        with pytest.raises(DaemonError) as info:
            client.request("GET", "/v1/nope")
        assert "no control operation there" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
