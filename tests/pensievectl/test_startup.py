"""pensievectl starts fast and never imports Tornado or llama_cpp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _best_of(argv: list[str], runs: int = 5) -> tuple[float, subprocess.CompletedProcess[str]]:
    # Best of a few: the machine is shared, and a single slow run says little.
    best, last = float("inf"), None
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    for _ in range(runs):
        started = time.monotonic()
        last = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False
        )
        best = min(best, time.monotonic() - started)
    assert last is not None
    return best, last


def test_help_and_status_of_a_stopped_daemon_are_fast() -> None:
    sock = str(Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp")) / "ctl.sock")
    took, result = _best_of([sys.executable, "-m", "pensievectl", "--help"])
    assert result.returncode == 0 and "status" in result.stdout
    assert took < 0.8, f"pensievectl --help took {took:.2f} s"
    took, result = _best_of([sys.executable, "-m", "pensievectl", "--socket", sock, "status"])
    assert result.returncode == 3
    assert took < 0.8, f"pensievectl status took {took:.2f} s"


def test_no_command_imports_tornado_or_llama_cpp() -> None:
    sock = str(Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp")) / "ctl.sock")
    script = f"""
import json, sys
import pensievectl.cli, pensievectl.client, pensievectl.configcmds, pensievectl.lifecycle
import pensievectl.status, pensievectl.service, pensievectl.context
for argv in (["status"], ["stop"], ["reload"], ["config", "show"], ["config", "generate"],
             ["validate", "/nonexistent.json"]):
    pensievectl.cli.main(["--socket", {sock!r}, *argv])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tornado", "llama_cpp"))
print(json.dumps(bad), file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
