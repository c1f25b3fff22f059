"""Starting and stopping pensieved through the user's service manager when it owns it.

If a LaunchAgent (Homebrew's `homebrew.mxcl.pensieve` or `pensievectl service install`'s
`dev.pensieve.pensieved`) or a systemd user unit is installed, `start` goes through launchd or
systemd rather than spawning a second copy, and `stop` goes through them when a plain exit
would be restarted (KeepAlive). Every OS command goes through an injectable runner, so this is
tested on Linux with a fake one.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pensievectl.errors import SupervisorError

HOMEBREW_LABEL = "homebrew.mxcl.pensieve"
AGENT_LABEL = "dev.pensieve.pensieved"
LAUNCHD_LABELS = (HOMEBREW_LABEL, AGENT_LABEL)
SYSTEMD_UNIT = "pensieved.service"


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], RunResult]


def run_command(argv: Sequence[str]) -> RunResult:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return RunResult(127, "", str(exc))
    return RunResult(done.returncode, done.stdout, done.stderr)


class Supervisor(Protocol):
    """A service manager that has a pensieved service installed for this user."""

    @property
    def name(self) -> str: ...

    @property
    def restarts_clean_exit(self) -> bool:
        """A daemon that exits 0 is started again (so stopping must go through it)."""

    def is_loaded(self) -> bool:
        """The service manager currently runs (or keeps alive) the service."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stop_command(self) -> str:
        """The shell command a user would run to stop it for good."""


def _check(result: RunResult, argv: Sequence[str]) -> None:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise SupervisorError(f"`{' '.join(argv)}` failed: {detail}")


@dataclass
class Launchd:
    label: str
    plist: Path
    uid: int
    runner: Runner
    keep_alive: object

    @property
    def name(self) -> str:
        return f"launchd ({self.label})"

    @property
    def target(self) -> str:
        return f"gui/{self.uid}/{self.label}"

    @property
    def restarts_clean_exit(self) -> bool:
        # KeepAlive true restarts any exit; {SuccessfulExit: false} only failures.
        if isinstance(self.keep_alive, dict):
            return self.keep_alive.get("SuccessfulExit") is True
        return self.keep_alive is True

    def is_loaded(self) -> bool:
        return self.runner(["launchctl", "print", self.target]).returncode == 0

    def start(self) -> None:
        # As `brew services start` does: bootstrap the plist into the GUI domain if launchd
        # does not know it yet, then kickstart it.
        if not self.is_loaded():
            argv = ["launchctl", "bootstrap", f"gui/{self.uid}", str(self.plist)]
            _check(self.runner(argv), argv)
        argv = ["launchctl", "kickstart", self.target]
        _check(self.runner(argv), argv)

    def stop(self) -> None:
        argv = ["launchctl", "bootout", self.target]
        _check(self.runner(argv), argv)

    def stop_command(self) -> str:
        if self.label == HOMEBREW_LABEL:
            return "brew services stop pensieve"
        return f"launchctl bootout {self.target}"


@dataclass
class Systemd:
    unit_file: Path
    runner: Runner
    restart: str

    @property
    def name(self) -> str:
        return f"systemd --user ({SYSTEMD_UNIT})"

    @property
    def restarts_clean_exit(self) -> bool:
        return self.restart in ("always", "on-success")

    def is_loaded(self) -> bool:
        argv = ["systemctl", "--user", "is-active", "--quiet", SYSTEMD_UNIT]
        return self.runner(argv).returncode == 0

    def start(self) -> None:
        argv = ["systemctl", "--user", "start", SYSTEMD_UNIT]
        _check(self.runner(argv), argv)

    def stop(self) -> None:
        argv = ["systemctl", "--user", "stop", SYSTEMD_UNIT]
        _check(self.runner(argv), argv)

    def stop_command(self) -> str:
        return f"systemctl --user stop {SYSTEMD_UNIT}"


def journal_text(runner: Runner = run_command, lines: int = 300) -> str | None:
    """The systemd user unit's recent journal (its stderr and systemd's own lines about it)."""
    argv = ["journalctl", "--user", "-u", SYSTEMD_UNIT, "-n", str(lines), "-o", "cat"]
    result = runner([*argv, "--no-pager"])
    return result.stdout if result.returncode == 0 else None


def _read_plist(path: Path) -> dict[str, object] | None:
    try:
        with path.open("rb") as f:
            data = plistlib.load(f)
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _systemd_restart(text: str) -> str:
    restart = "no"
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "Restart":
            restart = value.strip()
    return restart


def find_supervisor(
    *,
    runner: Runner = run_command,
    home: Path | None = None,
    uid: int | None = None,
    platform: str = sys.platform,
    environ: dict[str, str] | None = None,
) -> Supervisor | None:
    """The installed service for pensieved, if any (launchd on macOS, systemd elsewhere)."""
    home = home or Path.home()
    uid = os.getuid() if uid is None else uid
    env = os.environ if environ is None else environ
    if platform == "darwin":
        for label in LAUNCHD_LABELS:
            plist = home / "Library" / "LaunchAgents" / f"{label}.plist"
            data = _read_plist(plist)
            if data is not None:
                return Launchd(label, plist, uid, runner, data.get("KeepAlive", False))
        return None
    if platform.startswith("linux"):
        config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        unit = config_home / "systemd" / "user" / SYSTEMD_UNIT
        try:
            text = unit.read_text(encoding="utf-8")
        except OSError:
            return None
        return Systemd(unit, runner, _systemd_restart(text))
    return None
