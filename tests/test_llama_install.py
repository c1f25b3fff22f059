"""packaging/llama_install.py: which llama-cpp-python build gets installed, and from where.

pip is replaced by a stand-in that "builds" a wheel recording its CMAKE_ARGS, and the check
by one that dies with SIGILL unless the installed build has the portable flags: the decisions
are the real ones, and no test compiles llama.cpp.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pensieved.engine.selftest import Verdict

REPO = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
CPU_PLAIN = "Linux\nx86_64\nmodel name=Some CPU\nflags=fpu sse2 avx2 avx512f"
CPU_AMX = "Linux\nx86_64\nmodel name=Xeon\nflags=fpu avx512f amx_bf16 amx_tile amx_int8"


def load_installer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "llama_install", REPO / "packaging" / "llama_install.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["llama_install"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


li = load_installer()


class FakeMachine:
    """pip and the self-test, as far as the installer can see them."""

    def __init__(self, survives_with: str = "-mno-amx-int8") -> None:
        # The check dies unless the installed wheel's CMAKE_ARGS hold `survives_with`: by
        # default a build without -mno-amx-int8 traps, like a native one on an AMX Xeon.
        self.survives_with = survives_with
        self.installed: str | None = None  # the CMAKE_ARGS the installed wheel was built with
        self.commands: list[tuple[list[str], str | None]] = []
        self.checks = 0
        self.fail_check = False
        self.requirement_files: list[str] = []  # what each hash-checked build was asked for

    def run(self, argv: Sequence[str], env: dict[str, str]) -> None:
        argv = list(argv)
        self.commands.append((argv, env.get("CMAKE_ARGS")))
        verb = argv[3]
        if verb == "wheel":
            if "-r" in argv:
                self.requirement_files.append(Path(argv[argv.index("-r") + 1]).read_text())
            directory = Path(argv[argv.index("--wheel-dir") + 1])
            wheel = directory / f"llama_cpp_python-{VERSION}-cp311-cp311-linux_x86_64.whl"
            wheel.write_text(env.get("CMAKE_ARGS", ""))
        elif verb == "install":
            self.installed = Path(argv[-1]).read_text()
        elif verb == "uninstall":
            self.installed = None

    def check(self) -> Verdict:
        self.checks += 1
        if self.fail_check:
            return Verdict("failed", detail="exit status 1: ImportError")
        assert self.installed is not None, "checked with nothing installed"
        if self.survives_with in self.installed:
            return Verdict("ok")
        return Verdict("signal", signal_name="SIGILL")

    def installed_version(self) -> str | None:
        return VERSION if self.installed is not None else None

    def verbs(self) -> list[str]:
        return [argv[3] for argv, _ in self.commands]

    def builds(self) -> list[tuple[list[str], str | None]]:
        return [(argv, args) for argv, args in self.commands if argv[3] == "wheel"]


def installer(
    machine: FakeMachine,
    wheelhouse: Path,
    *,
    cpu: str = CPU_PLAIN,
    user_args: str = "",
    **options: Any,
) -> Any:
    return li.Installer(
        version=VERSION,
        wheelhouse=wheelhouse,
        cpu=cpu,
        user_cmake_args=user_args,
        machine="x86_64",
        python="/venv/bin/python",
        check=machine.check,
        run=machine.run,
        installed_version=machine.installed_version,
        **options,
    )


# ---- flags --------------------------------------------------------------------------------------


def test_portable_flags_on_x86_switch_amx_off_in_c_and_cxx() -> None:
    args = shlex.split(li.portable_cmake_args("", "x86_64"))
    assert args == [
        "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    ]


def test_portable_flags_keep_the_users_own() -> None:
    user = "-DGGML_BLAS=ON -DCMAKE_C_FLAGS='-O2 -g' -DCMAKE_CXX_FLAGS:STRING=-O2"
    args = shlex.split(li.portable_cmake_args(user, "x86_64"))
    assert args == [
        "-DGGML_BLAS=ON",
        "-DCMAKE_C_FLAGS=-O2 -g -mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        "-DCMAKE_CXX_FLAGS:STRING=-O2 -mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    ]


def test_portable_flags_elsewhere_turn_native_off() -> None:
    args = shlex.split(li.portable_cmake_args("-DGGML_NATIVE=ON -DGGML_METAL=ON", "aarch64"))
    assert args == ["-DGGML_METAL=ON", "-DGGML_NATIVE=OFF"]


def test_an_amx_cpu_predicts_the_trap_unless_the_user_chose_flags() -> None:
    assert li.predicts_trap(CPU_AMX, "")
    assert li.predicts_trap(CPU_AMX, "-DGGML_BLAS=ON")
    assert not li.predicts_trap(CPU_AMX, "-DGGML_NATIVE=OFF")
    assert not li.predicts_trap(CPU_PLAIN, "")


def test_pinned_version_is_read_from_pyproject() -> None:
    assert li.pinned_version() == VERSION


def test_wheel_key_changes_with_cpu_flags_and_version() -> None:
    native, portable = li.variants("", "x86_64")
    keys = {
        li.wheel_key(VERSION, CPU_PLAIN, native),
        li.wheel_key(VERSION, CPU_PLAIN, portable),
        li.wheel_key(VERSION, CPU_AMX, native),
        li.wheel_key("0.3.37", CPU_PLAIN, native),
    }
    assert len(keys) == 4


# ---- decisions ----------------------------------------------------------------------------------


def test_a_build_that_dies_is_rebuilt_portably_without_pips_cache(tmp_path: Path) -> None:
    machine = FakeMachine()
    chosen = installer(machine, tmp_path).install()
    assert chosen.name == "portable"
    builds = machine.builds()
    assert len(builds) == 2 and machine.checks == 2
    (first, first_args), (second, second_args) = builds
    assert "--no-cache-dir" in first and "--no-cache-dir" in second
    assert first[-1] == second[-1] == f"llama-cpp-python=={VERSION}"
    assert not first_args
    assert second_args is not None and "-mno-amx-int8" in second_args
    assert "-mno-amx-int8" in (machine.installed or "")
    # pip's own cached copies of this version are dropped once a build died.
    assert ["/venv/bin/python", "-m", "pip", "cache", "remove", f"llama_cpp_python-{VERSION}"] in [
        argv for argv, _ in machine.commands
    ]


def test_a_fresh_install_reuses_the_kept_wheel_and_checks_it(tmp_path: Path) -> None:
    installer(FakeMachine(), tmp_path).install()
    again = FakeMachine()  # a fresh clone: nothing installed
    chosen = installer(again, tmp_path).install()
    assert chosen.name == "portable"
    assert again.builds() == []  # no compile, and the build that died is not tried again
    assert again.checks == 1  # checked before it is trusted
    installs = [argv for argv, _ in again.commands if argv[3] == "install"]
    assert len(installs) == 1 and Path(installs[0][-1]).parent.parent == tmp_path


def test_a_kept_wheel_that_dies_now_is_dropped_and_rebuilt(tmp_path: Path) -> None:
    installer(FakeMachine(), tmp_path).install()
    kept = list(tmp_path.glob("*/llama_cpp_python-*.whl"))
    assert len(kept) == 1
    # Same CPU name and flags, but now the portable build dies too (say, a changed kernel).
    stricter = FakeMachine(survives_with="-mno-such-flag")
    with pytest.raises(li.InstallError, match=r"every build .* died"):
        installer(stricter, tmp_path).install()
    assert stricter.checks == 1 and stricter.builds() == []
    assert not kept[0].exists()
    # Next time it is not installed again: both builds are known to die.
    third = FakeMachine(survives_with="-mno-such-flag")
    with pytest.raises(li.InstallError):
        installer(third, tmp_path).install()
    assert third.commands == [] and third.checks == 0


def test_a_build_that_runs_is_used_as_it_is(tmp_path: Path) -> None:
    machine = FakeMachine(survives_with="")  # every build survives
    chosen = installer(machine, tmp_path).install()
    assert chosen.name == "as configured"
    assert len(machine.builds()) == 1 and machine.checks == 1


def test_an_installed_build_that_runs_is_left_alone(tmp_path: Path) -> None:
    machine = FakeMachine(survives_with="")
    machine.installed = ""
    assert installer(machine, tmp_path).install() is None
    assert machine.commands == [] and machine.checks == 1


def test_an_installed_build_that_dies_is_replaced_by_a_portable_one(tmp_path: Path) -> None:
    machine = FakeMachine()
    machine.installed = ""  # a native build, from pip's cache or by hand
    chosen = installer(machine, tmp_path).install()
    assert chosen.name == "portable"
    # The configured build is most likely what died: only the portable one is built.
    assert len(machine.builds()) == 1
    assert machine.verbs()[:2] == ["cache", "wheel"]
    # ... and it is remembered: a fresh clone does not build it to find out.
    fresh = FakeMachine()
    assert installer(fresh, tmp_path).install().name == "portable"
    assert fresh.builds() == [] and fresh.checks == 1


def test_an_amx_cpu_goes_straight_to_the_portable_build(tmp_path: Path) -> None:
    machine = FakeMachine()
    chosen = installer(machine, tmp_path, cpu=CPU_AMX).install()
    assert chosen.name == "portable"
    assert len(machine.builds()) == 1 and machine.checks == 1


def test_users_cmake_args_go_into_both_builds(tmp_path: Path) -> None:
    machine = FakeMachine()
    installer(machine, tmp_path, user_args="-DGGML_BLAS=ON").install()
    (_, first), (_, second) = machine.builds()
    assert first == "-DGGML_BLAS=ON"
    assert second is not None and shlex.split(second)[0] == "-DGGML_BLAS=ON"


def test_a_check_that_cannot_run_stops_the_install(tmp_path: Path) -> None:
    machine = FakeMachine()
    machine.fail_check = True
    with pytest.raises(li.InstallError, match=r"cannot tell whether .*ImportError"):
        installer(machine, tmp_path).install()
    assert len(machine.builds()) == 1  # no second build: a rebuild would not help
    assert not list(tmp_path.glob("*/verdict.json"))  # and nothing is remembered


# ---- the lock -----------------------------------------------------------------------------------


def test_only_the_locked_sdist_is_built_and_its_dependencies_are_the_locked_ones(
    tmp_path: Path,
) -> None:
    machine = FakeMachine(survives_with="")
    constraints = tmp_path / "constraints.txt"
    options = {"sdist_sha256": frozenset({"b" * 64, "a" * 64}), "constraints": constraints}
    installer(machine, tmp_path / "wheelhouse", **options).install()
    ((build, _),) = machine.builds()
    assert build[-3:-1] == ["--require-hashes", "-r"]
    hashes = f"--hash=sha256:{'a' * 64} --hash=sha256:{'b' * 64}"
    assert machine.requirement_files == [f"llama-cpp-python=={VERSION} {hashes}\n"]
    (install,) = [argv for argv, _ in machine.commands if argv[3] == "install"]
    assert install[-3:-1] == ["--constraint", str(constraints)]


def test_the_runtime_lock_gives_the_sdist_hash_and_the_constraints() -> None:
    pins = li.locks.read_lock(li.locks.RUNTIME)
    (llama,) = [pin for pin in pins if pin.name == "llama-cpp-python"]
    assert li.locked_sdist_hashes(pins, VERSION) == llama.hashes
    with pytest.raises(li.InstallError, match=r"the lock has 0\.3\.36: run `make lock`"):
        li.locked_sdist_hashes(pins, "0.0.1")
    lines = li.constraints_text(pins).splitlines()
    # Every other pin, markers kept; no hashes, which would demand one of our own wheel too.
    assert len(lines) == len(pins) - 1
    assert f"tornado=={next(p.version for p in pins if p.name == 'tornado')}" in lines
    assert any(line.startswith("numpy==") and " ; python_full_version" in line for line in lines)
    assert not any("llama" in line or "--hash" in line for line in lines)


# ---- with the real pip and a stand-in llama-cpp-python ------------------------------------------

STANDIN_BACKEND = '''
"""A PEP 517 backend that "compiles" llama_cpp: the module it writes is a build that dies
with SIGILL on import unless CMAKE_ARGS switch AMX off, like a native build on an AMX Xeon."""
import base64, hashlib, os, zipfile

NAME, VERSION = "llama_cpp_python", "0.3.36"
INFO = f"{NAME}-{VERSION}.dist-info"

BAD = "import os, signal\\nos.kill(os.getpid(), signal.SIGILL)\\n"
GOOD = """
import types
class _Batch:
    def __init__(self, n):
        self.token, self.pos, self.n_seq_id, self.logits = [0] * n, [0] * n, [0] * n, [0] * n
        self.seq_id = [[0] for _ in range(n)]
        self.n_tokens = 0
