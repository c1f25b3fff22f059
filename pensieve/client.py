"""The client of pensieved's control API: HTTP over its Unix socket, replies parsed into
`pensieve.wire` models.

Before connecting it checks that the socket belongs to the current user: a socket planted by
someone else at our path must never receive our commands or be trusted for its answers. The
transport is stdlib only; pydantic (for the replies) is imported once a reply has arrived, so a
client that finds no daemon never pays for it. Each failure is one `ControlError` subclass;
`pensievectl.errors` maps them to exit statuses.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pensieve.wire import (
        ConfigResponse,
        ModelActionResponse,
        ModelsResponse,
        ReloadResult,
        StatusResponse,
        StopResponse,
        ValidateResponse,
    )

    Reply = TypeVar("Reply", bound=BaseModel)


class ControlError(Exception):
    """A failure with a message for the user: what happened and what to do."""


class NotRunningError(ControlError):
    """No socket: no daemon."""


class StaleSocketError(ControlError):
    """A socket file nobody listens on: a daemon was killed."""


class SocketPermissionError(ControlError):
    """The socket exists but this user may not connect to it."""


class ForeignSocketError(ControlError):
    """The socket belongs to another user: never talk to it (it could be an impostor)."""


class NotASocketError(ControlError):
    """The socket path holds something other than a socket."""


class NoAnswerError(ControlError):
    """The daemon accepted the connection but did not answer in time."""


class DaemonError(ControlError):
    """The daemon answered with an error, or with a reply this client cannot read."""


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
            from pensieve.wire import ErrorResponse

            try:
                message = ErrorResponse.model_validate(data).error
            except ValueError:
                message = f"pensieved answered HTTP {response.status}"
            raise DaemonError(message)
        if not isinstance(data, dict):
            raise DaemonError(f"pensieved at {self.path} sent an unexpected reply")
        return data

    def _reply(self, model: type[Reply], data: dict[str, Any]) -> Reply:
        from pydantic import ValidationError

        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise DaemonError(
                f"pensieved at {self.path} sent a reply this pensievectl cannot read "
                f"({exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}); is it another "
                "version? `pensievectl stop` and `start` run the installed one"
            ) from None

    # Each reply model is imported only once the reply is here (see the module's docstring).

    def status(self) -> StatusResponse:
        data = self.request("GET", "/v1/status")
        from pensieve.wire import StatusResponse

        return self._reply(StatusResponse, data)

    def config(self) -> ConfigResponse:
        data = self.request("GET", "/v1/config")
        from pensieve.wire import ConfigResponse

        return self._reply(ConfigResponse, data)

    def stop(self) -> StopResponse:
        data = self.request("POST", "/v1/stop")
        from pensieve.wire import StopResponse

        return self._reply(StopResponse, data)

    def reload(self, timeout: float = 600.0) -> ReloadResult:
        # A reload waits for a model load still running from the previous one.
        data = self.request("POST", "/v1/reload", timeout=timeout)
        from pensieve.wire import ReloadResult

        return self._reply(ReloadResult, data)

    def validate(self, path: Path) -> ValidateResponse:
        # ValidateRequest's one field, as the daemon parses it.
        data = self.request("POST", "/v1/validate", {"path": str(path)})
        from pensieve.wire import ValidateResponse

        return self._reply(ValidateResponse, data)

    def models(self) -> ModelsResponse:
        data = self.request("GET", "/v1/models")
        from pensieve.wire import ModelsResponse

        return self._reply(ModelsResponse, data)

    def model_action(self, action: str, name: str) -> ModelActionResponse:
        """`action` is `load` or `unload`; the daemon answers when it is done."""
        data = self.request("POST", f"/v1/models/{action}", {"name": name})
        from pensieve.wire import ModelActionResponse

        return self._reply(ModelActionResponse, data)
