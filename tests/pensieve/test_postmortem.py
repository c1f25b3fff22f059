"""Reading a dead daemon's leftovers: the signal, the running requests, its log lines."""

from __future__ import annotations

import signal
from pathlib import Path

from pensieve.postmortem import examine, read_log_slice, signal_from_log
from pensieve.runrecord import RunRecord

FAULTHANDLER_REPORT = """\
2026-11-27 17:01:02 INFO    pensieved: listening
Fatal Python error: Segmentation fault

Thread 0x00007f (most recent call first):
  File "/x/pensieved/engine/batcher.py", line 88 in decode

Current thread 0x00007e (most recent call first):
  File "/x/threading.py", line 327 in wait
"""


def _record(log: Path | None, offset: int = 0) -> RunRecord:
    return RunRecord(
        pid=4242,
        config_path="/c.json",
        socket_path="/s.sock",
        started_at=1_700_000_000.0,
        version="0.1.0",
        log_path=str(log) if log else None,
        log_offset=offset,
    )


def test_signals_from_faulthandler_and_systemd_lines() -> None:
    assert signal_from_log(FAULTHANDLER_REPORT) == signal.SIGSEGV
    assert signal_from_log("Fatal Python error: Illegal instruction\n") == signal.SIGILL
    assert signal_from_log("Fatal Python error: Bus error\n") == signal.SIGBUS
    assert signal_from_log("Fatal Python error: Aborted\n") == signal.SIGABRT
    assert signal_from_log("Fatal Python error: Floating-point exception") == signal.SIGFPE
    systemd = "pensieved.service: Main process exited, code=killed, status=9/KILL\n"
    assert signal_from_log(systemd) == 9
    # the last report wins
    assert signal_from_log(FAULTHANDLER_REPORT + systemd) == 9
    assert signal_from_log(systemd + "Fatal Python error: Aborted") == signal.SIGABRT
    assert signal_from_log("INFO all is well\nFatal Python error: init failed") is None


def test_a_daemon_reads_only_its_own_part_of_a_shared_log(tmp_path: Path) -> None:
    log = tmp_path / "pensieved.log"
    before = "Fatal Python error: Aborted\nold daemon's lines\n"
    successor = "successor starts\n"
    log.write_text(before + FAULTHANDLER_REPORT + successor)
    start, end = len(before), len(before) + len(FAULTHANDLER_REPORT)
    assert read_log_slice(str(log), start, end) == FAULTHANDLER_REPORT
    death = examine(_record(log, start), None, log_end=end)
    assert death.signal == signal.SIGSEGV
    assert death.log_tail[0].endswith("listening")
    assert death.log_tail[-1].strip().startswith('File "/x/threading.py"')
    assert "successor" not in "\n".join(death.log_tail)


def test_the_exit_status_wins_and_names_the_signal(tmp_path: Path) -> None:
    log = tmp_path / "pensieved.log"
    log.write_text("nothing fatal here\n")
    death = examine(_record(log), None, exit_status=-signal.SIGILL)
    assert death.signal == signal.SIGILL
    assert death.cause == "died by signal 4 (SIGILL)"
    assert examine(_record(log), None, exit_status=1).cause == "exited with status 1"


def test_the_running_requests_are_named(tmp_path: Path) -> None:
    log = tmp_path / "pensieved.log"
    log.write_text(FAULTHANDLER_REPORT)
    work = [
        {
            "id": "req_abc",
            "what": "POST /v1/messages model=m stream=true max_tokens=64",
            "phase": "generating",
            "since": 1_700_000_100.0,
            "phase_since": 1_700_000_101.0,
        }
    ]
    death = examine(_record(log), {"pid": 4242, "work": work})
    text = death.describe()
    assert text.startswith("pensieved (pid 4242, started ")
    assert "died by signal 11 (SIGSEGV)." in text
    assert "req_abc: POST /v1/messages model=m stream=true max_tokens=64: generating" in text
    assert f"Last lines of its log ({log}):" in text
    assert "Fatal Python error: Segmentation fault" in text
    summary = death.summary()
    assert summary.startswith("pid 4242 died by signal 11 (SIGSEGV), running req_abc: POST")
    assert signal_from_log(summary) is None  # a successor logging it does not fake a crash
    # another process's activity (a successor's) is not this death's
    assert examine(_record(log), {"pid": 1, "work": work}).work == []
    assert death.to_dict()["signal_name"] == "SIGSEGV"


def test_no_report_means_an_unexplained_kill(tmp_path: Path) -> None:
    log = tmp_path / "pensieved.log"
    log.write_text("INFO listening\n")
    death = examine(_record(log), None)
    assert death.signal is None
    assert "SIGKILL" in death.cause and "out-of-memory" in death.cause
    journal = examine(_record(None), None, log_text="Fatal Python error: Bus error\n")
    assert journal.signal == signal.SIGBUS
