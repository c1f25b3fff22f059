"""The run record: which daemon serves a config file, found without parsing that file.

A running pensieved writes a small JSON record into the per-user runtime directory, named
after its config file's resolved path: its pid, control socket, log and start time. It
removes the record when it exits cleanly, so a record whose pid is dead was left by a daemon
that died (see `pensieve.postmortem`). `pensievectl` reads it when the config file does not
parse (the daemon keeps running on its last good config then, and its socket may not be the
default one), and `start` holds this directory's lock for a config file while it starts one.

Stdlib only (plus `pensieve.paths`): `pensievectl` imports it for every command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pensieve.paths import PRIVATE_DIR_MODE, private_dir_owner, runtime_dir

FILE_MODE = 0o600


class RecordDirError(Exception):
    """The runtime directory cannot hold private records (it belongs to another user)."""


class LockTimeoutError(Exception):
    """Another process held the lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class RunRecord:
    pid: int
    config_path: str  # resolved
    socket_path: str  # absolute
    started_at: float
    version: str
    log_path: str | None = None  # where the daemon's stderr goes, if it is a file
    log_offset: int = 0  # that file's size when the daemon started: its own lines follow
    supervisor: str | None = None  # "systemd" or "launchd" when one started it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunRecord | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        known = {f.name for f in fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None
        if not isinstance(record.pid, int) or not isinstance(record.socket_path, str):
            return None
        return record


def state_dir() -> Path:
    return runtime_dir() / "run"


def config_key(config_path: Path) -> str:
    """A file name for a config file: the same for every spelling of its path."""
    resolved = str(Path(config_path).expanduser().resolve())
    return hashlib.sha256(resolved.encode()).hexdigest()[:20]


def record_path(config_path: Path) -> Path:
    return state_dir() / f"{config_key(config_path)}.json"


def activity_path(config_path: Path) -> Path:
    """The daemon's in-flight work (`pensieve.activity`), beside its record."""
    return state_dir() / f"{config_key(config_path)}.activity"


def _private_dir(create: bool) -> Path | None:
    """The state directory if it is ours (created 0700 if asked), else None or an error."""
    directory = state_dir()
    if create:
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        owner = private_dir_owner(directory)
    except OSError:
        return None
    if owner != os.getuid():
        # Someone else made it (a shared /tmp): nothing in it can be trusted or kept private.
        raise RecordDirError(
            f"{directory} belongs to uid {owner}, not to you: remove it, or set "
            "XDG_RUNTIME_DIR to a private directory"
        )
    return directory


def pid_alive(pid: int) -> bool:
    """The process exists and is ours (another user's process is never ours to trust)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    # A daemon spawned by a `pensievectl start` that has not exited yet (or by an init that
    # does not reap) lingers as a zombie: it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def last_good_path(config_path: Path) -> Path:
    """The last config read from `config_path` that validated, beside its record: a daemon
    that starts on an invalid file takes its server section from there."""
    return state_dir() / f"{config_key(config_path)}.last-good.json"


def _write_private(path: Path, text: str) -> Path:
    """Write (or replace) a file of the state directory, atomically, readable only by us."""
    directory = _private_dir(create=True)
    assert directory is not None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _read_private(path: Path) -> str | None:
    """A file of the state directory, if there is one and it is ours."""
    try:
        if _private_dir(create=False) is None:
            return None
    except RecordDirError:
        return None
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_record(record: RunRecord) -> Path:
    """Write (or replace) the record for its config file, atomically, readable only by us."""
    return _write_private(record_path(Path(record.config_path)), record.to_json())


def read_record(config_path: Path) -> RunRecord | None:
    """The record for `config_path`, if there is one and it is ours; dead or alive."""
    text = _read_private(record_path(config_path))
    return RunRecord.from_json(text) if text is not None else None


def write_last_good(config_path: Path, data: object) -> Path:
    """Keep `data`, the decoded JSON of a config file that validated (0600: it may hold keys)."""
    return _write_private(last_good_path(config_path), json.dumps(data, indent=2))


def read_last_good(config_path: Path) -> object:
    """The last good config's data saved for `config_path`, or None."""
    text = _read_private(last_good_path(config_path))
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def remove_record(config_path: Path, pid: int) -> None:
    """Remove the record for `config_path` if it is `pid`'s (a successor may own it now)."""
    current = read_record(config_path)
    if current is not None and current.pid == pid:
        with contextlib.suppress(OSError):
            record_path(config_path).unlink()


def socket_is_ours(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid()


@contextlib.contextmanager
def file_lock(
    path: Path, timeout: float, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """An exclusive `flock` on `path` (created 0600), waiting up to `timeout` seconds.

    The lock file is never removed: removing it would let two processes hold "the" lock on
    two different files. The kernel releases the lock if the holder dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if time.monotonic() >= deadline:
                raise LockTimeoutError(f"{path} stayed locked for {timeout:g} s")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def start_lock(
    config_path: Path, timeout: float, on_wait: Callable[[], None] | None = None
) -> AbstractContextManager[None]:
    """Held by `pensievectl start` for a config file: one start at a time for it."""
    directory = _private_dir(create=True)
    assert directory is not None
    return file_lock(directory / f"{config_key(config_path)}.lock", timeout, on_wait)


def socket_lock(socket_path: Path, timeout: float) -> AbstractContextManager[None]:
    """Held by a daemon while it probes, clears and binds its control socket."""
    directory = _private_dir(create=True)
    assert directory is not None
    digest = hashlib.sha256(str(socket_path.absolute()).encode()).hexdigest()[:20]
    return file_lock(directory / f"socket-{digest}.lock", timeout)
