"""`pensievectl service install|uninstall`: the files it writes and the commands it runs.

The macOS path runs here on Linux through a fake runner: what matters is the plist launchd
would read and the launchctl calls, both of which are plain data.
"""

from __future__ import annotations

import io
import json
import plistlib
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from pensieve.config import Config, load_config_file
from pensieve.exitcodes import CtlExit
from pensievectl import cli, service
from pensievectl.service import (
    HOMEBREW_LAUNCHD_LABEL,
    LAUNCHD_LABEL,
    CommandResult,
    Launchd,
    ServiceHost,
    ServicePaths,
    Systemd,
    find_supervisor,
    journal_text,
)

REPO = Path(__file__).resolve().parents[2]
UID = 501
DRAIN_S = Config().server.drain_timeout_ms / 1000
# After the drain the daemon gives unfinished requests up to 5 s more to end (daemon._drain).
WORST_CASE_STOP_S = DRAIN_S + 5


class FakeRunner:
    """Records commands; `launchctl print` reports the job as loaded or not."""

    def __init__(self, loaded: bool = False, fail: str | None = None) -> None:
        self.loaded = loaded
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail and self.fail in argv:
            return CommandResult(5, "", "Bootstrap failed: 5: Input/output error")
        if argv[:2] == ["launchctl", "print"]:
            return CommandResult(0 if self.loaded else 113, "", "")
        return CommandResult(0)

    def mutating(self) -> list[list[str]]:
        return [c for c in self.calls if c[:2] != ["launchctl", "print"]]


def make_program(tmp_path: Path) -> Path:
    program = tmp_path / "venv dir" / "bin" / "pensieved"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


def make_ctx(tmp_path: Path, platform: str, runner: FakeRunner) -> ServiceHost:
    home = tmp_path / "home"
    home.mkdir()
    program = make_program(tmp_path)
    if platform == "darwin":
        config = home / "Library" / "Application Support" / "pensieve" / "config.json"
    else:
        config = home / ".config" / "pensieve" / "config.json"
    return ServiceHost(
        platform=platform,
        home=home,
        uid=UID,
        env={},
        runner=runner,
        find_program=lambda: program,
        default_config=lambda: config,
        out=io.StringIO(),
    )


def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: ServiceHost,
    *argv: str,
) -> tuple[int, str]:
    """`pensievectl ARGV` through the real parser and dispatcher, on a fake host: the exit
    status and what was printed on stderr."""
    monkeypatch.setattr(service, "ServiceHost", lambda **_: host)
    capsys.readouterr()
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def sample_paths(root: Path) -> ServicePaths:
    return ServicePaths(
        program=root / "bin" / "pensieved",
        config=root / "Application Support" / "pensieve" / "config.json",
        working_dir=root,
        log=root / "Library" / "Logs" / "pensieve" / "pensieved.log",
    )


# ---- rendering ------------------------------------------------------------------------------


def test_plist_has_the_required_keys(tmp_path: Path) -> None:
    paths = sample_paths(tmp_path)
    plist = plistlib.loads(service.render_plist(paths).encode())
    assert plist["Label"] == "dev.pensieve.pensieved"
    assert plist["ProgramArguments"] == [str(paths.program), "--config", str(paths.config)]
    assert plist["RunAtLoad"] is True
    # A clean exit (pensievectl stop) must stay stopped; a crash or error exit is restarted.
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 5
    assert plist["ExitTimeOut"] > WORST_CASE_STOP_S
    assert plist["ProcessType"] == "Interactive"
    assert plist["WorkingDirectory"] == str(paths.working_dir)
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(paths.log)
    for key in ("WorkingDirectory", "StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_absolute()
    assert all(Path(a).is_absolute() for a in plist["ProgramArguments"] if a != "--config")


def test_plist_escapes_xml_in_paths(tmp_path: Path) -> None:
    paths = sample_paths(tmp_path / "R&D <models> \"x\" 'y'")
    plist = plistlib.loads(service.render_plist(paths).encode())
    assert plist["ProgramArguments"][0] == str(paths.program)
    assert plist["StandardErrorPath"] == str(paths.log)


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        ServicePaths(
            program=Path("bin/pensieved"),
            config=tmp_path / "c.json",
            working_dir=tmp_path,
            log=tmp_path / "l.log",
        )


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A strict reading of a unit file: sections, and every key's values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_well_formed(tmp_path: Path) -> None:
    paths = sample_paths(tmp_path)
    unit = parse_unit(service.render_systemd_unit(paths))
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["Type"] == ["simple"]  # pensieved never forks
    exec_start = svc["ExecStart"][0]
    assert exec_start.startswith(str(paths.program))
    # The config path has a space: it must arrive as one quoted word.
    assert exec_start.endswith(f'--config "{paths.config}"')
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert float(svc["TimeoutStopSec"][0]) > WORST_CASE_STOP_S
    assert unit["Install"]["WantedBy"] == ["default.target"]


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        ("/usr/bin/pensieved", "/usr/bin/pensieved"),
        ("/Users/a b/c.json", '"/Users/a b/c.json"'),
        ("/tmp/100%/x", "/tmp/100%%/x"),
        ('/tmp/q"uote', '"/tmp/q\\"uote"'),
        ("/tmp/$HOME", '"/tmp/$$HOME"'),
    ],
)
def test_systemd_quote(raw: str, quoted: str) -> None:
    assert service.systemd_quote(raw) == quoted


