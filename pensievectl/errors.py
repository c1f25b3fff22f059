"""pensievectl's exit statuses and failure kinds: the one place that maps one to the other.

`status` follows the LSB convention for init scripts (0 running, 3 not running, 4 unknown);
every other command uses the same numbers so scripts can treat them alike.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the command failed; for `validate`, the config is invalid
    USAGE = 2  # bad command line (argparse's own code)
    NOT_RUNNING = 3  # LSB: the daemon is not running (no socket, or a stale one)
    UNKNOWN = 4  # LSB: cannot tell (permission denied, foreign socket, no answer)


class CtlError(Exception):
    """A failure with a message for the user: what happened and what to do."""


class NotRunningError(CtlError):
    """No socket: no daemon."""


class StaleSocketError(CtlError):
    """A socket file nobody listens on: a daemon was killed."""


class SocketPermissionError(CtlError):
    """The socket exists but this user may not connect to it."""


class ForeignSocketError(CtlError):
    """The socket belongs to another user: never talk to it (it could be an impostor)."""


class NotASocketError(CtlError):
    """The socket path holds something other than a socket."""


class NoAnswerError(CtlError):
    """The daemon accepted the connection but did not answer in time."""


class DaemonError(CtlError):
    """The daemon answered with an error."""


class StartError(CtlError):
    """`start` could not bring the daemon up (it died, timed out, or runs degraded)."""


class StopError(CtlError):
    """`stop` asked, but the daemon did not go away in time."""


class ReloadFailedError(CtlError):
    """The daemon rejected the new config (it keeps the running one)."""


class InvalidConfigError(CtlError):
    """The config file does not validate."""


class SupervisorError(CtlError):
    """launchd or systemd refused a command."""


class OutputExistsError(CtlError):
    """`config generate --output` would overwrite a file."""


# Most specific first: the first matching class wins.
_EXIT_STATUS: tuple[tuple[type[CtlError], ExitStatus], ...] = (
    (NotRunningError, ExitStatus.NOT_RUNNING),
    (StaleSocketError, ExitStatus.NOT_RUNNING),
    (SocketPermissionError, ExitStatus.UNKNOWN),
    (ForeignSocketError, ExitStatus.UNKNOWN),
    (NotASocketError, ExitStatus.UNKNOWN),
    (NoAnswerError, ExitStatus.UNKNOWN),
    (InvalidConfigError, ExitStatus.FAILURE),
    (DaemonError, ExitStatus.FAILURE),
    (StartError, ExitStatus.FAILURE),
    (StopError, ExitStatus.FAILURE),
    (ReloadFailedError, ExitStatus.FAILURE),
    (SupervisorError, ExitStatus.FAILURE),
    (OutputExistsError, ExitStatus.FAILURE),
)


def exit_status_for(error: CtlError) -> ExitStatus:
    for kind, status in _EXIT_STATUS:
        if isinstance(error, kind):
            return status
    return ExitStatus.FAILURE
