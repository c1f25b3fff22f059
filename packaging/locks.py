"""The locked dependency sets in packaging/lock/: read them, rewrite them, compare them with PyPI.

Every Python package a Pensieve install or test run gets is pinned there with its sha256
hashes, written by uv (`uv pip compile --universal --generate-hashes`, for every platform and
Python >= 3.11 at once); docs/dependencies.md describes the files.

    .venv/bin/python packaging/locks.py compile              # re-resolve, keeping every pin it can
    .venv/bin/python packaging/locks.py compile --upgrade    # the newest of everything
    .venv/bin/python packaging/locks.py compile --upgrade-package platformdirs
    .venv/bin/python packaging/locks.py check                # what is outdated; always exit 0

`make lock` and `make lock-check` run these. `compile` also refreshes the Claude Code test
client's package-lock.json from its package.json (npm); `check` asks npm for newer releases.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_DIR = REPO / "packaging" / "lock"
CLAUDE_CODE_DIR = LOCK_DIR / "claude-code"
DEFAULT_INDEX = "https://pypi.org/simple"
# Options every lock is compiled with. The oldest supported Python: uv's universal resolution
# then covers it and every newer one, on every platform, forking where they differ.
UV_OPTIONS = (
    "--universal",
    "--python-version",
    "3.11",
    "--generate-hashes",
    "--quiet",
    "--custom-compile-command",
    "make lock",
)


class LockError(Exception):
    """A lock file that cannot be read, or a lock that disagrees with what it is compared to."""


@dataclasses.dataclass(frozen=True)
class Lock:
    """One lock file: what uv compiles it from, and how."""

    name: str
    inputs: tuple[str, ...]  # relative to the repository
    options: tuple[str, ...] = ()
    constrained_by: str | None = None  # another lock whose versions this one must keep

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.lock"


RUNTIME = Lock("runtime", ("pyproject.toml",))
# A superset of the runtime lock, with the same versions: the suite runs what users get.
DEV = Lock(
    "dev",
    ("pyproject.toml", "packaging/lock/dev.in"),
    ("--extra", "test", "--extra", "dev"),
    constrained_by="runtime",
)
MODELS = Lock("models", ("packaging/lock/models.in",), ("--no-deps",))
LLM_CLI = Lock("llm-cli", ("packaging/lock/llm-cli.in",))
LOCKS = (RUNTIME, DEV, MODELS, LLM_CLI)  # constraining locks before the ones they constrain


@dataclasses.dataclass(frozen=True)
class Pin:
    """One `name==version ; marker` line of a lock, with its hashes."""

    name: str  # PEP 503 normalized
    version: str
    marker: str | None
    hashes: frozenset[str]

    def applies(self, environment: dict[str, str] | None = None) -> bool:
        """Whether pip installs this pin in `environment` (default: this interpreter's)."""
        if self.marker is None:
            return True
        from packaging.markers import Marker

        return Marker(self.marker).evaluate(environment)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)\s*(?:;\s*(?P<marker>.+?))?"
)
_HASH = re.compile(r"--hash=sha256:(?P<sha256>[0-9a-f]{64})")


