"""pensievectl's parser and its offline commands (no daemon needed)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest

from pensieve.config import load_config_file
from pensieve.exitcodes import CtlExit
from pensievectl import cli
from pensievectl.context import CommandContext
from pensievectl.lifecycle import run_stop


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_statuses_follow_lsb_for_status() -> None:
    assert (CtlExit.OK, CtlExit.NOT_RUNNING, CtlExit.UNKNOWN) == (0, 3, 4)


def test_parser_has_every_command() -> None:
    parser = cli.build_parser()
    for argv in (
        ["start"],
        ["stop"],
        ["status", "--json"],
        ["validate", "x.json"],
        ["reload"],
        ["config", "show"],
        ["config", "generate", "--output", "x"],
    ):
        assert parser.parse_args(["--socket", "/tmp/s", *argv]).command == argv[0]
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])
    assert info.value.code == CtlExit.USAGE


def test_config_generate_writes_a_file_the_daemon_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.json"
    code, _, err = _run(["config", "generate", "--output", str(out)], capsys)
    assert code == 0 and str(out) in err
    load_config_file(out)
    code, _, err = _run(["config", "generate", "--output", str(out)], capsys)
    assert code == 1 and "already exists" in err
    code, stdout, _ = _run(["config", "generate"], capsys)
    assert code == 0 and json.loads(stdout)["server"]["port"] == 8080


def test_config_show_names_the_source_of_each_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"port": 9001}, "logging": {"level": "debug"}}))
    sock = "/tmp/pv-flag.sock"
    code, out, _ = _run(
        ["--config", str(config), "--socket", sock, "config", "show", "--json"], capsys
    )
    assert code == 0
    shown = json.loads(out)
    assert shown["values"]["server"]["port"] == 9001
    assert shown["sources"]["server.port"] == "file"
    assert shown["sources"]["logging.level"] == "file"
    assert shown["sources"]["server.host"] == "default"
    assert shown["sources"]["server.socket_path"] == "flag"
    assert shown["values"]["server"]["socket_path"] == sock
    code, out, _ = _run(["--config", str(config), "config", "show"], capsys)
    assert "server.port = 9001  [file]" in out
    assert 'model.context_size = "auto"  [default]' in out
    # No daemon runs this config: where the choice will be shown instead.
    assert "# auto sizes: chosen when the model loads" in out
    assert "auto_sizes" in json.loads(
        _run(["--config", str(config), "config", "show", "--json"], capsys)[1]
    )


def test_config_show_of_an_invalid_file_fails_with_key_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"port": -1}}))
    code, _, err = _run(["--config", str(config), "config", "show"], capsys)
    assert code == 1 and "server.port" in err


class _FakeSupervisor:
    name = "launchd (homebrew.mxcl.pensieve)"
    restarts_clean_exit = True

    def __init__(self) -> None:
        self.stopped = False

    def is_loaded(self) -> bool:
        return True

    def start(self) -> None:
        raise AssertionError("not expected")

    def stop(self) -> None:
        self.stopped = True

    def stop_command(self) -> str:
        return "brew services stop pensieve"


def test_stop_goes_through_launchd_when_keepalive_would_restart() -> None:
    supervisor = _FakeSupervisor()
    out, err = io.StringIO(), io.StringIO()
    sock = str(Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp")) / "none.sock")
    ctx = CommandContext(socket_arg=sock, out=out, err=err)
    assert run_stop(ctx, timeout=1.0, find_supervisor=lambda: supervisor) == 0
    assert supervisor.stopped
    assert "brew services stop pensieve" in err.getvalue()
