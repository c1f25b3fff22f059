"""A tiny HTTP-over-Unix-socket client for pensieved's control API (stdlib only).

Before connecting it checks that the socket belongs to the current user: a socket planted by
someone else at our path must never receive our commands or be trusted for its answers.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from pensievectl.errors import (
    DaemonError,
    ForeignSocketError,
    NoAnswerError,
    NotASocketError,
    NotRunningError,
    SocketPermissionError,
    StaleSocketError,
)


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def check_socket(self) -> None:
        """Raise the right error unless `path` is a socket owned by this user."""
        path = self.path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise NotRunningError(
                f"pensieved is not running (no socket at {path}): run `pensievectl start`"
            ) from None
        except PermissionError:
            raise SocketPermissionError(
                f"permission denied on {path}: its directory is not yours; use your own "
                "socket (--socket PATH or server.socket_path)"
            ) from None
        if not stat.S_ISSOCK(info.st_mode):
            raise NotASocketError(
                f"{path} is not a socket: move it away, or point --socket (or "
                "server.socket_path) at pensieved's socket"
            )
        if info.st_uid != os.getuid():
            raise ForeignSocketError(
                f"refusing to use the socket at {path}: it belongs to {_owner_name(info.st_uid)}, "
                f"not to you ({_owner_name(os.getuid())}); another user's pensieved (or an "
                "impostor) is there: use your own socket (--socket PATH or server.socket_path)"
            )

    def request(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self.check_socket()
        conn = _UnixConnection(self.path, timeout or self.timeout)
        try:
            try:
                conn.connect()
            except ConnectionRefusedError:
                raise StaleSocketError(
                    f"stale socket at {self.path}: pensieved is not running (it was probably "
                    "killed); run `pensievectl start`, which removes the old socket"
                ) from None
            except FileNotFoundError:
                raise NotRunningError(
                    f"pensieved is not running (no socket at {self.path}): run `pensievectl start`"
                ) from None
            except PermissionError:
                raise SocketPermissionError(
                    f"permission denied on {self.path}: only the user who started pensieved "
                    "can control it"
                ) from None
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    raise NoAnswerError(
                        f"pensieved at {self.path} is too busy to accept a connection; retry"
                    ) from None
                raise
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except TimeoutError:
                raise NoAnswerError(
                    f"pensieved at {self.path} accepted the connection but did not answer "
                    f"within {timeout or self.timeout:g} s; see its log"
                ) from None
            except (ConnectionError, http.client.HTTPException) as exc:
                raise NoAnswerError(
                    f"pensieved at {self.path} closed the connection ({exc}); it may be stopping"
                ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw)
        except ValueError:
            raise DaemonError(f"pensieved at {self.path} sent a reply that is not JSON") from None
        if response.status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise DaemonError(str(message or f"pensieved answered HTTP {response.status}"))
        if not isinstance(data, dict):
            raise DaemonError(f"pensieved at {self.path} sent an unexpected reply")
        return data

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def stop(self) -> dict[str, Any]:
        return self.request("POST", "/v1/stop")

    def reload(self, timeout: float = 600.0) -> dict[str, Any]:
        # A reload waits for a model load still running from the previous one.
        return self.request("POST", "/v1/reload", timeout=timeout)

    def validate(self, path: Path) -> dict[str, Any]:
        return self.request("POST", "/v1/validate", {"path": str(path)})