def man_path_with_our_pages(tmp_path: Path) -> Path:
    """A MANPATH holding the committed pages, for the unit's Documentation= check."""
    root = tmp_path / "man"
    for page in (REPO / "man").glob("*.[0-9]"):
        section_dir = root / f"man{page.suffix[1:]}"
        section_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section_dir / page.name)
    return root


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: only the structural unit check ran")
    pensieved = REPO / ".venv" / "bin" / "pensieved"
    if not pensieved.exists():
        pensieved = Path(shutil.which("pensieved") or "/nonexistent")
    paths = ServicePaths(
        program=pensieved,
        config=tmp_path / "a dir" / "config.json",
        working_dir=tmp_path,
        log=tmp_path / "pensieved.log",
    )
    unit = tmp_path / "pensieved.service"
    unit.write_text(service.render_systemd_unit(paths))
    env = {"PATH": "/usr/bin:/bin", "MANPATH": str(man_path_with_our_pages(tmp_path))}
    # System mode: --user needs a running user manager, which CI containers lack; the unit's
    # syntax and settings are the same in both.
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, env=env, timeout=60
    )
    # Unknown keys and bad values are only warnings (exit 0), so the output must be empty too.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout


# ---- install / uninstall on macOS (fake launchctl) -------------------------------------------


def test_macos_install_writes_the_agent_and_bootstraps_it(tmp_path: Path) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "darwin", runner)
    service.install(ctx)

    plist_path = ctx.home / "Library" / "LaunchAgents" / "dev.pensieve.pensieved.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    config = ctx.default_config()
    assert plist["ProgramArguments"] == [str(ctx.find_program()), "--config", str(config)]
    log = ctx.home / "Library" / "Logs" / "pensieve" / "pensieved.log"
    assert plist["StandardErrorPath"] == str(log)
    assert log.parent.is_dir()
    assert plist["WorkingDirectory"] == str(ctx.home)
    assert runner.mutating() == [
        ["launchctl", "enable", f"gui/{UID}/dev.pensieve.pensieved"],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist_path)],
    ]
    # The default config it created is one pensieved accepts.
    assert load_config_file(config, missing_ok=False) == Config()


def test_macos_install_keeps_an_existing_config(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, "darwin", FakeRunner())
    config = ctx.default_config()
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"server": {"port": 9000}}))
    service.install(ctx)
    assert json.loads(config.read_text()) == {"server": {"port": 9000}}


def test_macos_install_with_explicit_config(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, "darwin", FakeRunner())
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    service.install(ctx, config=str(mine))
    plist = plistlib.loads(ctx.plist_path().read_bytes())
    assert plist["ProgramArguments"][1:] == ["--config", str(mine)]


def test_macos_reinstall_unloads_the_old_job_first(tmp_path: Path) -> None:
    runner = FakeRunner(loaded=True)
    ctx = make_ctx(tmp_path, "darwin", runner)
    service.install(ctx)
    verbs = [c[1] for c in runner.mutating()]
    assert verbs == ["bootout", "enable", "bootstrap"]


def test_macos_dry_run_changes_nothing(tmp_path: Path) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "darwin", runner)
    service.install(ctx, dry_run=True)
    assert runner.mutating() == []
    assert not ctx.plist_path().exists()
    assert not ctx.default_config().exists()
    out = ctx.out.getvalue()  # type: ignore[attr-defined]
    assert "<key>Label</key>" in out
    assert f"would run: launchctl bootstrap gui/{UID} {ctx.plist_path()}" in out


