"""The run record: written and read back, keyed by the config's real path, trusted with care."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pensieve import runrecord
from pensieve.runrecord import (
    LockTimeoutError,
    RunRecord,
    config_key,
    pid_alive,
    read_record,
    remove_record,
    start_lock,
    write_record,
)


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "runtime"
    monkeypatch.setattr(runrecord, "runtime_dir", lambda: directory)
    return directory


def _record(config: Path, pid: int | None = None) -> RunRecord:
    return RunRecord(
        pid=os.getpid() if pid is None else pid,
        config_path=str(config.resolve()),
        socket_path="/tmp/x.sock",
        started_at=1.0,
        version="0.1.0",
        log_path="/tmp/x.log",
        log_offset=42,
    )


def test_written_record_reads_back_under_any_spelling_of_the_config_path(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "config.json"
    config.parent.mkdir()
    record = _record(config)
    written = write_record(record)
    assert written.stat().st_mode & 0o777 == 0o600
    assert written.parent.stat().st_mode & 0o777 == 0o700
    assert read_record(config) == record
    # a relative spelling, a `..` detour and a symlink name the same file
    link = tmp_path / "link"
    link.symlink_to(config.parent)
    for spelling in (tmp_path / "conf" / ".." / "conf" / "config.json", link / "config.json"):
        assert config_key(spelling) == config_key(config)
        assert read_record(spelling) == record
    assert read_record(tmp_path / "other.json") is None


def test_remove_takes_only_the_callers_own_record(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    write_record(_record(config))
    remove_record(config, pid=os.getpid() + 1)  # a predecessor's cleanup: not ours to remove
    assert read_record(config) is not None
    remove_record(config, pid=os.getpid())
    assert read_record(config) is None


def test_a_garbled_record_is_no_record(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    path = write_record(_record(config))
    path.write_text('{"pid": "not a number"')
    assert read_record(config) is None
    path.write_text('{"pid": "12", "socket_path": "/x"}')
    assert read_record(config) is None


def test_records_in_a_directory_of_another_user_are_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.json"
    write_record(_record(config))
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)
    assert read_record(config) is None
    with pytest.raises(runrecord.RecordDirError):
        write_record(_record(config))


def test_pid_alive_sees_a_dead_process() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
    assert not pid_alive(0) and not pid_alive(-5)


def test_start_lock_lets_one_holder_in_at_a_time(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    waited: list[bool] = []
    # flock is per open file: a second open in this process competes like another process
    with (
        start_lock(config, timeout=1.0),
        pytest.raises(LockTimeoutError),
        start_lock(config, timeout=0.2, on_wait=lambda: waited.append(True)),
    ):
        pass
    assert waited == [True]
    with start_lock(config, timeout=0.2):
        pass  # released when the holder closed it


def test_the_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    script = (
        "import sys, time; from pathlib import Path; from pensieve import runrecord;"
        f"runrecord.runtime_dir = lambda: Path({str(runrecord.runtime_dir())!r});"
        f"lock = runrecord.start_lock(Path({str(config)!r}), 5); lock.__enter__();"
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError), start_lock(config, timeout=0.2):
            pass
        holder.kill()
        holder.wait()
        with start_lock(config, timeout=2.0):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_last_good_config_round_trip_private(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    assert runrecord.read_last_good(config) is None
    data = {"server": {"port": 18123, "api_key": "secret"}}
    path = runrecord.write_last_good(config, data)
    assert runrecord.read_last_good(tmp_path / "." / "config.json") == data
    assert os.stat(path).st_mode & 0o777 == 0o600, "it may hold API keys"
    path.write_text("{not json")
    assert runrecord.read_last_good(config) is None
