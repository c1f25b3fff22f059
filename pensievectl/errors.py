"""pensievectl's failure kinds and the one place that maps each to its exit status
(`pensieve.exitcodes.CtlExit`)."""

from __future__ import annotations

from pensieve.exitcodes import CtlExit


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
_EXIT_STATUS: tuple[tuple[type[CtlError], CtlExit], ...] = (
    (NotRunningError, CtlExit.NOT_RUNNING),
    (StaleSocketError, CtlExit.NOT_RUNNING),
    (SocketPermissionError, CtlExit.UNKNOWN),
    (ForeignSocketError, CtlExit.UNKNOWN),
    (NotASocketError, CtlExit.UNKNOWN),
    (NoAnswerError, CtlExit.UNKNOWN),
    (InvalidConfigError, CtlExit.FAILURE),
    (DaemonError, CtlExit.FAILURE),
    (StartError, CtlExit.FAILURE),
    (StopError, CtlExit.FAILURE),
    (ReloadFailedError, CtlExit.FAILURE),
    (SupervisorError, CtlExit.FAILURE),
    (OutputExistsError, CtlExit.FAILURE),
)


def exit_status_for(error: CtlError) -> CtlExit:
    for kind, status in _EXIT_STATUS:
        if isinstance(error, kind):
            return status
    return CtlExit.FAILURE