def test_macos_install_refuses_next_to_a_homebrew_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "darwin", runner)
    brew_plist = ctx.plist_path("homebrew.mxcl.pensieve")
    brew_plist.parent.mkdir(parents=True)
    brew_plist.write_text("")
    status, err = run_cli(monkeypatch, capsys, ctx, "service", "install")
    assert status == CtlExit.FAILURE
    assert err.startswith("pensievectl: Homebrew already runs") and "brew services" in err
    assert not ctx.plist_path().exists()
    assert runner.mutating() == []


def test_macos_install_reports_a_failing_launchctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = make_ctx(tmp_path, "darwin", FakeRunner(fail="bootstrap"))
    status, err = run_cli(monkeypatch, capsys, ctx, "service", "install")
    assert status == CtlExit.FAILURE
    assert err.startswith("pensievectl: `launchctl bootstrap") and "Input/output error" in err


def test_macos_uninstall_boots_out_and_removes(tmp_path: Path) -> None:
    runner = FakeRunner(loaded=True)
    ctx = make_ctx(tmp_path, "darwin", runner)
    service.install(ctx)
    runner.calls.clear()
    service.uninstall(ctx)
    assert runner.mutating() == [["launchctl", "bootout", f"gui/{UID}/dev.pensieve.pensieved"]]
    assert not ctx.plist_path().exists()
    assert ctx.default_config().exists()  # the user's config stays


def test_macos_uninstall_when_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner(loaded=False)
    ctx = make_ctx(tmp_path, "darwin", runner)
    assert run_cli(monkeypatch, capsys, ctx, "service", "uninstall") == (CtlExit.OK, "")
    assert "no LaunchAgent" in ctx.out.getvalue()  # type: ignore[attr-defined]
    assert runner.mutating() == []


# ---- install / uninstall on Linux (fake systemctl) -------------------------------------------


def test_linux_install_writes_a_user_unit_and_enables_it(tmp_path: Path) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "linux", runner)
    ctx.env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    service.install(ctx)
    unit_path = tmp_path / "xdg" / "systemd" / "user" / "pensieved.service"
    unit = parse_unit(unit_path.read_text())
    program = ctx.find_program()
    assert program is not None
    # The program's directory has a space ("venv dir"), so it is quoted.
    assert unit["Service"]["ExecStart"] == [f'"{program}" --config {ctx.default_config()}']
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "pensieved.service"],
    ]
    assert ctx.default_config().exists()


