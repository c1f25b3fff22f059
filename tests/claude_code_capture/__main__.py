"""`python -m tests.claude_code_capture --version X --out DIR [--scenario NAME ...]`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.claude_code_capture.output import Written, write_readme, write_records
from tests.claude_code_capture.run import CaptureError, install, run_scenario
from tests.claude_code_capture.scenarios import SCENARIOS, by_name, complete, file_names
from tests.claude_code_capture.server import CaptureServer

# Exit codes: 0 every scenario captured, 1 some scenario incomplete (what was captured is
# still written), 2 nothing could run (npm, the binary, the arguments).
INCOMPLETE, FAILED = 1, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.claude_code_capture",
        description="Capture the requests a Claude Code release sends, offline, into a folder "
        "in the format of ../shared/fixtures/claude-code/2.1.332/.",
    )
    p.add_argument("--version", required=True, help="the npm version of @anthropic-ai/claude-code")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (created)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run only this scenario (repeatable; default: all)",
    )
    p.add_argument(
        "--claude", type=Path, help="use this claude binary (of --version) instead of installing"
    )
    p.add_argument("--npm-prefix", type=Path, help="install under this folder (default: a cache)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    scenarios = [by_name(n) for n in args.scenario] if args.scenario else list(SCENARIOS)
    try:
        claude = args.claude or install(args.version, args.npm_prefix)
    except CaptureError as e:
        print(f"capture: {e}", file=sys.stderr)
        return FAILED
    written: list[Written] = []
    missing: list[str] = []
    with CaptureServer() as server, tempfile.TemporaryDirectory(prefix="cc-capture-") as tmp:
        for scenario in scenarios:
            if scenario.interactive and not _have_pty():
                missing.append(f"{scenario.name} (no pseudo-terminal on this system)")
                continue
            outcome = run_scenario(claude, server, scenario, Path(tmp))
            named = file_names(scenario, outcome.records)
            written += write_records(args.out, scenario, named)
            done = outcome.exit_code == 0 and complete(scenario, outcome.records)
            print(
                f"{scenario.name}: {len(named)} requests in {outcome.seconds:.1f}s, "
                f"exit {outcome.exit_code}: " + ", ".join(n for n, _ in named)
            )
            if not done:
                missing.append(f"{scenario.name} (incomplete: exit {outcome.exit_code})")
                print(outcome.output[-3000:], file=sys.stderr)
    write_readme(args.out, args.version, written, missing)
    return INCOMPLETE if missing and any("incomplete" in m for m in missing) else 0


def _have_pty() -> bool:
    try:
        import pty  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