def parse_lock(text: str, source: str = "lock") -> list[Pin]:
    """The pins of a requirements file in the form uv and pip-compile write."""
    pins = []
    for number, line in enumerate(re.sub(r"\\\n", " ", text).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        match = _REQUIREMENT.fullmatch(requirement.strip())
        hashes = [_HASH.fullmatch(option) for option in options]
        if match is None or not all(hashes):
            raise LockError(f"{source}: cannot read `{line}` (after line {number})")
        pins.append(
            Pin(
                normalize(match["name"]),
                match["version"],
                match["marker"],
                frozenset(h["sha256"] for h in hashes if h is not None),
            )
        )
    return pins


def read_lock(lock: Lock) -> list[Pin]:
    return parse_lock(lock.path.read_text(), str(lock.path.relative_to(REPO)))


# ---- writing the locks --------------------------------------------------------------------------


def uv() -> str:
    """uv from the interpreter's own environment (the dev lock has it), else from PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        raise LockError("uv is not installed: `make install` puts it in .venv")
    return found


def compile_command(
    lock: Lock, output: Path, constraint: Path | None, upgrade: Sequence[str]
) -> list[str]:
    command = [uv(), "pip", "compile", *lock.inputs, *lock.options, *UV_OPTIONS]
    if constraint is not None:
        command += ["--constraints", os.path.relpath(constraint, REPO)]
    return [*command, *upgrade, "--output-file", os.path.relpath(output, REPO)]


def compile_locks(directory: Path | None, upgrade: Sequence[str]) -> dict[str, Path]:
    """Compile every lock, into `directory` (None: in place); {lock name: file written}."""
    written: dict[str, Path] = {}
    for lock in LOCKS:
        output = lock.path if directory is None else directory / lock.path.name
        if directory is not None and lock.path.exists():
            # uv keeps the pins of the file it writes where it can, as in place.
            shutil.copyfile(lock.path, output)
        constraint = written[lock.constrained_by] if lock.constrained_by else None
        subprocess.run(compile_command(lock, output, constraint, upgrade), cwd=REPO, check=True)
        written[lock.name] = output
    return written


def compile_npm() -> None:
    """package-lock.json from package.json: the versions there are exact, so only a changed
    package.json changes it."""
    npm = shutil.which("npm")
    if npm is None:
        raise LockError("npm is not installed: it writes the Claude Code test client's lock")
    subprocess.run(
        [npm, "install", "--package-lock-only", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=CLAUDE_CODE_DIR,
        check=True,
    )


# ---- comparing with the index ---------------------------------------------------------------


def fetch_index_page(name: str, index_url: str = DEFAULT_INDEX) -> dict[str, object]:
    """A project's page of a PEP 691 simple index (JSON), as pip reads it."""
    request = urllib.request.Request(
        f"{index_url.rstrip('/')}/{normalize(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    with urllib.request.urlopen(request, timeout=60, context=context) as response:
        page: dict[str, object] = json.load(response)
    return page


def newest_release(page: dict[str, object]) -> str | None:
    """The highest final release a PEP 700 index page lists."""
    from packaging.version import InvalidVersion, Version

    listed = page.get("versions")
    found: list[Version] = []
    for text in listed if isinstance(listed, list) else []:
        try:
            version = Version(str(text))
        except InvalidVersion:
            continue
        if not version.is_prerelease:
            found.append(version)
    return str(max(found)) if found else None


def _versions(pins: Iterable[Pin], name: str) -> list[str]:
    return sorted({pin.version for pin in pins if pin.name == name})


def outdated(locked: list[Pin], upgraded: list[Pin], newest: dict[str, str]) -> list[str]:
    """One line per package whose locked version is not the newest: what `make lock UPGRADE=1`
    would change, and what a requirement holds back although the index has newer."""
    from packaging.version import Version

    lines = []
    for name in sorted({pin.name for pin in locked} | {pin.name for pin in upgraded}):
        old, new = _versions(locked, name), _versions(upgraded, name)
        if not new:
            lines.append(f"{name} {', '.join(old)}: no longer needed (make lock UPGRADE=1)")
        elif not old:
            lines.append(f"{name}: newly needed, {', '.join(new)} (make lock UPGRADE=1)")
        elif old != new:
            lines.append(f"{name} {', '.join(old)} -> {', '.join(new)} (make lock UPGRADE=1)")
        elif name in newest and Version(newest[name]) > max(Version(v) for v in old):
            lines.append(
                f"{name} {', '.join(old)}: {newest[name]} is out, held back by a requirement"
            )
    return lines


def newest_releases(names: Iterable[str], index_url: str) -> dict[str, str]:
    def one(name: str) -> tuple[str, str | None]:
        return name, newest_release(fetch_index_page(name, index_url))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return {name: v for name, v in pool.map(one, sorted(set(names))) if v is not None}


def npm_outdated() -> list[str]:
    """The test client's dependencies whose pinned version is not npm's latest."""
    npm = shutil.which("npm")
    if npm is None:
        raise LockError("npm is not installed")
    wanted: dict[str, str] = json.loads((CLAUDE_CODE_DIR / "package.json").read_text())[
        "dependencies"
    ]
    lines = []
    for name, pinned in sorted(wanted.items()):
        latest = subprocess.run(
            [npm, "view", f"{name}@latest", "version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        if latest != pinned:
            lines.append(f"{name} {pinned} -> {latest} (edit package.json, then make lock)")
    return lines


def check(index_url: str) -> None:
    """Print what is outdated in every lock. Problems reaching an index are printed too: this
    reports, it never fails."""
    try:
        with tempfile.TemporaryDirectory(prefix="pensieve-lock-check-") as tmp:
            fresh = compile_locks(Path(tmp), ["--upgrade"])
            upgraded = {name: parse_lock(path.read_text(), name) for name, path in fresh.items()}
        locked = {lock.name: read_lock(lock) for lock in LOCKS}
        names = {pin.name for pins in locked.values() for pin in pins}
        newest = newest_releases(names, index_url)
    except (LockError, OSError, subprocess.CalledProcessError) as exc:
        print(f"could not compare the Python locks with the index: {exc}")
    else:
        for lock in LOCKS:
            lines = outdated(locked[lock.name], upgraded[lock.name], newest)
            where = lock.path.relative_to(REPO)
            total = len({pin.name for pin in locked[lock.name]})
            print(f"{where}: {len(lines)} of {total} packages outdated")
            for line in lines:
                print(f"  {line}")
    try:
        lines = npm_outdated()
    except (LockError, OSError, subprocess.SubprocessError) as exc:
        print(f"could not ask npm about the Claude Code test client: {exc}")
    else:
        where = (CLAUDE_CODE_DIR / "package.json").relative_to(REPO)
        print(f"{where}: {len(lines)} outdated")
        for line in lines:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = cli.add_subparsers(dest="command", required=True)
    compile_cli = commands.add_parser("compile", help="rewrite the locks (needs the index)")
    compile_cli.add_argument("--upgrade", action="store_true", help="the newest of everything")
    compile_cli.add_argument(
        "--upgrade-package", action="append", default=[], metavar="NAME", help="the newest of NAME"
    )
    check_cli = commands.add_parser("check", help="list what is outdated; always exit 0")
    check_cli.add_argument("--index-url", default=DEFAULT_INDEX, help="a PEP 691 simple index")
    args = cli.parse_args(argv)

    if args.command == "check":
        check(args.index_url)
        return 0
    upgrade = ["--upgrade"] if args.upgrade else []
    for name in args.upgrade_package:
        upgrade += ["--upgrade-package", name]
    try:
        compile_locks(None, upgrade)
        compile_npm()
    except (LockError, subprocess.CalledProcessError) as exc:
        print(f"locks: {exc}", file=sys.stderr)
        return 1
    for lock in LOCKS:
        print(f"wrote {lock.path.relative_to(REPO)}: {len(read_lock(lock))} pins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
