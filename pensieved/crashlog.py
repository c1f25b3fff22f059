"""A native crash leaves a trace: faulthandler writes the traceback into the daemon's log.

The daemon's log is its stderr (a file under `pensievectl start` and launchd, the journal
under systemd). faulthandler writes to a duplicate of that descriptor, so code that points
fd 2 elsewhere for a while (llama-cpp-python does, around loads, when asked to be quiet)
cannot make a crash silent. The run record keeps the log file's path and size at start, so a
post-mortem reads this daemon's lines only (`pensieve.postmortem`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import stat
import sys
from pathlib import Path
from typing import TextIO

_target: TextIO | None = None  # faulthandler needs the file kept open


def _fd_path(fd: int) -> str | None:
    try:
        if sys.platform == "darwin":
            import fcntl

            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return raw.split(b"\0", 1)[0].decode() or None
        target = os.readlink(f"/proc/self/fd/{fd}")
    except (OSError, AttributeError, UnicodeDecodeError):
        return None
    if target.endswith(" (deleted)") or not target.startswith("/"):
        return None
    return target


def stderr_log() -> tuple[str | None, int]:
    """The file stderr appends to (None for a terminal, a pipe or the journal), its size."""
    try:
        info = os.fstat(2)
    except OSError:
        return None, 0
    if not stat.S_ISREG(info.st_mode):
        return None, 0
    return _fd_path(2), info.st_size


def _discarded(fd: int) -> bool:
    """fd is closed or is /dev/null: nothing written there is ever seen."""
    try:
        info = os.fstat(fd)
    except OSError:
        return True
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == null.st_rdev


def enable_faulthandler(log_file: str | None = None) -> str:
    """Report fatal signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) with every thread's
    Python traceback: into stderr, or into `log_file` when stderr goes nowhere. Safe to call
    again (after a reload changes `logging.file`). Returns where reports go."""
    global _target
    where = "stderr"
    stream: TextIO | None = None
    if _discarded(2) and log_file:
        path = Path(log_file).expanduser()
        with contextlib.suppress(OSError):
            stream = path.open("a", encoding="utf-8")
            where = str(path)
    if stream is None:
        try:
            stream = os.fdopen(os.dup(2), "w", encoding="utf-8")
        except OSError:
            return "nowhere (stderr is closed)"
    faulthandler.enable(file=stream, all_threads=True)
    if _target is not None:
        with contextlib.suppress(OSError):
            _target.close()
    _target = stream
    return where


def supervisor_from_environment() -> str | None:
    """Which service manager started us, from the variables it sets."""
    if os.environ.get("INVOCATION_ID"):
        return "systemd"
    service = os.environ.get("XPC_SERVICE_NAME", "")
    if service and service != "0":
        return "launchd"
    return None
