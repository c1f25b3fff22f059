"""Installing a Claude Code release with npm, and running one scenario of it offline."""

from __future__ import annotations

import functools
import json
import os
import re
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.claude_code_capture.scenarios import MODEL, Scenario, is_main_turn
from tests.claude_code_capture.server import TEXT, CaptureServer, Json, Script

PACKAGE = "@anthropic-ai/claude-code"
API_KEY = "dummy"
# Generous: a scenario takes seconds, but Node's first start on a busy machine may not.
SCENARIO_TIMEOUT_S = 180.0
ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>78]")


class CaptureError(Exception):
    """A capture could not be made; the message says what to do."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pensieve" / "claude-code"


def install(version: str, prefix: Path | None = None) -> Path:
    """The `claude` binary of `version`, installed with npm under `prefix` (kept for reuse)."""
    prefix = prefix or cache_root() / version
    binary = prefix / "node_modules" / ".bin" / "claude"
    if not _runs(binary, version):
        npm = ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"]
        done = subprocess.run([*npm, "--prefix", str(prefix), f"{PACKAGE}@{version}"], check=False)
        if done.returncode != 0:
            raise CaptureError(
                f"npm could not install {PACKAGE}@{version} (exit "
                f"{done.returncode}); check the version and the npm registry"
            )
        if not _runs(binary, version):
            # npm does not always run the package's postinstall, which puts the binary in place.
            package_dir = prefix / "node_modules" / PACKAGE
            subprocess.run(["node", "install.cjs"], cwd=package_dir, check=False)
        if not _runs(binary, version):
            raise CaptureError(f"{binary} --version does not report {version} after installing")
    return binary


def _runs(binary: Path, version: str) -> bool:
    if not binary.exists():
        return False
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split()[:1] == [version]


def client_env(base_url: str, home: Path) -> dict[str, str]:
    """Claude Code's environment: offline, against the capture server, in an empty HOME."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "TERM": "xterm-256color",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }


def seed_home(home: Path, workdir: Path) -> None:
    """Settle the first-run questions an interactive session would otherwise ask: theme,
    onboarding, trust in the folder, and whether to use the API key from the environment."""
    home.mkdir(parents=True, exist_ok=True)
    state = {
        "hasCompletedOnboarding": True,
        "theme": "dark",
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "projects": {
            str(workdir): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}
        },
    }
    (home / ".claude.json").write_text(json.dumps(state))


@dataclass
class Outcome:
    """How a scenario's run ended."""

    records: list[Json]
    exit_code: int | None
    output: str
    seconds: float


def run_scenario(claude: Path, server: CaptureServer, scenario: Scenario, root: Path) -> Outcome:
    """Run `scenario` in a fresh HOME and working folder under `root`."""
    home, workdir = root / scenario.name / "home", root / scenario.name / "work"
    workdir.mkdir(parents=True)
    seed_home(home, workdir)
    env = client_env(server.base_url, home)
    server.recorder.start(Script(scenario.name, scenario.tool_call))
    started = time.monotonic()
    if scenario.interactive:
        code, output = _interactive(claude, server, scenario, workdir, env)
    else:
        argv = [str(claude), "-p", scenario.prompt, "--model", MODEL, *scenario.args]
        try:
            done = subprocess.run(
                argv,
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=SCENARIO_TIMEOUT_S,
                check=False,
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            code, output = None, f"timed out after {SCENARIO_TIMEOUT_S:.0f}s: {e}"
    return Outcome(server.recorder.taken(), code, output, time.monotonic() - started)


class _Terminal:
    """Claude Code in a pseudo-terminal: what it printed so far, as plain text."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        self.raw = bytearray()

    def text(self) -> str:
        """The screen's text without escapes or white space: the client moves the cursor
        rather than print spaces, so words run together."""
        plain = ANSI.sub(b"", bytes(self.raw)).decode("utf-8", "replace")
        return "".join(plain.split())

    def read_until(self, wanted: str, deadline: float, since: int = 0) -> bool:
        """Read the terminal until `wanted` (white space aside) appears after character `since`
        of the text."""
        wanted = "".join(wanted.split())
        while wanted not in self.text()[since:]:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                return False
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the client closed the terminal
                    return False
        return True

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self, deadline: float) -> int | None:
        try:
            return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
        finally:
            os.close(self.master)


def _has_turns(count: int, records: list[Json]) -> bool:
    return sum(map(is_main_turn, records)) >= count


def _interactive(
    claude: Path, server: CaptureServer, scenario: Scenario, workdir: Path, env: dict[str, str]
) -> tuple[int | None, str]:
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    term = _Terminal([str(claude), "--model", MODEL], workdir, env)
    try:
        # The input box is drawn once the session is ready for a prompt.
        if not term.read_until("? for shortcuts", deadline):
            return term.close(time.monotonic()), "no prompt appeared:\n" + term.text()[-2000:]
        for turn, prompt in enumerate((scenario.prompt, *scenario.follow_ups), start=1):
            mark = len(term.text())
            term.type(prompt)
            # Enter only once the prompt is in the box: typed at once, it is taken as a paste.
            term.read_until(prompt, deadline, mark)
            term.type("\r")
            if not (
                server.recorder.wait_for(
                    functools.partial(_has_turns, turn),
                    max(0.0, deadline - time.monotonic()),
                )
                and term.read_until(TEXT, deadline, mark)
            ):
                return term.close(time.monotonic()), f"no reply to {prompt!r}:\n{term.text()}"
        term.type("/exit")
        term.read_until("/exit", deadline, len(term.text()))
        term.type("\r")
        return term.close(deadline), term.text()
    except BaseException:
        term.process.kill()
        raise
