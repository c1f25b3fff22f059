"""The boundary pensievectl lives in: it never imports the daemon (`pensieved`), Tornado or
llama_cpp, and `--help` and `status` of a stopped daemon do not even import pydantic, which is
most of what made them slow to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON_SIDE = ("pensieved", "tornado", "llama_cpp")


def _run(script: str) -> tuple[object, list[str]]:
    """Run `script` in a fresh interpreter; it prints [result, imported top-level packages]."""
    env = dict(os.environ)
    env.pop("PENSIEVE_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    code, modules = json.loads(result.stderr.strip().splitlines()[-1])
    return code, modules


_COMMAND = """
import json, sys
from pensievectl.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
print(json.dumps([code, sorted({{m.split(".")[0] for m in sys.modules}})]), file=sys.stderr)
"""


def test_help_and_status_of_a_stopped_daemon_do_not_import_pydantic() -> None:
    sock = str(Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp")) / "ctl.sock")
    for argv, expected in ((["--help"], 0), (["--socket", sock, "status"], 3)):
        code, modules = _run(_COMMAND.format(argv=argv))
        assert code == expected, argv
        assert "pensievectl" in modules
        assert "pydantic" not in modules, f"pensievectl {' '.join(argv)} imports pydantic"
        assert not set(DAEMON_SIDE) & set(modules), argv


def test_no_command_imports_the_daemon_tornado_or_llama_cpp() -> None:
    sock = str(Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp")) / "ctl.sock")
    script = f"""
import json, pkgutil, importlib, sys
import pensieve, pensievectl
for package in (pensieve, pensievectl):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
import pensievectl.cli
for argv in (["status"], ["stop"], ["reload"], ["config", "show"], ["config", "generate"],
             ["validate", "/nonexistent.json"], ["service", "uninstall", "--dry-run"],
             ["claude", "--print-env"]):
    pensievectl.cli.main(["--socket", {sock!r}, *argv])
print(json.dumps([0, sorted({{m.split(".")[0] for m in sys.modules}})]), file=sys.stderr)
"""
    _, modules = _run(script)
    assert "pydantic" in modules  # the script did import everything
    assert not set(DAEMON_SIDE) & set(modules), sorted(set(DAEMON_SIDE) & set(modules))
