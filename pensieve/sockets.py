"""The control socket's file: where it lives, who may use it, binding it safely, removing it.

Stdlib only (plus `pensieve.paths`): `pensievectl` imports this to find the socket in well
under a second, so nothing here may pull in pydantic, Tornado or llama_cpp.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from pensieve.paths import (
    MAX_SOCKET_PATH_BYTES,
    PRIVATE_DIR_MODE,
    default_config_path,
    default_socket_path,
    private_dir_owner,
)
from pensieve.runrecord import LockTimeoutError, RecordDirError, socket_lock

# The socket and its directory are private to the user: anyone who can connect can stop the
# daemon or make it load any file as a model.
SOCKET_MODE = 0o600


class SocketPathError(Exception):
    """The control socket's path or directory cannot be used (too long, wrong owner...)."""


class SocketInUseError(Exception):
    """A live daemon already answers on the socket."""


def read_socket_setting(config_file: Path) -> tuple[str | None, str | None]:
    """`server.socket_path` from a config file, best effort and without validation.

    Returns (value, problem): the value is None when the file does not set it; the problem
    says why the file could not be read at all (then nobody can tell the socket from it). A
    missing file is no problem: it means the defaults.
    """
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"(file): cannot read: {exc}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # The wording of the daemon's validator (pensieve.config), without importing it.
        return None, f"(json): {exc.msg} at line {exc.lineno} column {exc.colno}"
    server = data.get("server") if isinstance(data, dict) else None
    value = server.get("socket_path") if isinstance(server, dict) else None
    return (value if isinstance(value, str) and value else None), None


def socket_path_from_file(config_file: Path) -> str | None:
    """`server.socket_path` from a config file, best effort and without validation.

    Both the daemon (when its config is broken, so it still binds where `pensievectl` looks)
    and `pensievectl` (which must not pay for importing pydantic) use this.
    """
    return read_socket_setting(config_file)[0]


def resolve_socket_path(flag: str | None, config_file: Path | None) -> Path:
    """`--socket`, else the config file's `server.socket_path`, else the per-user default."""
    if flag:
        return Path(flag).expanduser()
    configured = socket_path_from_file(config_file or default_config_path())
    if configured:
        return Path(configured).expanduser()
    return default_socket_path()


def check_length(path: Path) -> None:
    size = len(str(path).encode())
    if size > MAX_SOCKET_PATH_BYTES:
        raise SocketPathError(
            f"control socket path {path} is {size} bytes; Unix socket paths must be under "
            f"{MAX_SOCKET_PATH_BYTES + 1} bytes (the macOS limit): set server.socket_path "
            "(or --socket) to a shorter path"
        )


def probe(path: Path, timeout: float = 1.0) -> str:
    """What is at `path`: "absent", "live", "stale", "denied" or "not_socket"."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    except PermissionError:
        return "denied"
    if not stat.S_ISSOCK(info.st_mode):
        return "not_socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except PermissionError:
            return "denied"
        except TimeoutError:
            return "live"
        except OSError as exc:
            # A full listen backlog means someone is listening.
            return "live" if exc.errno == errno.EAGAIN else "stale"
    return "live"


def _prepare_directory(directory: Path) -> None:
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    owner = private_dir_owner(directory)
    if owner != os.getuid():
        raise SocketPathError(
            f"the control socket's directory {directory} belongs to uid {owner}, not to "
            "you: set server.socket_path (or --socket) to a path in a directory you own"
        )


@dataclass(frozen=True)
class BoundSocket:
    """A listening control socket and the identity of the file this process created."""

    sock: socket.socket
    path: Path
    device: int
    inode: int

    def remove(self) -> None:
        """Close, and unlink the file only if it is still ours (a successor may own it now)."""
        self.sock.close()
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == (self.device, self.inode):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def bind_control_socket(path: Path, backlog: int = 16) -> BoundSocket:
    """Create the directory (0700) and the socket (0600, set before it accepts anything).

    An existing live socket means another daemon: refuse and touch nothing. A dead one is a
    leftover of a killed daemon: remove it. Probing, removing and binding happen under a lock
    (in the runtime directory): without it, a daemon starting at the same moment could find
    this one's socket bound but not yet listening, take it for dead and unlink it.
    """
    check_length(path)
    _prepare_directory(path.parent)
    try:
        with socket_lock(path, timeout=30.0):
            return _bind_unlocked(path, backlog)
    except (LockTimeoutError, RecordDirError) as exc:
        raise SocketPathError(f"cannot lock the control socket {path}: {exc}") from None


def _bind_unlocked(path: Path, backlog: int) -> BoundSocket:
    state = probe(path)
    if state == "live":
        raise SocketInUseError(
            f"another pensieved is already running on {path}: use `pensievectl status` to "
            "see it, or `pensievectl stop` to stop it first"
        )
    if state == "denied":
        raise SocketPathError(f"permission denied on the control socket {path}")
    if state == "not_socket":
        raise SocketPathError(
            f"{path} exists and is not a socket: move it away or set server.socket_path"
        )
    if state == "stale":
        # Another daemon starting at the same moment may have removed it already.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes bind() create the file 0600 already: there is no moment where another
    # user could open it; the chmod after is for umasks that are stricter still.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # lost a race with a daemon starting alongside
            raise SocketInUseError(
                f"another pensieved just took the control socket {path}: see it with "
                "`pensievectl status`"
            ) from exc
        raise SocketPathError(f"cannot create the control socket {path}: {exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.setblocking(False)
    sock.listen(backlog)
    info = os.lstat(path)
    return BoundSocket(sock, path, info.st_dev, info.st_ino)
