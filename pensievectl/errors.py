"""pensievectl's failure kinds and the one place that maps each to its exit status
(`pensieve.exitcodes.CtlExit`). The socket client's kinds come from `pensieve.client`; their
base, `ControlError`, is every pensievectl failure's base (`CtlError` here)."""

from __future__ import annotations

from pensieve.client import (
    ControlError,
    DaemonError,
    ForeignSocketError,
    NoAnswerError,
    NotASocketError,
    NotRunningError,
    SocketPermissionError,
    StaleSocketError,
)
from pensieve.exitcodes import CtlExit

CtlError = ControlError


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


class ClaudeNotFoundError(CtlError):
    """`claude`: Claude Code is not installed (or not where it was said to be)."""


class NotServingError(CtlError):
    """`claude`: the daemon runs but serves no model (none configured, or its load failed)."""


class ContextTooSmallError(CtlError):
    """`claude`: the model's context cannot hold Claude Code's prompt and room to work."""


class SettingsFileError(CtlError):
    """`claude --settings`: Claude Code's settings.json cannot be read or written."""


class PullError(CtlError):
    """`pull`, `rm` or a downloaded model's listing failed: bad name, the Hub, the disk."""


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
    (ClaudeNotFoundError, CtlExit.FAILURE),
    (NotServingError, CtlExit.FAILURE),
    (ContextTooSmallError, CtlExit.FAILURE),
    (SettingsFileError, CtlExit.FAILURE),
    (PullError, CtlExit.FAILURE),
)


def exit_status_for(error: CtlError) -> CtlExit:
    for kind, status in _EXIT_STATUS:
        if isinstance(error, kind):
            return status
    return CtlExit.FAILURE
