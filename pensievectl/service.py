"""launchd and systemd: install and remove pensieved's per-user service, and find and drive it.

`pensievectl service install|uninstall` writes a LaunchAgent (macOS, loaded with `launchctl
bootstrap gui/UID`) or a systemd user unit (Linux, enabled with `systemctl --user`) rendered from
the templates in pensievectl/templates. `start` and `stop` go through the installed service (also
Homebrew's `homebrew.mxcl.pensieve` agent) rather than spawning a second copy, or letting a plain
exit be restarted. Rendering is pure (paths in, text out). Every launchctl and systemctl
command, for install and uninstall as for start and stop, is a method of one driver (`Launchd`,
`Systemd`) that runs it through an injectable `CommandRunner`, so the macOS path is tested on
Linux with a fake one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Protocol, TextIO
from xml.sax.saxutils import escape as xml_escape

from pensieve.exitcodes import CtlExit
from pensieve.paths import default_config_path
from pensievectl.errors import SupervisorError

if TYPE_CHECKING:
    from pensievectl.context import CommandContext

LAUNCHD_LABEL = "dev.pensieve.pensieved"
# `brew services` names its agent after the formula; two agents would fight over the port.
HOMEBREW_LAUNCHD_LABEL = "homebrew.mxcl.pensieve"
LAUNCHD_LABELS = (HOMEBREW_LAUNCHD_LABEL, LAUNCHD_LABEL)
SYSTEMD_UNIT = "pensieved.service"
LOG_FILE_NAME = "pensieved.log"


def _template(name: str) -> str:
    from importlib import resources  # deferred: only rendering needs it (not `--help`)

    return resources.files("pensievectl").joinpath("templates", name).read_text(encoding="utf-8")


# ---- rendering (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePaths:
    """Everything a service definition names; all absolute."""

    program: Path  # the pensieved executable
    config: Path
    working_dir: Path
    log: Path  # launchd only: systemd logs to the journal

    def __post_init__(self) -> None:
        for name in ("program", "config", "working_dir", "log"):
            value: Path = getattr(self, name)
            if not value.is_absolute():
                raise ValueError(f"{name} must be an absolute path, not {value}")


def render_plist(paths: ServicePaths, label: str = LAUNCHD_LABEL) -> str:
    values = {
        "label": label,
        "program": str(paths.program),
        "config": str(paths.config),
        "working_dir": str(paths.working_dir),
        "log": str(paths.log),
    }
    return Template(_template("dev.pensieve.pensieved.plist.in")).substitute(
        {k: xml_escape(v) for k, v in values.items()}
    )


def systemd_quote(value: str) -> str:
    """One word of a systemd command line or path setting, quoted if it needs to be.

    `%` starts a specifier everywhere in a unit file, so it is doubled even inside quotes.
    """
    value = value.replace("%", "%%")
    if value and not any(c in value for c in " \t\n\"'\\;$"):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped}"'


def render_systemd_unit(paths: ServicePaths) -> str:
    return Template(_template("pensieved.service.in")).substitute(
        program=systemd_quote(str(paths.program)),
        config=systemd_quote(str(paths.config)),
        working_dir=systemd_quote(str(paths.working_dir)),
    )


# ---- the OS boundary ------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What an OS command (launchctl, systemctl, journalctl) returned."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CommandResult(127, "", str(exc))
    return CommandResult(done.returncode, done.stdout, done.stderr)


def _find_pensieved() -> Path | None:
    # The pensieved installed next to this pensievectl first: a venv or `pip install --user`
    # puts both scripts in one directory, which need not be on launchd's or systemd's PATH.
    candidates = [Path(sys.argv[0]).absolute().parent / "pensieved"]
    candidates.append(Path(sys.executable).parent / "pensieved")
    found = shutil.which("pensieved")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.absolute()
    return None


@dataclass
class ServiceHost:
    """What the service steps read from the machine; tests substitute all of it."""

    platform: str = field(default_factory=lambda: sys.platform)
    home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=os.getuid)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    runner: CommandRunner = run_command
    find_program: Callable[[], Path | None] = _find_pensieved
    default_config: Callable[[], Path] = default_config_path
    out: TextIO = field(default_factory=lambda: sys.stdout)

    @property
    def is_macos(self) -> bool:
        return self.platform == "darwin"

    def plist_path(self, label: str = LAUNCHD_LABEL) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{label}.plist"

    def unit_path(self) -> Path:
        base = self.env.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(base) / "systemd" / "user" / SYSTEMD_UNIT

    def log_path(self) -> Path:
        if self.is_macos:
            return self.home / "Library" / "Logs" / "pensieve" / LOG_FILE_NAME
        base = self.env.get("XDG_STATE_HOME") or str(self.home / ".local" / "state")
        return Path(base) / "pensieve" / "log" / LOG_FILE_NAME

    def domain(self) -> str:
        return f"gui/{self.uid}"

    def service_target(self, label: str = LAUNCHD_LABEL) -> str:
        return f"{self.domain()}/{label}"


# ---- install / uninstall ----------------------------------------------------------------------


def service_paths(ctx: ServiceHost, config: str | None) -> ServicePaths:
    program = ctx.find_program()
    if program is None:
        raise SupervisorError(
            "cannot find the pensieved executable next to pensievectl or on PATH; "
            "reinstall Pensieve (pip install pensieve) and run this again"
        )
    config_path = Path(config).expanduser().absolute() if config else ctx.default_config()
    return ServicePaths(
        program=program,
        config=config_path.absolute(),
        working_dir=ctx.home.absolute(),
        log=ctx.log_path().absolute(),
    )


def _echoing(ctx: ServiceHost, dry_run: bool) -> CommandRunner:
    """The host's runner, each command shown first; a dry run shows it and runs nothing."""

    def run(argv: Sequence[str]) -> CommandResult:
        ctx.out.write(("would run: " if dry_run else "+ ") + " ".join(argv) + "\n")
        return CommandResult(0) if dry_run else ctx.runner(argv)

    return run