def llama_log_callback(fn): return fn
def llama_log_set(callback, data): pass
def llama_backend_init(): pass
def llama_model_default_params(): return types.SimpleNamespace()
def llama_context_default_params(): return types.SimpleNamespace()
def llama_model_load_from_file(path, params): return object()
def llama_init_from_model(model, params): return object()
def llama_batch_init(n, embd, seqs): return _Batch(n)
def llama_decode(ctx, batch): return 0
def llama_batch_free(batch): pass
def llama_free(ctx): pass
def llama_model_free(model): pass
"""

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    portable = "-mno-amx-int8" in os.environ.get("CMAKE_ARGS", "")
    files = {
        "llama_cpp/__init__.py": GOOD if portable else BAD,
        f"{INFO}/METADATA": (
            f"Metadata-Version: 2.1\\nName: llama-cpp-python\\nVersion: {VERSION}\\n"
        ),
        f"{INFO}/WHEEL": (
            "Wheel-Version: 1.0\\nGenerator: standin\\nRoot-Is-Purelib: true\\n"
            "Tag: py3-none-any\\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{INFO}/RECORD,,")
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{INFO}/RECORD", "\\n".join(record) + "\\n")
    return name
'''


def make_standin_sdist(directory: Path) -> None:
    import io
    import tarfile

    root = f"llama_cpp_python-{VERSION}"
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
        'backend-path = ["."]\n',
        "backend.py": STANDIN_BACKEND,
        "PKG-INFO": f"Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: {VERSION}\n",
    }
    with tarfile.open(directory / f"{root}.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def standin_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only the stand-in sdist, and caches wheels in a directory of the test's."""
    index = tmp_path / "index"
    index.mkdir()
    make_standin_sdist(index)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    return index


