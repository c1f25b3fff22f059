"""Finding the daemon that serves a config file, even when that file does not parse.

In order: `--socket`; the config file's `server.socket_path` (or the default path when the
file parses and leaves it out); the daemon's run record (`pensieve.runrecord`) when the file
cannot be read, or when nothing answers at the file's path but the recorded daemon lives
elsewhere (the key changes only at the next start); and last the default path. A record is
trusted only while its pid lives and its socket is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pensieve.paths import default_socket_path
from pensieve.runrecord import RunRecord, pid_alive, read_record, socket_is_ours
from pensieve.sockets import probe, read_socket_setting

FoundBy = Literal["flag", "config", "record", "default"]


@dataclass(frozen=True)
class Location:
    socket_path: Path
    found_by: FoundBy
    # The record of a live daemon for this config file (its socket is ours).
    record: RunRecord | None = None
    # A record left by a daemon that died without a clean exit: crash evidence.
    dead: RunRecord | None = None
    # A live recorded daemon whose socket is gone (deleted by hand): it cannot be controlled.
    orphan: RunRecord | None = None
    # Why the config file could not be read for its socket path (`(json): ...`).
    config_problem: str | None = None


def same_process(record: RunRecord) -> bool:
    """The recorded pid is still that daemon, not a later process that got its number."""
    import psutil  # deferred: only this rare case needs it

    try:
        return bool(psutil.Process(record.pid).create_time() <= record.started_at + 5)
    except psutil.Error:
        return False


def locate(config_path: Path, socket_flag: str | None) -> Location:
    record = read_record(config_path)
    live = dead = orphan = None
    if record is not None:
        if not pid_alive(record.pid):
            dead = record
        elif socket_is_ours(Path(record.socket_path)):
            live = record
        elif same_process(record):
            orphan = record

    def found(path: Path, how: FoundBy, problem: str | None = None) -> Location:
        return Location(path, how, live, dead, orphan, problem)

    if socket_flag:
        return found(Path(socket_flag).expanduser(), "flag")
    value, problem = read_socket_setting(config_path)
    if problem is None:
        primary = Path(value).expanduser() if value else default_socket_path()
        if (
            live is not None
            and Path(live.socket_path) != primary.absolute()
            and probe(primary) != "live"
        ):
            # server.socket_path changed since the daemon started (it applies at restart).
            return found(Path(live.socket_path), "record")
        return found(primary, "config" if value else "default")
    if live is not None:
        return found(Path(live.socket_path), "record", problem)
    return found(default_socket_path(), "default", problem)
