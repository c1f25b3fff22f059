"""Hugging Face model names: parsing, llama-server's `-hf` file choice, the cache lookup that
the daemon resolves config values with, and the catalog's data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pensieve import catalog, hfref
from pensieve.hfref import HfRef, NoGgufError, RefError, UnknownQuantError, parse_ref
from pensieved.engine import memory

REPO = Path(__file__).resolve().parents[2]
DIALECTS = {
    "hermes",
    "qwen3-xml",
    "glm",
    "minimax",
    "harmony",
    "mistral",
    "llama3",
    "deepseek",
    "kimi-k2",
    "gemma4",
}


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("unsloth/Qwen3-8B-GGUF", HfRef("unsloth/Qwen3-8B-GGUF")),
        ("unsloth/Qwen3-8B-GGUF:q4_k_m", HfRef("unsloth/Qwen3-8B-GGUF", quant="Q4_K_M")),
        ("hf:a/b:UD-Q4_K_XL".replace("UD-", ""), HfRef("a/b", quant="Q4_K_XL")),
        ("a/b/sub/x-Q8_0.gguf", HfRef("a/b", file="sub/x-Q8_0.gguf")),
        ("hf:a/b/x.gguf", HfRef("a/b", file="x.gguf")),
    ],
)
def test_addresses_parse(text: str, ref: HfRef) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text", ["", "just-a-name", "a/b/c", "a/b:", "a/b:Q4 K", "../x/y", "a b/c"]
)
def test_other_text_is_not_an_address(text: str) -> None:
    with pytest.raises(RefError, match="is not a model name"):
        parse_ref(text)


FILES = [
    "README.md",
    "x-Q2_K.gguf",
    "x-Q8_0.gguf",
    "x-Q4_K_M.gguf",
    "mmproj-x-F16.gguf",
    "mmproj-x-Q8_0.gguf",
    "x-imatrix.gguf",
    "BF16/x-BF16-00002-of-00002.gguf",
    "BF16/x-BF16-00001-of-00002.gguf",
]


def test_the_default_is_q4_k_m_then_q8_0_then_the_first_model_file() -> None:
    assert hfref.select_files(FILES, HfRef("a/b")).model_files == ["x-Q4_K_M.gguf"]
    no_q4 = [f for f in FILES if "Q4_K_M" not in f]
    assert hfref.select_files(no_q4, HfRef("a/b")).model_files == ["x-Q8_0.gguf"]
    only = ["README.md", "mmproj-x-F16.gguf", "x-Q5_K_S.gguf"]
    assert hfref.select_files(only, HfRef("a/b")).model_files == ["x-Q5_K_S.gguf"]


def test_a_split_quant_brings_every_part_in_order_and_the_closest_mmproj() -> None:
    plan = hfref.select_files(FILES, HfRef("a/b", quant="BF16"))
    assert plan.model_files == [
        "BF16/x-BF16-00001-of-00002.gguf",
        "BF16/x-BF16-00002-of-00002.gguf",
    ]
    assert plan.mmproj == "mmproj-x-F16.gguf"  # 16 bits, as the model
    assert hfref.select_files(FILES, HfRef("a/b", quant="Q8_0")).mmproj == "mmproj-x-Q8_0.gguf"


def test_an_unknown_quant_names_the_ones_there_are() -> None:
    with pytest.raises(UnknownQuantError) as info:
        hfref.select_files(FILES, HfRef("a/b", quant="Q5_K_M"))
    assert info.value.available == ["Q2_K", "Q8_0", "Q4_K_M", "BF16"]
    with pytest.raises(NoGgufError):
        hfref.select_files(["README.md", "mmproj-x-F16.gguf"], HfRef("a/b"))


def _snapshot(cache: Path, repo: str, files: list[str]) -> Path:
    folder = hfref.repo_folder(repo, cache)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("c" * 40)
    snap = folder / "snapshots" / ("c" * 40)
    for name in files:
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(b"GGUF")
    return snap


def test_a_pulled_model_is_found_in_the_cache_and_a_missing_one_names_its_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snap = _snapshot(tmp_path, "a/b", ["x-Q4_K_M-00001-of-00002.gguf"])
    # One part of two is not a model.
    assert hfref.model_file("hf:a/b:Q4_K_M").name == "a%2Fb:Q4_K_M"
    assert hfref.missing_message(hfref.model_file("hf:a/b:Q4_K_M")) == (
        "missing: run pensievectl pull a/b:Q4_K_M"
    )
    (snap / "x-Q4_K_M-00002-of-00002.gguf").write_bytes(b"GGUF")
    assert hfref.model_file("hf:a/b:Q4_K_M") == snap / "x-Q4_K_M-00001-of-00002.gguf"
    assert hfref.model_file("hf:a/b") == snap / "x-Q4_K_M-00001-of-00002.gguf"
    entry = catalog.entries()[0]
    assert hfref.missing_message(hfref.model_file(entry.name)) == (
        f"missing: run pensievectl pull {entry.name}"
    )
    assert hfref.model_file("~/m.gguf") == Path.home() / "m.gguf"
    assert hfref.missing_message(Path("/m/x.gguf")) is None


def test_the_catalog_is_complete_and_consistent() -> None:
    entries = catalog.entries()
    assert len({e.name for e in entries}) == len(entries)
    for e in entries:
        assert e.dialect in DIALECTS, e.name
        plan = hfref.select_files([e.file], HfRef(e.repo, quant=e.quant))
        assert plan.primary == e.file, e.name  # the quant picks the listed file
        assert e.memory_gb > e.size_gb and e.context >= 32768, e.name
        assert hfref.parse_ref(e.address).repo == e.repo
    text = (REPO / "pensieve" / "catalog.toml").read_text()
    # Every entry cites its repository's page.
    for e in entries:
        assert f"https://huggingface.co/{e.repo}" in text, e.name


def test_the_budget_is_the_daemons() -> None:
    assert catalog.DEFAULT_BUDGET_FRACTION == memory.DEFAULT_BUDGET_FRACTION
    assert catalog.budget_bytes(None, 32 * catalog.GB) == 16 * catalog.GB
    assert catalog.budget_bytes(1000, 0) == 1000 * 1024 * 1024
    smallest = min(catalog.entries(), key=lambda e: e.memory_gb)
    assert catalog.why_not(smallest, 1) is not None
    assert catalog.best_fit(1) is None
    assert catalog.best_fit(10**15) == max(catalog.entries(), key=lambda e: e.memory_gb)


def test_docs_models_md_has_the_catalogs_table() -> None:
    """docs/models.md's table is generated: `python -m pensieve.catalog` prints it."""
    text = (REPO / "docs" / "models.md").read_text()
    table = re.search(r"<!-- catalog table -->\n(.*?)\n<!-- end -->", text, re.S)
    assert table is not None, "docs/models.md lost its catalog table markers"
    assert table[1] == catalog.memory_table(), "regenerate it: python -m pensieve.catalog"
