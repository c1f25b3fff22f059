"""Finding the daemon for a config file: the file's socket_path, else its run record."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pensieve import runrecord
from pensieve.paths import default_socket_path
from pensieve.runrecord import RunRecord, write_record
from pensievectl.discovery import locate


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runrecord, "runtime_dir", lambda: tmp_path / "runtime")
    monkeypatch.delenv("PENSIEVE_SOCKET", raising=False)


@pytest.fixture
def listening() -> Iterator[Path]:
    """A live socket of ours, as a running daemon's."""
    path = Path(tempfile.mkdtemp(prefix="pvd-", dir="/tmp")) / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)
        yield path
    path.unlink()
    path.parent.rmdir()


def _record(config: Path, sock: Path, pid: int | None = None) -> RunRecord:
    return RunRecord(
        pid=os.getpid() if pid is None else pid,
        config_path=str(config.resolve()),
        socket_path=str(sock),
        started_at=0.0,
        version="0.1.0",
    )


def test_a_readable_file_decides(tmp_path: Path, listening: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"socket_path": str(listening)}}))
    found = locate(config, None)
    assert (found.socket_path, found.found_by) == (listening, "config")
    config.write_text(json.dumps({"server": {"port": 1}}))
    assert locate(config, None).socket_path == default_socket_path()
    assert locate(config, "/tmp/flag.sock").socket_path == Path("/tmp/flag.sock")


def test_a_broken_file_falls_back_to_the_record(tmp_path: Path, listening: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"server": {"socket_path": "/elsewhere.sock"')  # missing braces
    write_record(_record(config, listening))
    found = locate(config, None)
    assert (found.socket_path, found.found_by) == (listening, "record")
    assert found.config_problem is not None and found.config_problem.startswith("(json): ")
    assert "line 1" in found.config_problem
    assert found.record is not None and found.dead is None


def test_without_a_record_a_broken_file_means_the_default(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text("{")
    found = locate(config, None)
    assert (found.socket_path, found.found_by) == (default_socket_path(), "default")


def test_a_record_whose_daemon_died_is_evidence_not_a_location(
    tmp_path: Path, listening: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text("{")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_record(_record(config, listening, pid=child.pid))
    found = locate(config, None)
    assert found.found_by == "default" and found.record is None
    assert found.dead is not None and found.dead.pid == child.pid


def test_a_record_whose_socket_is_not_ours_is_not_trusted(
    tmp_path: Path, listening: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.json"
    config.write_text("{")
    write_record(_record(config, listening))
    real_stat = os.lstat

    def foreign(path: object, *args: object, **kwargs: object) -> os.stat_result:
        info = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path) != str(listening):
            return info
        fields = list(info)
        fields[4] = os.getuid() + 4242  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", foreign)
    found = locate(config, None)
    assert found.found_by == "default" and found.record is None


def test_a_changed_socket_path_still_finds_the_running_daemon(
    tmp_path: Path, listening: Path
) -> None:
    # server.socket_path applies at the next start: the daemon is still on the old one.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"socket_path": str(tmp_path / "new.sock")}}))
    write_record(_record(config, listening))
    found = locate(config, None)
    assert (found.socket_path, found.found_by) == (listening, "record")
