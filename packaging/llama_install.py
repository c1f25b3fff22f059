"""Install llama-cpp-python so that it runs on this machine, and prove it before going on.

`make install` runs this with the virtualenv's python, before `pip install -e .`. It installs
the llama-cpp-python version pinned in pyproject.toml and runs pensieved's self-test (a
batched decode in a child process, pensieved/engine/selftest.py). A build that kills the
child with a signal (SIGILL, SIGSEGV) was compiled for instructions this machine traps (on
Intel Xeons: AMX, in llama.cpp's worker threads), so it is rebuilt with portable flags and
checked again. On a CPU with AMX-INT8 the native build is known to die and is not tried.

Builds are never taken from pip's wheel cache: its key is the download URL and the
interpreter, not CMAKE_ARGS, so it would hand back the build that just died. Every wheel that
passed is kept in a wheelhouse under the user's cache directory, keyed by llama-cpp-python's
version, the CPU (model and flags), the interpreter and the build flags: a fresh clone on the
same machine installs from there instead of compiling again (10-20 minutes on 2 cores), and
checks it again before trusting it. A build that died is remembered there too, and never built
again.

The runtime lock (packaging/lock/runtime.lock) decides the rest: the sdist is built only if
its sha256 is the lock's, and the dependencies pip installs with the wheel are the locked
versions, so that `make install`'s hash-checked install of the lock then finds them in place.

Stdlib only: it runs before anything else is installed. Exit status 0 when the installed
llama-cpp-python runs here, 1 otherwise (the message says why and what to do).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "packaging"))

import locks  # noqa: E402  (packaging/locks.py; stdlib only at import time)

from pensieved.engine import selftest  # noqa: E402  (stdlib only at import time)

DIST = "llama-cpp-python"
WHEEL_PREFIX = "llama_cpp_python"


class InstallError(Exception):
    """Nothing that runs here could be installed; the message says why and what to do."""


def say(message: str) -> None:
    print(f"llama_install: {message}", flush=True)


# ---- what to build ------------------------------------------------------------------------------


def pinned_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(r"\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;]+)\s*", dep)
        if match:
            return match.group(1)
    raise InstallError(f"pyproject.toml pins no exact {DIST} version (`{DIST}==X.Y.Z`)")


def locked_sdist_hashes(pins: Sequence[locks.Pin], version: str) -> frozenset[str]:
    """The sha256s the lock allows for llama-cpp-python `version` (its sdist's)."""
    for pin in pins:
        if pin.name == DIST:
            if pin.version != version:
                raise InstallError(
                    f"pyproject.toml pins {DIST} {version} but the lock has {pin.version}: "
                    "run `make lock`"
                )
            return pin.hashes
    raise InstallError(f"the lock has no {DIST}: run `make lock`")


def constraints_text(pins: Sequence[locks.Pin]) -> str:
    """The lock as pip constraints, without llama-cpp-python (a wheel of ours, not the sdist the
    lock's hash is for) and without hashes (which would make pip ask one of that wheel too)."""
    lines = (
        f"{pin.name}=={pin.version}" + (f" ; {pin.marker}" if pin.marker else "")
        for pin in pins
        if pin.name != DIST
    )
    return "".join(f"{line}\n" for line in lines)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to build: a name for people and the CMAKE_ARGS that make it."""

    name: str
    cmake_args: str


def _append_flags(args: list[str], define: str, flags: str) -> list[str]:
    """`args` with `flags` added to the -D<define>=... they set, or with that define added."""
    pattern = re.compile(rf"-D{define}(:[A-Z]+)?=(.*)", re.S)
    out, found = [], False
    for arg in args:
        match = pattern.fullmatch(arg)
        if match and not found:
            value = match.group(2)
            arg = f"-D{define}{match.group(1) or ''}={value + ' ' if value else ''}{flags}"
            found = True
        out.append(arg)
    if not found:
        out.append(f"-D{define}={flags}")
    return out


def portable_cmake_args(user_args: str, machine: str) -> str:
    """The user's CMAKE_ARGS, changed so the build runs on any CPU of this kind."""
    args = shlex.split(user_args)
    if machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        for define in ("CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"):
            args = _append_flags(args, define, selftest.X86_PORTABLE_FLAGS)
    else:
        # No single extension to switch off elsewhere: the generic build for the architecture.
        args = [a for a in args if not re.match(r"-DGGML_NATIVE(:BOOL)?=", a)]
        args.append("-DGGML_NATIVE=OFF")
    return shlex.join(args)


def variants(user_args: str, machine: str) -> list[Variant]:
    """The build as asked (CMAKE_ARGS as given), then the portable one."""
    return [
        Variant("as configured", user_args),
        Variant("portable", portable_cmake_args(user_args, machine)),
    ]


def predicts_trap(cpu: str, user_args: str) -> bool:
    """Whether the build as configured is known to die here, without building it to find out.

    -march=native on a CPU with AMX-INT8 compiles llama.cpp's AMX kernels, which trap; a user
    who set CMAKE_ARGS that mention AMX or GGML_NATIVE has decided for themselves.
    """
    flags = next((line for line in cpu.splitlines() if line.startswith("flags=")), "")
    chosen = re.search(r"amx|GGML_NATIVE|-march", user_args, re.I) is not None
    return "amx_int8" in flags.removeprefix("flags=").split() and not chosen


def python_tag() -> str:
    return f"{sys.implementation.cache_tag}-{platform.machine()}-{sys.platform}"


def wheel_key(version: str, cpu: str, variant: Variant) -> str:
    text = "\n".join([version, python_tag(), cpu, variant.cmake_args])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """pensieved's cache directory (platformdirs' user_cache_dir, without platformdirs)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pensieve"
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "pensieve"


# ---- the wheelhouse -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One build's place in the wheelhouse: its wheel (once it passed) and its verdict."""

    path: Path

    @property
    def verdict_file(self) -> Path:
        return self.path / "verdict.json"

    def verdict(self) -> str | None:
        try:
            data = json.loads(self.verdict_file.read_text())
        except (OSError, ValueError):
            return None
        outcome = data.get("outcome") if isinstance(data, dict) else None
        return outcome if isinstance(outcome, str) else None

    def wheel(self) -> Path | None:
        wheels = sorted(self.path.glob(f"{WHEEL_PREFIX}-*.whl"))
        return wheels[0] if wheels and self.verdict() == "ok" else None

    def record(self, variant: Variant, verdict: selftest.Verdict, wheel: Path | None) -> None:
        """Keep `wheel` (a passing build) or only the verdict (a build that died)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for old in self.path.glob("*.whl"):
            if wheel is None or old != self.path / wheel.name:
                old.unlink()
        if wheel is not None and wheel.parent != self.path:
            staged = self.path / f".{wheel.name}.part"
            shutil.copyfile(wheel, staged)
            staged.replace(self.path / wheel.name)
        data = {
            "outcome": verdict.outcome,
            "signal": verdict.signal_name,
            "cmake_args": variant.cmake_args,
        }
        tmp = self.verdict_file.with_suffix(".part")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.verdict_file)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One install at a time per wheelhouse: a second waits, then reuses the first's wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the installer ------------------------------------------------------------------------------

Checker = Callable[[], selftest.Verdict]
Runner = Callable[[Sequence[str], dict[str, str]], None]


def run_command(argv: Sequence[str], env: dict[str, str]) -> None:
    say(
        "$ "
        + shlex.join(argv)
        + (f"  (CMAKE_ARGS={env['CMAKE_ARGS']})" if env.get("CMAKE_ARGS") else "")
    )
    done = subprocess.run(list(argv), env=env, check=False)
    if done.returncode != 0:
        raise InstallError(f"`{shlex.join(argv)}` failed with exit status {done.returncode}")


class Installer:
    """The decisions; pip and the check are passed in, so tests can watch what it asks."""

    def __init__(
        self,
        *,
        version: str,
        wheelhouse: Path,
        cpu: str,
        user_cmake_args: str,
        machine: str,
        python: str,
        check: Checker,
        run: Runner = run_command,
        installed_version: Callable[[], str | None] | None = None,
        sdist_sha256: frozenset[str] = frozenset(),
        constraints: Path | None = None,
    ) -> None:
        self.version = version
        self.wheelhouse = wheelhouse
        self.cpu = cpu
        self.variants = variants(user_cmake_args, machine)
        self.python = python
        self.check = check
        self.run = run
        self.installed_version = installed_version or (lambda: installed_version_of(python))
        self.sdist_sha256 = sdist_sha256  # empty: whatever the index serves
        self.constraints = constraints  # the versions of the wheel's dependencies

    def pip(self, *args: str, cmake_args: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("CMAKE_ARGS", None)
        if cmake_args:
            env["CMAKE_ARGS"] = cmake_args
        self.run([self.python, "-m", "pip", *args], env)

    def entry(self, variant: Variant) -> Entry:
        key = wheel_key(self.version, self.cpu, variant)
        return Entry(self.wheelhouse / f"{WHEEL_PREFIX}-{self.version}-{key}")

    def install(self) -> Variant | None:
        """Leave a llama-cpp-python that runs here installed; the variant it is (None: the one
        that was installed already)."""
        with locked(self.wheelhouse):
            skip_configured = predicts_trap(self.cpu, self.variants[0].cmake_args)
            if skip_configured:
                say(
                    "this CPU has AMX, whose llama.cpp kernels trap in worker threads (an open "
                    "llama.cpp bug): building without them"
                )
            if self.installed_version() == self.version:
                verdict = self.check()
                if verdict.ok:
                    say(f"{DIST} {self.version} is installed and runs on this CPU")
                    return None
                self._judge(verdict, "the installed build")
                configured = self.entry(self.variants[0])
                if configured.wheel() is None:
                    # Not one of ours, so most likely the build as configured (a plain `pip
                    # install`, from pip's cache): remembered as such, not built to find out.
                    configured.record(self.variants[0], verdict, None)
            for variant in self.variants:
                if variant is self.variants[0] and skip_configured:
                    continue
                if self._try(variant):
                    return variant
            raise InstallError(
                f"every build of {DIST} {self.version} tried died on this CPU, the portable "
                f"one too (CMAKE_ARGS={self.variants[-1].cmake_args!r}). Report the CPU "
                "(/proc/cpuinfo) and the output above; meanwhile set CMAKE_ARGS to flags "
                "that avoid the instructions it traps and run `make install` again."
            )

    def _try(self, variant: Variant) -> bool:
        entry = self.entry(variant)
        if entry.verdict() == "signal":
            say(f"the {variant.name} build is known to die on this CPU: skipped")
            return False
        with tempfile.TemporaryDirectory(prefix="pensieve-llama-") as tmp:
            wheel = entry.wheel()
            if wheel is not None:
                say(f"installing the {variant.name} build kept in {wheel.parent}")
            else:
                wheel = self._build(variant, Path(tmp))
            self._install_wheel(wheel)
            # A kept wheel is checked too: the CPU may be another one under the same name.
            verdict = self.check()
            if verdict.ok or verdict.crashed:
                entry.record(variant, verdict, wheel if verdict.ok else None)
        return self._judge(verdict, f"the {variant.name} build")

    def _build(self, variant: Variant, directory: Path) -> Path:
        say(f"building {DIST} {self.version} ({variant.name}); this takes a while")
        requirement = [f"{DIST}=={self.version}"]
        if self.sdist_sha256:
            hashes = " ".join(f"--hash=sha256:{h}" for h in sorted(self.sdist_sha256))
            (directory / "requirement.txt").write_text(f"{requirement[0]} {hashes}\n")
            requirement = ["--require-hashes", "-r", str(directory / "requirement.txt")]
        # --no-cache-dir: pip's cache ignores CMAKE_ARGS and would hand back any earlier
        # build of this version, the one that died included.
        self.pip(
            "wheel",
            "--no-cache-dir",
            "--no-deps",
            "--wheel-dir",
            str(directory),
            *requirement,
            cmake_args=variant.cmake_args,
        )
        built = sorted(directory.glob(f"{WHEEL_PREFIX}-*.whl"))
        if not built:
            raise InstallError(f"pip built no {DIST} wheel in {directory}")
        return built[0]

    def _judge(self, verdict: selftest.Verdict, what: str) -> bool:
        if verdict.ok:
            say(f"{what} runs on this CPU")
            return True
        if verdict.crashed:
            say(f"{what} cannot run on this CPU: {verdict.describe()}")
            self._forget_pip_cache()
            return False
        raise InstallError(
            f"cannot tell whether {what} of {DIST} runs here: {verdict.describe()}. "
            "Fix the cause above and run `make install` again."
        )

    def _install_wheel(self, wheel: Path) -> None:
        if self.installed_version() is not None:
            self.pip("uninstall", "--yes", "--quiet", DIST)
        constraints = ["--constraint", str(self.constraints)] if self.constraints else []
        self.pip("install", "--quiet", *constraints, str(wheel))

    def _forget_pip_cache(self) -> None:
        """Drop pip's cached wheels of this version: a plain `pip install` would reuse them."""
        with contextlib.suppress(InstallError):
            self.pip("cache", "remove", f"{WHEEL_PREFIX}-{self.version}")


def installed_version_of(python: str) -> str | None:
    """The llama-cpp-python version installed for `python`, asked of that interpreter."""
    code = (
        "import importlib.metadata as m\n"
        "try: print(m.version('llama-cpp-python'))\n"
        "except m.PackageNotFoundError: pass"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        help="where verified builds are kept (default: the user cache directory's llama-wheels)",
    )
    args = parser.parse_args(argv)
    cache_root = default_cache_root()
    wheelhouse = args.wheelhouse or cache_root / "llama-wheels"
    # The verdict lands where pensieved looks it up, so its first start need not check again.
    verdicts = cache_root / "llama-selftest.json"
    try:
        version = pinned_version()
        pins = locks.read_lock(locks.RUNTIME)
        sdist_sha256 = locked_sdist_hashes(pins, version)
    except (InstallError, locks.LockError, OSError) as exc:
        say(f"error: {exc}")
        return 1
    with tempfile.TemporaryDirectory(prefix="pensieve-llama-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(pins))
        installer = Installer(
            version=version,
            wheelhouse=wheelhouse,
            cpu=selftest.cpu_identity(),
            user_cmake_args=os.environ.get("CMAKE_ARGS", ""),
            machine=platform.machine(),
            python=sys.executable,
            check=lambda: selftest.cached_verdict(verdicts),
            sdist_sha256=sdist_sha256,
            constraints=constraints,
        )
        try:
            installer.install()
        except InstallError as exc:
            say(f"error: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
