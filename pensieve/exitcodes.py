"""Exit codes of both binaries, in one place: scripts, the man pages and service managers read them.

`pensievectl` follows the LSB convention for init scripts (0 running, 3 not running, 4 unknown)
for `status`, and every other command uses the same numbers so scripts can treat them alike.

`DAEMON_EXIT_DOCS` and `CTL_EXIT_DOCS` are the only description of each code: the man pages,
`pensievectl --help` and docs/exit-status.md are generated from them (`make docs`).
"""

from __future__ import annotations

import enum


class DaemonExit(enum.IntEnum):
    """How `pensieved` ends."""

    OK = 0
    FAILURE = 1
    CONFIG = 2
    ALREADY_RUNNING = 3
    LISTEN = 4
    SOCKET = 5


class CtlExit(enum.IntEnum):
    """How `pensievectl` ends."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_RUNNING = 3
    UNKNOWN = 4


DAEMON_EXIT_DOCS: dict[DaemonExit, str] = {
    DaemonExit.OK: "Stopped cleanly after SIGTERM, SIGINT or `pensievectl stop`. launchd and "
    "systemd do not restart a clean exit.",
    DaemonExit.FAILURE: "An unexpected error; service managers restart the daemon after it. A "
    "fatal signal (a crash in llama.cpp) ends it with that signal instead, after faulthandler "
    "has written every thread's traceback to standard error.",
    DaemonExit.CONFIG: "A command-line flag is invalid (also argparse's usage errors). A broken "
    "config file does not stop the daemon: it runs degraded, answers 503 with the reason, and "
    "recovers when the file is fixed.",
    DaemonExit.ALREADY_RUNNING: "Another pensieved already owns the control socket, or already "
    "serves the same config file.",
    DaemonExit.LISTEN: "The HTTP address cannot be bound (the port is in use or not permitted).",
    DaemonExit.SOCKET: "The control socket cannot be created (the path is too long, or its "
    "directory belongs to someone else).",
}

CTL_EXIT_DOCS: dict[CtlExit, str] = {
    CtlExit.OK: "Success; for `status`, pensieved is running.",
    CtlExit.FAILURE: "The command failed: for `validate`, the config file is invalid; for "
    "`start`, the daemon died, timed out or cannot serve; for `claude`, Claude Code is not "
    "installed, or the model's context cannot hold its prompt, a reply and room to work.",
    CtlExit.USAGE: "Bad command line.",
    CtlExit.NOT_RUNNING: "pensieved is not running: no socket, or a stale one left by a killed "
    "daemon (LSB status code 3). When it died (a signal, a kill), `status` says which signal, "
    "what it was running and its last log lines.",
    CtlExit.UNKNOWN: "The state cannot be told: permission denied on the socket, another "
    "user's socket, or no answer (LSB status code 4).",
}
