from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import EXACT, STARTED, DaemonProcess, start_daemon


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started any way (helpers, pensievectl) keep their caches out of the user's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(autouse=True)
def no_daemon_crashed() -> Iterator[None]:
    """A test during which a daemon died of a fatal signal fails, with the daemon's log tail,
    even if what it asserted still held; the crash is reported once."""
    yield
    crashes = [(d, reason) for d in STARTED if (reason := d.crash()) is not None]
    for daemon, _ in crashes:
        STARTED.remove(daemon)
    if crashes:
        pytest.fail("\n\n".join(reason for _, reason in crashes), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None] | pytest.TestReport:
    report: pytest.TestReport = yield
    if report.failed:
        for daemon in STARTED:
            if (reason := daemon.crash()) is not None:
                report.sections.append(("pensieved crashed", reason))
    return report


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One real pensieved with the bundled model, shared by a test module. Its greedy replies
    depend on the request only, not on what the module asked before (see EXACT)."""
    d = start_daemon(Path(tmp_path_factory.mktemp("daemon")), EXACT)
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"