def new_venv(path: Path) -> str:
    import subprocess
    import venv

    venv.EnvBuilder(with_pip=True).create(path)
    python = str(path / "bin" / "python")
    subprocess.run([python, "-m", "pip", "--version"], check=True, capture_output=True)
    return python


def real_installer(python: str, wheelhouse: Path, commands: list[list[str]], **options: Any) -> Any:
    from pensieved.engine import selftest

    def run(argv: Sequence[str], env: dict[str, str]) -> None:
        commands.append(list(argv))
        li.run_command(argv, env)

    return li.Installer(
        version=VERSION,
        wheelhouse=wheelhouse,
        cpu=CPU_PLAIN,
        user_cmake_args="",
        machine="x86_64",
        python=python,
        check=lambda: selftest.run_check(python, timeout=60),
        run=run,
        **options,
    )


def test_with_real_pip_a_cached_bad_wheel_never_comes_back(
    tmp_path: Path, standin_index: Path
) -> None:
    import subprocess

    from pensieved.engine import selftest

    # A plain `pip install`, as before this installer existed: pip builds and caches the wheel
    # that dies, and hands it back later whatever CMAKE_ARGS say.
    first = new_venv(tmp_path / "venv1")
    pip = [first, "-m", "pip", "install", "--quiet", f"llama-cpp-python=={VERSION}"]
    subprocess.run(pip, check=True)
    assert selftest.run_check(first, timeout=60).crashed
    subprocess.run([first, "-m", "pip", "uninstall", "--yes", "--quiet", "llama-cpp-python"])
    env = {**os.environ, "CMAKE_ARGS": li.portable_cmake_args("", "x86_64")}
    subprocess.run(pip, check=True, env=env)
    assert selftest.run_check(first, timeout=60).crashed, "pip's cache ignored CMAKE_ARGS"

    # The installer: the installed build dies, the portable one is built anew and runs.
    wheelhouse = tmp_path / "wheelhouse"
    commands: list[list[str]] = []
    chosen = real_installer(first, wheelhouse, commands).install()
    assert chosen is not None and chosen.name == "portable"
    assert selftest.run_check(first, timeout=60).ok
    builds = [argv for argv in commands if argv[3] == "wheel"]
    assert len(builds) == 1 and "--no-cache-dir" in builds[0]
    # pip's cached copy of the build that died is gone.
    cached = subprocess.run(
        [first, "-m", "pip", "cache", "list", "llama_cpp_python"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "llama_cpp_python" not in cached.stdout

    # A fresh clone on the same machine: installed from the wheelhouse, checked, not built.
    second = new_venv(tmp_path / "venv2")
    commands.clear()
    chosen = real_installer(second, wheelhouse, commands).install()
    assert chosen is not None and chosen.name == "portable"
    assert [argv[3] for argv in commands] == ["install"]
    assert selftest.run_check(second, timeout=60).ok


def test_with_real_pip_an_sdist_that_is_not_the_locked_one_is_never_built(
    tmp_path: Path, standin_index: Path
) -> None:
    import hashlib

    python = new_venv(tmp_path / "venv")
    commands: list[list[str]] = []
    wrong = real_installer(
        python, tmp_path / "wheelhouse", commands, sdist_sha256=frozenset({"0" * 64})
    )
    with pytest.raises(li.InstallError, match="failed with exit status"):
        wrong.install()
    assert li.installed_version_of(python) is None
    sdist = standin_index / f"llama_cpp_python-{VERSION}.tar.gz"
    locked = frozenset({hashlib.sha256(sdist.read_bytes()).hexdigest()})
    chosen = real_installer(
        python, tmp_path / "wheelhouse", commands, sdist_sha256=locked
    ).install()
    assert chosen is not None and li.installed_version_of(python) == VERSION
