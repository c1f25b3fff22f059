"""launchd/systemd detection and commands, with a fake runner (runs on Linux)."""

from __future__ import annotations

import plistlib
from collections.abc import Sequence
from pathlib import Path

from pensievectl.supervisor import (
    AGENT_LABEL,
    HOMEBREW_LABEL,
    Launchd,
    RunResult,
    Systemd,
    find_supervisor,
    journal_text,
)


class FakeRunner:
    def __init__(self, failing: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.failing = failing or set()

    def __call__(self, argv: Sequence[str]) -> RunResult:
        self.calls.append(list(argv))
        failed = any(word in self.failing for word in argv)
        return RunResult(1 if failed else 0, "", "boom" if failed else "")


def _plist(home: Path, label: str, keep_alive: object) -> Path:
    path = home / "Library" / "LaunchAgents" / f"{label}.plist"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps({"Label": label, "KeepAlive": keep_alive}))
    return path


def test_no_agent_means_no_supervisor(tmp_path: Path) -> None:
    assert find_supervisor(runner=FakeRunner(), home=tmp_path, uid=501, platform="darwin") is None
    assert (
        find_supervisor(runner=FakeRunner(), home=tmp_path, uid=501, platform="linux", environ={})
        is None
    )


def test_homebrew_agent_is_found_and_started_through_launchd(tmp_path: Path) -> None:
    plist = _plist(tmp_path, HOMEBREW_LABEL, True)
    _plist(tmp_path, AGENT_LABEL, {"SuccessfulExit": False})
    runner = FakeRunner(failing={"print"})  # not loaded yet
    found = find_supervisor(runner=runner, home=tmp_path, uid=501, platform="darwin")
    assert isinstance(found, Launchd)
    assert found.label == HOMEBREW_LABEL
    assert found.restarts_clean_exit
    assert found.stop_command() == "brew services stop pensieve"
    found.start()
    assert runner.calls == [
        ["launchctl", "print", "gui/501/homebrew.mxcl.pensieve"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
        ["launchctl", "kickstart", "gui/501/homebrew.mxcl.pensieve"],
    ]


def test_loaded_agent_is_only_kickstarted_and_stopped_with_bootout(tmp_path: Path) -> None:
    _plist(tmp_path, AGENT_LABEL, {"SuccessfulExit": False})
    runner = FakeRunner()
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
    _plist(tmp_path, AGENT_LABEL, True)
    found = find_supervisor(
        runner=FakeRunner(failing={"kickstart"}), home=tmp_path, uid=501, platform="darwin"
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
    runner = FakeRunner()
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
    runner = FakeRunner()
    assert journal_text(runner) == ""
    assert runner.calls == [
        ["journalctl", "--user", "-u", "pensieved.service", "-n", "300", "-o", "cat", "--no-pager"]
    ]
    assert journal_text(FakeRunner(failing={"journalctl"})) is None
