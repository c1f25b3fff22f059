"""`pensievectl service install|uninstall`: run pensieved always, under the user's own supervisor.

On macOS that is a LaunchAgent in ~/Library/LaunchAgents loaded with `launchctl bootstrap
gui/UID`; on Linux a systemd user unit enabled with `systemctl --user`. Rendering is pure
(paths in, text out) and every OS command goes through an injectable runner, so the macOS path
is tested on Linux with a fake runner.

The templates are kept here rather than read from packaging/ at run time because packaging/ is
not part of the wheel; tests keep packaging/launchd and packaging/systemd identical to them.
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
from typing import TextIO
from xml.sax.saxutils import escape as xml_escape

LAUNCHD_LABEL = "dev.pensieve.pensieved"
# `brew services` names its agent after the formula; two agents would fight over the port.
HOMEBREW_LAUNCHD_LABEL = "homebrew.mxcl.pensieve"
SYSTEMD_UNIT = "pensieved.service"
LOG_FILE_NAME = "pensieved.log"

PLIST_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!--
  LaunchAgent for a pip-installed pensieved; `pensievectl service install` fills in the
  placeholders with XML-escaped absolute paths and loads it with `launchctl bootstrap`.
  KeepAlive restarts pensieved only after an unsuccessful exit, so `pensievectl stop` (a
  clean exit 0) stays stopped while a crash is restarted. ExitTimeOut gives the daemon's
  15 s drain (plus up to 5 s to end what is left) room before launchd sends SIGKILL.
-->
<plist version="1.0">
<dict>
\t<key>Label</key>
\t<string>${label}</string>
\t<key>ProgramArguments</key>
\t<array>
\t\t<string>${program}</string>
\t\t<string>--config</string>
\t\t<string>${config}</string>
\t</array>
\t<key>RunAtLoad</key>
\t<true/>
\t<key>KeepAlive</key>
\t<dict>
\t\t<key>SuccessfulExit</key>
\t\t<false/>
\t</dict>
\t<key>ThrottleInterval</key>
\t<integer>10</integer>
\t<key>ExitTimeOut</key>
\t<integer>30</integer>
\t<key>ProcessType</key>
\t<string>Interactive</string>
\t<key>WorkingDirectory</key>
\t<string>${working_dir}</string>
\t<key>StandardOutPath</key>
\t<string>${log}</string>
\t<key>StandardErrorPath</key>
\t<string>${log}</string>
</dict>
</plist>
"""

SYSTEMD_TEMPLATE = """\
# systemd user unit for pensieved; `pensievectl service install` fills in the
# placeholders with quoted absolute paths and enables it with `systemctl --user enable --now`.
# Restart=on-failure mirrors the launchd agent's KeepAlive: a crash or a non-zero exit is
# restarted, a clean exit after `pensievectl stop` is not. Logs go to the journal:
# `journalctl --user -u pensieved`.
[Unit]
Description=Pensieve local LLM server (Anthropic Messages API)
Documentation=man:pensieved(8) man:pensievectl(1)

[Service]
Type=simple
ExecStart=${program} --config ${config}
ExecReload=/bin/kill -HUP $$MAINPID
WorkingDirectory=${working_dir}
Restart=on-failure
RestartSec=10
# Longer than the daemon's drain (15 s) plus the 5 s it gives unfinished requests to end.
TimeoutStopSec=30

[Install]
WantedBy=default.target
"""


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
    return Template(PLIST_TEMPLATE).substitute({k: xml_escape(v) for k, v in values.items()})


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
    return Template(SYSTEMD_TEMPLATE).substitute(
        program=systemd_quote(str(paths.program)),
        config=systemd_quote(str(paths.config)),
        working_dir=systemd_quote(str(paths.working_dir)),
    )


# ---- the OS boundary ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str]], RunResult]


def subprocess_runner(argv: Sequence[str]) -> RunResult:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return RunResult(127, "", f"{argv[0]}: command not found")
    return RunResult(done.returncode, done.stdout, done.stderr)


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


def _default_config_path() -> Path:
    from pensieve.paths import default_config_path

    return default_config_path()


@dataclass
class Context:
    """What the install/uninstall steps read from the machine; tests substitute all of it."""

    platform: str = field(default_factory=lambda: sys.platform)
    home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=os.getuid)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    runner: Runner = subprocess_runner
    find_program: Callable[[], Path | None] = _find_pensieved
    default_config: Callable[[], Path] = _default_config_path
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def is_macos(self) -> bool:
        return self.platform == "darwin"

    def launch_agents_dir(self) -> Path:
        return self.home / "Library" / "LaunchAgents"

    def plist_path(self, label: str = LAUNCHD_LABEL) -> Path:
        return self.launch_agents_dir() / f"{label}.plist"

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


def launch_agent_path(home: Path | None = None) -> Path:
    """Where `service install` puts the LaunchAgent (for `pensievectl start/stop` to look)."""
    return Context(home=home or Path.home()).plist_path()


class ServiceError(Exception):
    pass


# ---- install / uninstall ----------------------------------------------------------------------


