from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from pensieved.engine.caching.base import Architecture, CacheStrategy
from pensieved.engine.caching.full import FullAttention
from pensieved.engine.caching.swa import SlidingWindow
from pensieved.engine.checkpoints import Checkpoint
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import MAGIC, PrefixStore, _read, _write, model_key
from pensieved.engine.slots import Slot


def test_a_saved_slot_reads_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "k" / "slot-0.kv"
    state = bytes(range(256)) * 10
    _write(path, Slot(0, tokens=[5, 6, 7]), memoryview(state), None, 0)
    tokens, read, base, shared, _ = _read(path)
    assert tokens == [5, 6, 7] and (base, shared) == (None, 0)
    assert bytes(read) == state
    assert not list(tmp_path.glob("k/*.partial"))


def test_checkpoints_are_saved_after_the_state_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "slot-0.kv"
    saved = [Checkpoint(2, b"first"), Checkpoint(4, b"second state")]
    _write(path, Slot(0, tokens=[1, 2, 3, 4, 5]), memoryview(b"whole"), None, 0, saved)
    tokens, state, _, _, checkpoints = _read(path)
    assert tokens == [1, 2, 3, 4, 5]
    assert bytes(state) == b"whole"
    assert checkpoints == saved
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="sizes"):
        _read(path)  # a checkpoint cut short


def test_a_tail_names_its_base_and_the_positions_it_shares(tmp_path: Path) -> None:
    path = tmp_path / "slot-1.kv"
    _write(path, Slot(2, tokens=[1, 2, 3, 4]), memoryview(b"tail"), 0, 3)
    assert _read(path)[2:4] == (0, 3)
    _write(path, Slot(2, tokens=[1, 2]), memoryview(b"tail"), 0, 2)
    with pytest.raises(ValueError, match="shared"):
        _read(path)  # nothing of its own: not a tail


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"NOT-PENSIEVE\n" + data[len(MAGIC) :],  # foreign file
        lambda data: data[:-10],  # cut short while being copied
        lambda data: data + b"extra",  # sizes disagree with the header
        lambda data: data[: len(MAGIC) + 5],  # header cut
    ],
)
def test_damaged_files_are_refused(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "slot-0.kv"
    _write(path, Slot(0, tokens=[1, 2]), memoryview(b"x" * 100), None, 0)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ValueError):
        _read(path)


def test_pruning_deletes_the_oldest_models_first(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, budget_bytes=2500)
    for i, name in enumerate(["old", "middle", "new"]):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "slot-0.kv").write_bytes(b"x" * 1000)
        os.utime(folder, (1000 + i, 1000 + i))
    store._prune(keep=tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "new"]


@dataclass
class FakeModel:
    settings: ModelSettings
    n_ctx: int
    file_identity: tuple[str, int, int]
    unified: bool = True
    strategy: CacheStrategy = field(default_factory=FullAttention)

    @property
    def slots(self) -> int | str:
        return self.settings.slots

    @property
    def pool_tokens(self) -> int:
        return self.n_ctx * 5 // 4


def key_of(
    settings: ModelSettings,
    n_ctx: int = 2048,
    unified: bool = True,
    strategy: CacheStrategy | None = None,
) -> str:
    stat = settings.path.stat()
    identity = (str(settings.path), stat.st_size, stat.st_mtime_ns)
    fake = FakeModel(settings, n_ctx, identity, unified, strategy or FullAttention())
    return model_key(cast(LoadedModel, fake))


def test_the_key_changes_with_the_model_file_and_its_settings(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    settings = ModelSettings(model, 2048, 0, None, 512, 2)
    key = key_of(settings)
    assert key == key_of(settings)
    # Threads and batch size do not change what a KV state means.
    assert key == key_of(replace(settings, threads=3, batch_size=64))
    assert key != key_of(replace(settings, slots=4))
    assert key != key_of(settings, n_ctx=4096)
    assert key != key_of(replace(settings, gpu_layers=-1))
    assert key != key_of(replace(settings, flash_attention="off"))
    assert key != key_of(replace(settings, kv_cache_type="q8_0"))
    assert key != key_of(settings, unified=False)  # a cache per slot
    window = Architecture("swa", 512)
    small, full = SlidingWindow(window, full_cache=False), SlidingWindow(window, full_cache=True)
    assert key_of(settings, strategy=small) != key_of(settings, strategy=full)
    os.utime(model, ns=(1, 1))
    assert key != key_of(settings)


def test_a_disabled_store_writes_nothing(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path / "kv", budget_bytes=0)
    model = cast(LoadedModel, SimpleNamespace(strategy=FullAttention()))
    assert store.save(model, [Slot(0, tokens=list(range(5000)))]) == 0
    assert store.restore(model, [Slot(0)]) == 0
    assert not (tmp_path / "kv").exists()


def test_sliding_window_models_with_the_full_cache_are_not_saved(tmp_path: Path) -> None:
    # Their saved state keeps only the attention window and they have no checkpoints: no
    # prefix of it could be reused.
    store = PrefixStore(tmp_path / "kv", budget_bytes=10**9)
    strategy = SlidingWindow(Architecture("swa", 4096), full_cache=True)
    model = cast(LoadedModel, SimpleNamespace(strategy=strategy))
    assert store.save(model, [Slot(0, tokens=list(range(5000)))]) == 0
    assert not (tmp_path / "kv").exists()
