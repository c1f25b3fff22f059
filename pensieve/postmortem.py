"""Why a daemon died, from what it left behind: its run record, activity file and log.

A daemon that exits cleanly removes its run record, so a record whose pid is dead means a
crash. The signal comes from the exit status when the caller has it (`pensievectl start`
spawned the daemon and reaped it), else from faulthandler's "Fatal Python error: <signal>"
line in the daemon's own part of the log; SIGKILL (the out-of-memory killer) leaves no line.
The activity file names the requests (and model loads) that were running.

Stdlib only: both the daemon (about its predecessor) and `pensievectl` use it.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from pensieve.runrecord import RunRecord

# faulthandler's names for the fatal signals it reports (Modules/faulthandler.c).
FAULTHANDLER_NAMES: dict[str, int] = {
    "Segmentation fault": signal.SIGSEGV,
    "Bus error": signal.SIGBUS,
    "Illegal instruction": signal.SIGILL,
    "Floating-point exception": signal.SIGFPE,
    "Floating point exception": signal.SIGFPE,
    "Aborted": signal.SIGABRT,
}
_FATAL = re.compile(r"Fatal Python error: ([A-Za-z -]+)")
# systemd's own line in the unit's journal: "Main process exited, code=killed, status=9/KILL".
_SYSTEMD = re.compile(r"Main process exited, code=(?:killed|dumped), status=(\d+)/")
LOG_TAIL_LINES = 15
REPORT_LINES = 40
_MAX_LOG_BYTES = 256 * 1024


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_log_slice(path: str | None, start: int, end: int | None = None) -> str:
    """The daemon's own part of a shared log file: from its start offset up to `end`."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            stop = size if end is None else min(end, size)
            begin = min(max(start, stop - _MAX_LOG_BYTES), stop)
            f.seek(begin)
            data = f.read(stop - begin)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def signal_from_log(text: str) -> int | None:
    """The fatal signal reported last in `text` (by faulthandler, or by systemd)."""
    found: tuple[int, int] | None = None  # (position, signal): the last report wins
    for match in _FATAL.finditer(text):
        number = FAULTHANDLER_NAMES.get(match.group(1).strip())
        if number is not None:
            found = (match.start(), number)
    for match in _SYSTEMD.finditer(text):
        if found is None or match.start() > found[0]:
            found = (match.start(), int(match.group(1)))
    return found[1] if found else None


@dataclass
class Death:
    """A daemon that ended without a clean exit."""

    pid: int
    started_at: float
    log_path: str | None
    supervisor: str | None = None  # "systemd": its log is the unit's journal
    signal: int | None = None  # the fatal signal, when known
    exit_code: int | None = None  # an exit status other than a signal, when known
    work: list[dict[str, Any]] = field(default_factory=list)  # what was running
    log_tail: list[str] = field(default_factory=list)

    @property
    def cause(self) -> str:
        if self.signal is not None:
            return f"died by signal {self.signal} ({signal_name(self.signal)})"
        if self.exit_code is not None:
            return f"exited with status {self.exit_code}"
        return (
            "ended without a clean exit (no fatal-signal report in its log: it was killed "
            "with SIGKILL, for example by the out-of-memory killer, or its log is elsewhere)"
        )

    def summary(self) -> str:
        """One line, without log lines: for the successor's own log, where a copy of the
        crash report would be taken for the successor's own by a later post-mortem."""
        work = "; ".join(describe_work(item, live=False) for item in self.work)
        return f"pid {self.pid} {self.cause}" + (f", running {work}" if work else "")

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        lines = [f"pensieved (pid {self.pid}, started {started}) {self.cause}."]
        if self.work:
            lines.append("It was running:")
            lines += [f"  {describe_work(item, live=False)}" for item in self.work]
        else:
            lines.append("No request was running.")
        if self.log_tail:
            lines.append(f"Last lines of its log ({self.log_path}):")
            lines += [f"  {line}" for line in self.log_tail]
        elif self.log_path:
            lines.append(f"Its log: {self.log_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started_at": self.started_at,
            "signal": self.signal,
            "signal_name": signal_name(self.signal) if self.signal is not None else None,
            "exit_code": self.exit_code,
            "cause": self.cause,
            "work": self.work,
            "log_file": self.log_path,
            "log_tail": self.log_tail,
            "supervisor": self.supervisor,
        }


def describe_work(item: dict[str, Any], *, live: bool = True) -> str:
    """`req_x: POST /v1/messages model=m stream=true ...: generating (for 3 s)`; for a dead
    daemon's work, the clock time the phase began instead of its age."""
    since = item.get("phase_since") or item.get("since")
    when = ""
    if isinstance(since, int | float):
        if live:
            when = f" (for {max(0.0, time.time() - since):.0f} s)"
        else:
            when = f" (since {time.strftime('%H:%M:%S', time.localtime(since))})"
    return f"{item.get('id', '?')}: {item.get('what', '?')}: {item.get('phase', '?')}{when}"


def examine(
    record: RunRecord,
    activity: dict[str, Any] | None,
    *,
    exit_status: int | None = None,
    log_end: int | None = None,
    log_text: str | None = None,
) -> Death:
    """What is known about how `record`'s daemon died.

    `exit_status` is Popen's returncode when the caller reaped it (negative: a signal);
    `log_end` bounds its part of a log shared with a successor; `log_text` is its log when
    it went elsewhere than a file (the journal).
    """
    if log_text is None:
        log_text = read_log_slice(record.log_path, record.log_offset, log_end)
    death = Death(
        pid=record.pid,
        started_at=record.started_at,
        log_path=record.log_path,
        supervisor=record.supervisor,
    )
    if exit_status is not None and exit_status < 0:
        death.signal = -exit_status
    elif exit_status is not None:
        death.exit_code = exit_status
    else:
        death.signal = signal_from_log(log_text)
    if activity is not None and activity.get("pid") == record.pid:
        work = activity.get("work")
        if isinstance(work, list):
            death.work = [w for w in work if isinstance(w, dict)]
    death.log_tail = log_tail(log_text)
    return death


def journal_until_exit(text: str) -> str:
    """A unit's journal up to systemd's line about the last death (a restarted successor's
    lines follow it)."""
    matches = list(_SYSTEMD.finditer(text))
    if not matches:
        return text
    end = text.find("\n", matches[-1].end())
    return text if end < 0 else text[: end + 1]


def log_tail(text: str) -> list[str]:
    """The last lines of a log; with a fatal-signal report, the lines that led to it and the
    report itself, the crashing thread's traceback kept first when it is long."""
    lines = [line for line in text.rstrip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if _FATAL.search(line)]
    if not starts:
        return lines[-LOG_TAIL_LINES:]
    start = starts[-1]
    before = lines[max(0, start - 5) : start]
    report = lines[start:]
    if len(report) > REPORT_LINES:
        current = next((i for i, line in enumerate(report) if "Current thread" in line), None)
        kept = report[:1]
        if current is not None:
            kept += report[current : current + REPORT_LINES - 2]
        left = len(report) - len(kept)
        report = [*kept, f"... ({left} more lines of the report in the log)"]
    return before + report