def service_paths(ctx: Context, config: str | None) -> ServicePaths:
    program = ctx.find_program()
    if program is None:
        raise ServiceError(
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


def _run(ctx: Context, argv: list[str], dry_run: bool, *, may_fail: bool = False) -> RunResult:
    ctx.out.write(("would run: " if dry_run else "+ ") + " ".join(argv) + "\n")
    if dry_run:
        return RunResult(0)
    result = ctx.runner(argv)
    if result.returncode != 0 and not may_fail:
        detail = (result.stderr or result.stdout).strip()
        raise ServiceError(f"`{' '.join(argv)}` failed ({result.returncode}): {detail}")
    return result


def _write(ctx: Context, path: Path, text: str, dry_run: bool) -> None:
    if dry_run:
        ctx.out.write(f"would write {path}:\n{text}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: launchd/systemd never read half a file
    ctx.out.write(f"wrote {path}\n")


def _ensure_config(ctx: Context, config: Path, dry_run: bool) -> None:
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


def install(ctx: Context, config: str | None = None, dry_run: bool = False) -> None:
    paths = service_paths(ctx, config)
    if ctx.is_macos:
        _install_launchd(ctx, paths, dry_run)
    elif ctx.platform.startswith("linux"):
        _install_systemd(ctx, paths, dry_run)
    else:
        raise ServiceError(f"no service manager support for platform {ctx.platform!r}")


def _launchd_loaded(ctx: Context) -> bool:
    return ctx.runner(["launchctl", "print", ctx.service_target()]).returncode == 0


def _install_launchd(ctx: Context, paths: ServicePaths, dry_run: bool) -> None:
    homebrew_plist = ctx.plist_path(HOMEBREW_LAUNCHD_LABEL)
    if homebrew_plist.exists():
        raise ServiceError(
            f"Homebrew already runs Pensieve as a service ({homebrew_plist}); "
            "use `brew services start|stop pensieve` instead"
        )
    _ensure_config(ctx, paths.config, dry_run)
    if not dry_run:
        paths.log.parent.mkdir(parents=True, exist_ok=True)
    plist = ctx.plist_path()
    _write(ctx, plist, render_plist(paths), dry_run)
    # A loaded job keeps its old definition: unload it first so the new plist takes effect.
    # (`launchctl print` only reads, so it runs even for --dry-run.)
    if _launchd_loaded(ctx):
        _run(ctx, ["launchctl", "bootout", ctx.service_target()], dry_run, may_fail=True)
    # `launchctl disable` (or an earlier `brew services`-style stop) persists across bootouts.
    _run(ctx, ["launchctl", "enable", ctx.service_target()], dry_run)
    _run(ctx, ["launchctl", "bootstrap", ctx.domain(), str(plist)], dry_run)
    ctx.out.write(
        f"pensieved runs under launchd as {LAUNCHD_LABEL} (starts at login, restarted after a "
        f"crash)\n  config: {paths.config}\n  log:    {paths.log}\n"
        "  stop:   pensievectl stop (until the next login) or pensievectl service uninstall\n"
    )


def _install_systemd(ctx: Context, paths: ServicePaths, dry_run: bool) -> None:
    _ensure_config(ctx, paths.config, dry_run)
    _write(ctx, ctx.unit_path(), render_systemd_unit(paths), dry_run)
    _run(ctx, ["systemctl", "--user", "daemon-reload"], dry_run)
    _run(ctx, ["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT], dry_run)
    ctx.out.write(
        f"pensieved runs under systemd as the user unit {SYSTEMD_UNIT} (restarted after a "
        f"failure)\n  config: {paths.config}\n  log:    journalctl --user -u pensieved\n"
        "  stop:   pensievectl stop (until the next login) or pensievectl service uninstall\n"
        "  To keep it running while you are logged out: loginctl enable-linger\n"
    )


def uninstall(ctx: Context, dry_run: bool = False) -> None:
    if ctx.is_macos:
        plist = ctx.plist_path()
        loaded = _launchd_loaded(ctx)
        if not plist.exists() and not loaded:
            ctx.out.write(f"no LaunchAgent {LAUNCHD_LABEL} is installed\n")
            return
        if loaded:
            # bootout sends SIGTERM and waits ExitTimeOut, so in-flight requests drain.
            _run(ctx, ["launchctl", "bootout", ctx.service_target()], dry_run)
        _remove(ctx, plist, dry_run)
    elif ctx.platform.startswith("linux"):
        unit = ctx.unit_path()
        if not unit.exists():
            ctx.out.write(f"no systemd user unit {unit} is installed\n")
            return
        _run(ctx, ["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT], dry_run)
        _remove(ctx, unit, dry_run)
        _run(ctx, ["systemctl", "--user", "daemon-reload"], dry_run)
    else:
        raise ServiceError(f"no service manager support for platform {ctx.platform!r}")
    ctx.out.write("the Pensieve service is uninstalled (config and logs are kept)\n")


def _remove(ctx: Context, path: Path, dry_run: bool) -> None:
    if dry_run:
        ctx.out.write(f"would remove {path}\n")
    elif path.exists():
        path.unlink()
        ctx.out.write(f"removed {path}\n")


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
    parser.set_defaults(service_run=run)


def run(args: argparse.Namespace, ctx: Context | None = None) -> int:
    from pensieve.exitcodes import CtlExit

    ctx = ctx or Context()
    try:
        if args.service_command == "install":
            install(ctx, getattr(args, "config", None), args.dry_run)
        else:
            uninstall(ctx, args.dry_run)
    except ServiceError as exc:
        ctx.err.write(f"pensievectl service {args.service_command}: {exc}\n")
        return CtlExit.FAILURE
    return CtlExit.OK
