"""The activity file: what the daemon is doing, readable after the process is gone."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from pensieve.activity import HALF, HEADER, Activity, read_activity


def test_work_in_progress_is_mirrored_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.activity"
    activity = Activity()
    activity.open(path)
    try:
        first = read_activity(path)
        assert first is not None and first["pid"] == os.getpid() and first["work"] == []
        activity.begin("req_1", "POST /v1/messages model=m", "rendering")
        activity.begin("req_2", "POST /v1/messages/count_tokens model=m", "tokenizing")
        activity.phase("req_1", "generating")
        activity.end("req_2")
        data = read_activity(path)
        assert data is not None
        assert [(w["id"], w["phase"]) for w in data["work"]] == [("req_1", "generating")]
        assert data["work"][0]["what"] == "POST /v1/messages model=m"
        with activity.loading("/models/x.gguf"):
            ids = [w["id"] for w in read_activity(path)["work"]]  # type: ignore[index]
            assert ids == ["req_1", "load-1"]
        assert [w["id"] for w in read_activity(path)["work"]] == ["req_1"]  # type: ignore[index]
    finally:
        activity.close(remove=True)
    assert not path.exists()


def test_the_last_copy_survives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "a.activity"
    script = (
        "import os; from pathlib import Path; from pensieve.activity import Activity;"
        f"a = Activity(); a.open(Path({str(path)!r}));"
        "a.begin('req_9', 'POST /v1/messages model=m', 'generating');"
        "os.kill(os.getpid(), 9)"
    )
    child = subprocess.run([sys.executable, "-c", script], check=False)
    assert child.returncode == -9
    data = read_activity(path)
    assert data is not None and data["pid"] != os.getpid()
    assert [w["id"] for w in data["work"]] == ["req_9"]


def test_an_update_cut_short_leaves_the_previous_copy(tmp_path: Path) -> None:
    path = tmp_path / "a.activity"
    activity = Activity()
    activity.open(path)
    activity.begin("req_1", "x", "generating")
    activity.close(remove=False)
    raw = bytearray(path.read_bytes())
    current = raw[4]
    # A crash while the other half was being written: garbage there, the index not flipped.
    other = HEADER + (1 - current) * HALF
    raw[other : other + 4] = struct.pack("<I", 10)
    raw[other + 4 : other + 14] = b'{"pid": 1,'
    path.write_bytes(bytes(raw))
    data = read_activity(path)
    assert data is not None and [w["id"] for w in data["work"]] == ["req_1"]


def test_unreadable_files_are_no_activity(tmp_path: Path) -> None:
    assert read_activity(tmp_path / "missing") is None
    (tmp_path / "short").write_bytes(b"PVA1")
    assert read_activity(tmp_path / "short") is None


def test_too_much_work_keeps_the_newest_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "a.activity"
    activity = Activity()
    activity.open(path)
    try:
        for i in range(300):
            activity.begin(f"req_{i:03d}", "POST /v1/messages model=" + "m" * 300, "queued")
        data = read_activity(path)
        assert data is not None
        assert data["work"][-1]["id"] == "req_299"
        assert data["left_out"] == 300 - len(data["work"])
        assert len(json.dumps(data, separators=(",", ":"))) < HALF
        # model names from clients are cut short
        assert len(data["work"][-1]["what"]) == 300
        activity.begin("req_esc", "POST /v1/messages model=\x1b]0;owned\x07\n", "queued")
        assert activity.entries["req_esc"].what == "POST /v1/messages model=?]0;owned??"
    finally:
        activity.close(remove=True)