def test_linux_uninstall(tmp_path: Path) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "linux", runner)
    service.install(ctx)
    runner.calls.clear()
    service.uninstall(ctx)
    assert not ctx.unit_path().exists()
    assert runner.calls == [
        ["systemctl", "--user", "disable", "--now", "pensieved.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_unsupported_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = make_ctx(tmp_path, "win32", FakeRunner())
    status, err = run_cli(monkeypatch, capsys, ctx, "service", "install")
    assert status == CtlExit.FAILURE and "win32" in err


def test_missing_pensieved_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = make_ctx(tmp_path, "linux", FakeRunner())
    ctx.find_program = lambda: None
    status, err = run_cli(monkeypatch, capsys, ctx, "service", "install")
    assert status == CtlExit.FAILURE
    assert err.startswith("pensievectl: cannot find the pensieved executable")


# ---- the command line -------------------------------------------------------------------------


def test_service_goes_through_the_dispatcher_with_the_global_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, "linux", runner)
    mine = tmp_path / "mine.json"
    argv = ("--config", str(mine), "service", "install", "--dry-run")
    assert run_cli(monkeypatch, capsys, ctx, *argv) == (CtlExit.OK, "")
    assert runner.calls == []
    out = ctx.out.getvalue()  # type: ignore[attr-defined]
    assert f"--config {mine}" in out and "would run: systemctl --user enable --now" in out
    with pytest.raises(SystemExit) as usage:
        cli.main(["service"])  # an action is required
    assert usage.value.code == CtlExit.USAGE


# ---- agreement with `pensievectl start/stop` (the same module) -----------------------


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_supervisor_finds_the_installed_service_and_a_clean_stop_sticks(
    tmp_path: Path, platform: str
) -> None:
    runner = FakeRunner()
    ctx = make_ctx(tmp_path, platform, runner)
    service.install(ctx)
    found = find_supervisor(
        runner=runner, home=ctx.home, uid=UID, platform=platform, environ=ctx.env
    )
    assert found is not None, "pensievectl start/stop would not see the installed service"
    # `pensievectl stop` makes pensieved exit 0; the service must not bring it back.
    assert found.restarts_clean_exit is False


# ---- detecting and driving the installed service, with a fake runner -------------------------


class FailingRunner:
    def __init__(self, failing: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.failing = failing or set()

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        failed = any(word in self.failing for word in argv)
        return CommandResult(1 if failed else 0, "", "boom" if failed else "")


def _plist(home: Path, label: str, keep_alive: object) -> Path:
    path = home / "Library" / "LaunchAgents" / f"{label}.plist"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps({"Label": label, "KeepAlive": keep_alive}))
    return path


def test_no_agent_means_no_supervisor(tmp_path: Path) -> None:
    runner = FailingRunner()
    assert find_supervisor(runner=runner, home=tmp_path, uid=501, platform="darwin") is None
    linux = find_supervisor(runner=runner, home=tmp_path, uid=501, platform="linux", environ={})
    assert linux is None


def test_homebrew_agent_is_found_and_started_through_launchd(tmp_path: Path) -> None:
    plist = _plist(tmp_path, HOMEBREW_LAUNCHD_LABEL, True)
    _plist(tmp_path, LAUNCHD_LABEL, {"SuccessfulExit": False})
    runner = FailingRunner(failing={"print"})  # not loaded yet
    found = find_supervisor(runner=runner, home=tmp_path, uid=501, platform="darwin")
    assert isinstance(found, Launchd)
    assert found.label == HOMEBREW_LAUNCHD_LABEL
    assert found.restarts_clean_exit
    assert found.stop_command() == "brew services stop pensieve"
    found.start()
    assert runner.calls == [
        ["launchctl", "print", "gui/501/homebrew.mxcl.pensieve"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
        ["launchctl", "kickstart", "gui/501/homebrew.mxcl.pensieve"],
    ]


def test_loaded_agent_is_only_kickstarted_and_stopped_with_bootout(tmp_path: Path) -> None:
    _plist(tmp_path, LAUNCHD_LABEL, {"SuccessfulExit": False})
    runner = FailingRunner()
    found = find_supervisor(runner=runner, home=tmp_path, uid=501, platform="darwin")
    assert isinstance(found, Launchd)
    assert not found.restarts_clean_exit, "KeepAlive {SuccessfulExit: false} lets exit 0 stand"
    found.start()
    assert runner.calls[-1] == ["launchctl", "kickstart", "gui/501/dev.pensieve.pensieved"]
    assert ["launchctl", "bootstrap", "gui/501", str(found.plist)] not in runner.calls
    found.stop()
    assert runner.calls[-1] == ["launchctl", "bootout", "gui/501/dev.pensieve.pensieved"]
    assert found.stop_command() == "launchctl bootout gui/501/dev.pensieve.pensieved"


def test_launchctl_failure_is_reported(tmp_path: Path) -> None:
    _plist(tmp_path, LAUNCHD_LABEL, True)
    found = find_supervisor(
        runner=FailingRunner(failing={"kickstart"}), home=tmp_path, uid=501, platform="darwin"
    )
    assert found is not None
    try:
        found.start()
    except Exception as exc:
        assert "launchctl kickstart" in str(exc) and "boom" in str(exc)
    else:
        raise AssertionError("expected a SupervisorError")


def test_systemd_user_unit(tmp_path: Path) -> None:
    unit = tmp_path / "cfg" / "systemd" / "user" / "pensieved.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/x/pensieved\nRestart=always\n")
    runner = FailingRunner()
    found = find_supervisor(
        runner=runner,
        home=tmp_path,
        uid=1000,
        platform="linux",
        environ={"XDG_CONFIG_HOME": str(tmp_path / "cfg")},
    )
    assert isinstance(found, Systemd)
    assert found.restarts_clean_exit
    assert found.is_loaded()
    found.start()
    found.stop()
    assert runner.calls[-2:] == [
        ["systemctl", "--user", "start", "pensieved.service"],
        ["systemctl", "--user", "stop", "pensieved.service"],
    ]
    unit.write_text("[Service]\nRestart=on-failure\n")
    again = find_supervisor(
        runner=runner,
        home=tmp_path,
        uid=1000,
        platform="linux",
        environ={"XDG_CONFIG_HOME": str(tmp_path / "cfg")},
    )
    assert again is not None and not again.restarts_clean_exit


def test_journal_text_reads_the_units_journal() -> None:
    runner = FailingRunner()
    assert journal_text(runner) == ""
    assert runner.calls == [
        ["journalctl", "--user", "-u", "pensieved.service", "-n", "300", "-o", "cat", "--no-pager"]
    ]
    assert journal_text(FailingRunner(failing={"journalctl"})) is None