def _write(ctx: ServiceHost, path: Path, text: str, dry_run: bool) -> None:
    if dry_run:
        ctx.out.write(f"would write {path}:\n{text}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: launchd/systemd never read half a file
    ctx.out.write(f"wrote {path}\n")


def _ensure_config(ctx: ServiceHost, config: Path, dry_run: bool) -> None:
    # The service passes --config explicitly, and pensieved refuses a named file that does not
    # exist; create the default one, never touching a file that is already there.
    if config.exists():
        return
    if dry_run:
        ctx.out.write(f"would create the default config {config}\n")
        return
    from pensieve.config import default_config_json

    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(default_config_json())
    ctx.out.write(f"created the default config {config}\n")


def install(ctx: ServiceHost, config: str | None = None, dry_run: bool = False) -> None:
    paths = service_paths(ctx, config)
    if ctx.is_macos:
        _install_launchd(ctx, paths, dry_run)
    elif ctx.platform.startswith("linux"):
        _install_systemd(ctx, paths, dry_run)
    else:
        raise SupervisorError(f"no service manager support for platform {ctx.platform!r}")


def _launchd(ctx: ServiceHost, dry_run: bool) -> Launchd:
    """Our LaunchAgent's driver for install and uninstall: changes echoed (and skipped for a
    dry run); `launchctl print` only reads, so it runs even for a dry run."""
    return Launchd(
        LAUNCHD_LABEL, ctx.plist_path(), ctx.uid, _echoing(ctx, dry_run), query=ctx.runner
    )


def _systemd(ctx: ServiceHost, dry_run: bool) -> Systemd:
    return Systemd(ctx.unit_path(), _echoing(ctx, dry_run))


def _install_launchd(ctx: ServiceHost, paths: ServicePaths, dry_run: bool) -> None:
    homebrew_plist = ctx.plist_path(HOMEBREW_LAUNCHD_LABEL)
    if homebrew_plist.exists():
        raise SupervisorError(
            f"Homebrew already runs Pensieve as a service ({homebrew_plist}); "
            "use `brew services start|stop pensieve` instead"
        )
    _ensure_config(ctx, paths.config, dry_run)
    if not dry_run:
        paths.log.parent.mkdir(parents=True, exist_ok=True)
    _write(ctx, ctx.plist_path(), render_plist(paths), dry_run)
    agent = _launchd(ctx, dry_run)
    # A loaded job keeps its old definition: unload it first so the new plist takes effect.
    if agent.is_loaded():
        agent.unload(check=False)
    agent.load()
    ctx.out.write(
        f"pensieved runs under launchd as {LAUNCHD_LABEL} (starts at login, restarted after a "
        f"crash)\n  config: {paths.config}\n  log:    {paths.log}\n"
        "  stop:   pensievectl stop (until the next login) or pensievectl service uninstall\n"
    )


def _install_systemd(ctx: ServiceHost, paths: ServicePaths, dry_run: bool) -> None:
    _ensure_config(ctx, paths.config, dry_run)
    _write(ctx, ctx.unit_path(), render_systemd_unit(paths), dry_run)
    _systemd(ctx, dry_run).enable()
    ctx.out.write(
        f"pensieved runs under systemd as the user unit {SYSTEMD_UNIT} (restarted after a "
        f"failure)\n  config: {paths.config}\n  log:    journalctl --user -u pensieved\n"
        "  stop:   pensievectl stop (until the next login) or pensievectl service uninstall\n"
        "  To keep it running while you are logged out: loginctl enable-linger\n"
    )


def uninstall(ctx: ServiceHost, dry_run: bool = False) -> None:
    if ctx.is_macos:
        agent = _launchd(ctx, dry_run)
        loaded = agent.is_loaded()
        if not agent.plist.exists() and not loaded:
            ctx.out.write(f"no LaunchAgent {LAUNCHD_LABEL} is installed\n")
            return
        if loaded:
            # bootout sends SIGTERM and waits ExitTimeOut, so in-flight requests drain.
            agent.unload()
        _remove(ctx, agent.plist, dry_run)
    elif ctx.platform.startswith("linux"):
        unit = _systemd(ctx, dry_run)
        if not unit.unit_file.exists():
            ctx.out.write(f"no systemd user unit {unit.unit_file} is installed\n")
            return
        unit.disable()
        _remove(ctx, unit.unit_file, dry_run)
        unit.reload_units()
    else:
        raise SupervisorError(f"no service manager support for platform {ctx.platform!r}")
    ctx.out.write("the Pensieve service is uninstalled (config and logs are kept)\n")


def _remove(ctx: ServiceHost, path: Path, dry_run: bool) -> None:
    if dry_run:
        ctx.out.write(f"would remove {path}\n")
    elif path.exists():
        path.unlink()
        ctx.out.write(f"removed {path}\n")


# ---- detecting and driving the installed service (`start`, `stop`, `status`) ----------


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


def _check(runner: CommandRunner, argv: Sequence[str]) -> None:
    result = runner(argv)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise SupervisorError(f"`{' '.join(argv)}` failed: {detail}")


@dataclass
class Launchd:
    """A LaunchAgent: every launchctl command Pensieve runs, for install, uninstall, start and
    stop alike. `query` runs the read-only `launchctl print` (default: `runner`)."""

    label: str
    plist: Path
    uid: int
    runner: CommandRunner
    keep_alive: object = False
    query: CommandRunner | None = None

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
        query = self.query or self.runner
        return query(["launchctl", "print", self.target]).returncode == 0

    def load(self) -> None:
        """Enable the job (`launchctl disable`, or a `brew services`-style stop, persists across
        bootouts) and bootstrap its plist into the GUI domain."""
        _check(self.runner, ["launchctl", "enable", self.target])
        self._bootstrap()

    def _bootstrap(self) -> None:
        _check(self.runner, ["launchctl", "bootstrap", f"gui/{self.uid}", str(self.plist)])

    def unload(self, *, check: bool = True) -> None:
        """Boot the job out: launchd sends SIGTERM and waits ExitTimeOut, so requests drain."""
        argv = ["launchctl", "bootout", self.target]
        if check:
            _check(self.runner, argv)
        else:
            self.runner(argv)

    def start(self) -> None:
        # As `brew services start` does: bootstrap the plist into the GUI domain if launchd
        # does not know it yet, then kickstart it.
        if not self.is_loaded():
            self._bootstrap()
        _check(self.runner, ["launchctl", "kickstart", self.target])

    def stop(self) -> None:
        self.unload()

    def stop_command(self) -> str:
        if self.label == HOMEBREW_LAUNCHD_LABEL:
            return "brew services stop pensieve"
        return f"launchctl bootout {self.target}"


@dataclass
class Systemd:
    """The systemd user unit: every systemctl command Pensieve runs."""

    unit_file: Path
    runner: CommandRunner
    restart: str = "no"

    @property
    def name(self) -> str:
        return f"systemd --user ({SYSTEMD_UNIT})"

    @property
    def restarts_clean_exit(self) -> bool:
        return self.restart in ("always", "on-success")

    def _systemctl(self, *args: str) -> None:
        _check(self.runner, ["systemctl", "--user", *args])

    def is_loaded(self) -> bool:
        argv = ["systemctl", "--user", "is-active", "--quiet", SYSTEMD_UNIT]
        return self.runner(argv).returncode == 0

    def reload_units(self) -> None:
        self._systemctl("daemon-reload")

    def enable(self) -> None:
        """Read the (new) unit file, then enable the unit and start it now."""
        self.reload_units()
        self._systemctl("enable", "--now", SYSTEMD_UNIT)

    def disable(self) -> None:
        """Stop the unit (systemd sends SIGTERM and waits) and keep it from starting again."""
        self._systemctl("disable", "--now", SYSTEMD_UNIT)

    def start(self) -> None:
        self._systemctl("start", SYSTEMD_UNIT)

    def stop(self) -> None:
        self._systemctl("stop", SYSTEMD_UNIT)

    def stop_command(self) -> str:
        return f"systemctl --user stop {SYSTEMD_UNIT}"


def journal_text(runner: CommandRunner = run_command, lines: int = 300) -> str | None:
    """The systemd user unit's recent journal (its stderr and systemd's own lines about it)."""
    argv = ["journalctl", "--user", "-u", SYSTEMD_UNIT, "-n", str(lines), "-o", "cat"]
    result = runner([*argv, "--no-pager"])
    return result.stdout if result.returncode == 0 else None


def _read_plist(path: Path) -> dict[str, object] | None:
    import plistlib  # deferred: only macOS needs it

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
    runner: CommandRunner = run_command,
    home: Path | None = None,
    uid: int | None = None,
    platform: str = sys.platform,
    environ: dict[str, str] | None = None,
) -> Supervisor | None:
    """The installed service for pensieved, if any (launchd on macOS, systemd elsewhere)."""
    host = ServiceHost(
        platform=platform,
        home=home or Path.home(),
        uid=os.getuid() if uid is None else uid,
        env=dict(os.environ if environ is None else environ),
        runner=runner,
    )
    if host.is_macos:
        for label in LAUNCHD_LABELS:
            plist = host.plist_path(label)
            data = _read_plist(plist)
            if data is not None:
                return Launchd(label, plist, host.uid, runner, data.get("KeepAlive", False))
        return None
    if platform.startswith("linux"):
        unit = host.unit_path()
        try:
            text = unit.read_text(encoding="utf-8")
        except OSError:
            return None
        return Systemd(unit, runner, _systemd_restart(text))
    return None


# ---- command line -----------------------------------------------------------------------------


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `service install|uninstall` to pensievectl's parser."""
    parser = subparsers.add_parser(
        "service",
        help="install or remove the per-user launchd agent (macOS) or systemd unit (Linux)",
        description="Run pensieved always for this user: on macOS a LaunchAgent loaded with "
        "launchctl, on Linux a systemd user unit. Homebrew users use `brew services` instead.",
    )
    actions = parser.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("install", "write the agent or unit for the current pensieved and start it"),
        ("uninstall", "stop the service and remove its agent or unit (config and logs stay)"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument(
            "--dry-run",
            action="store_true",
            help="print the file and the commands instead of writing or running anything",
        )


def run_service(
    ctx: CommandContext, action: str, *, dry_run: bool, host: ServiceHost | None = None
) -> int:
    """`pensievectl service install|uninstall`; failures are raised to the dispatcher."""
    host = host or ServiceHost(out=ctx.out)
    if action == "install":
        install(host, ctx.config_arg, dry_run)
    else:
        uninstall(host, dry_run)
    return int(CtlExit.OK)
