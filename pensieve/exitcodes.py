"""Exit codes of both binaries, in one place: scripts, the man pages and service managers read them.

`pensievectl` follows the LSB convention for init scripts (0 running, 3 not running, 4 unknown)
for `status`, and every other command uses the same numbers so scripts can treat them alike.
"""

from __future__ import annotations

import enum


class DaemonExit(enum.IntEnum):
    """How `pensieved` ends."""

    OK = 0
    FAILURE = 1
    CONFIG = 2  # a command-line flag is invalid (a broken config file degrades instead)
    ALREADY_RUNNING = 3  # another daemon owns the control socket or serves the config file
    LISTEN = 4  # the HTTP address cannot be bound
    SOCKET = 5  # the control socket cannot be created (path too long, foreign directory)


class CtlExit(enum.IntEnum):
    """How `pensievectl` ends."""

    OK = 0
    FAILURE = 1  # the command failed; for `validate`, the config is invalid
    USAGE = 2  # bad command line (argparse's own code)
    NOT_RUNNING = 3  # LSB: the daemon is not running (no socket, or a stale one)
    UNKNOWN = 4  # LSB: cannot tell (permission denied, foreign socket, no answer)
