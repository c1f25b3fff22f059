"""status's crash reports: a predecessor that logged to systemd's journal."""

from __future__ import annotations

from typing import Any

import pytest

from pensieve.wire import PreviousExit
from pensievectl import service, status

JOURNAL = """\
INFO    pensieved: listening on http://127.0.0.1:8080
Fatal Python error: Segmentation fault
Current thread 0x1 (most recent call first):
  File "/x/pensieved/engine/batcher.py", line 88 in _decode
pensieved.service: Main process exited, code=dumped, status=11/SEGV
pensieved.service: Scheduled restart job, restart counter is at 1.
INFO    pensieved: the previous pensieved for this config did not exit cleanly: pid 7 ...
"""


def _previous(**changes: Any) -> PreviousExit:
    previous: dict[str, Any] = {
        "pid": 7,
        "started_at": 1.0,
        "signal": None,
        "signal_name": None,
        "exit_code": None,
        "cause": "ended without a clean exit (...)",
        "work": [],
        "log_file": None,
        "log_tail": [],
        "supervisor": "systemd",
    }
    previous.update(changes)
    return PreviousExit(**previous)


@pytest.fixture(autouse=True)
def journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "journal_text", lambda: JOURNAL)


def test_a_systemd_predecessor_is_explained_from_the_journal() -> None:
    previous = _previous()
    status._fill_in_from_journal(previous)
    assert previous.signal == 11 and previous.signal_name == "SIGSEGV"
    assert previous.cause == "died by signal 11 (SIGSEGV)"
    assert previous.log_tail[1] == "Fatal Python error: Segmentation fault"
    # the restarted daemon's own lines are not the dead one's
    assert not any("did not exit cleanly" in line for line in previous.log_tail)
    assert not any("Scheduled restart" in line for line in previous.log_tail)


def test_the_journal_is_not_read_for_daemons_it_does_not_hold() -> None:
    for previous in (
        _previous(supervisor=None),
        _previous(log_file="/var/log/pensieve.log"),
        _previous(signal=9, signal_name="SIGKILL", cause="died by signal 9 (SIGKILL)"),
    ):
        before = previous.model_copy(deep=True)
        status._fill_in_from_journal(previous)
        assert previous == before
