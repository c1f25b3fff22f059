"""Engine's model lifecycle with fake runtimes: lazy loads, LRU eviction under
`model.max_loaded_models`, 529 when nothing can be freed, idle unload. (The real models and
their saved caches: tests/integration/test_models.py.)"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pensieve.config import parse_config
from pensieved.engine import lifecycle
from pensieved.engine.service import Engine
from pensieved.errors import ModelLoadError, NoChatTemplateError, OverloadedError


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in an event loop of its own (pytest sees the same parameters)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@dataclass
class FakeModel:
    name: str
    chat_template: str | None = "{{ messages }}"


@dataclass
class FakeRuntime:
    model: FakeModel
    users: int = 0
    last_used: float = field(default_factory=time.time)
    closed: bool = False

    @property
    def busy(self) -> bool:
        return self.users > 0

    def close(self, store: Any = None) -> None:
        self.closed = True


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Model loads succeed at once (a file named `broken*` fails, one named `badtemplate*`
    carries a template that does not compile); the names loaded."""
    loaded: list[str] = []

    def fake_load(settings: Any, store: Any, keep_loading: Any) -> FakeRuntime:
        if settings.path.name.startswith("broken"):
            raise ModelLoadError(f"cannot load model {settings.path}")
        loaded.append(settings.path.name)
        if settings.path.name.startswith("badtemplate"):  # its own template does not compile
            return FakeRuntime(FakeModel(settings.path.stem, "{% for %}"))
        return FakeRuntime(FakeModel(settings.path.stem))

    monkeypatch.setattr(lifecycle, "_load_runtime", fake_load)
    return loaded


def engine_for(tmp_path: Path, **model: Any) -> Engine:
    aliases = {f"{name}-*": str(tmp_path / f"{name}.gguf") for name in ("a", "b", "c", "broken")}
    config = parse_config(
        {
            "server": {"request_timeout_ms": 1000},
            "model": {
                "model_path": str(tmp_path / "default.gguf"),
                "prefix_cache_dir": str(tmp_path / "kv"),
                "aliases": aliases,
                **model,
            },
        }
    )
    return Engine(config)


def states(engine: Engine) -> dict[str, str]:
    return {path.name: entry.state for path, entry in engine._models.entries.items()}


def entry(engine: Engine, file: str) -> Any:
    return next(e for p, e in engine._models.entries.items() if p.name == file)


async def use(engine: Engine, name: str) -> Any:
    runtime, _ = await engine._acquire(name)
    engine._release(runtime)
    return runtime


@in_loop
async def test_aliases_load_on_first_use_and_the_least_recently_used_makes_room(
    tmp_path: Path, loads: list[str]
) -> None:
    engine = engine_for(tmp_path, max_loaded_models=2)
    await engine.load(engine.config)
    assert loads == ["default.gguf"]
    assert states(engine)["a.gguf"] == "unloaded"
    await use(engine, "a-1")
    default = engine._models.default_entry
    assert default is not None and default.runtime is not None
    default.runtime.last_used -= 10  # the default is the least recently used
    await use(engine, "b-1")
    assert loads == ["default.gguf", "a.gguf", "b.gguf"]
    assert states(engine) == {
        "default.gguf": "unloaded",
        "a.gguf": "loaded",
        "b.gguf": "loaded",
        "c.gguf": "unloaded",
        "broken.gguf": "unloaded",
    }
    assert engine.metrics.unloads.value(model="default", reason="room") == 1


@in_loop
async def test_a_busy_model_is_never_evicted_and_the_wait_ends_in_529(
    tmp_path: Path, loads: list[str]
) -> None:
    engine = engine_for(tmp_path, max_loaded_models=1)
    await engine.load(engine.config)
    runtime, _ = await engine._acquire("m")  # held, as by a stream in flight
    started = time.monotonic()
    with pytest.raises(OverloadedError) as info:
        await engine._acquire("a-1")
    assert time.monotonic() - started >= 0.9  # it waited for room, up to the request timeout
    assert info.value.retry_after_s > 0 and "max_loaded_models" in str(info.value)
    assert states(engine)["default.gguf"] == "loaded" and not runtime.closed

    # Once the holder lets go, the same request succeeds (the default makes room).
    async def release_soon() -> None:
        await asyncio.sleep(0.2)
        engine._release(runtime)

    releaser = asyncio.ensure_future(release_soon())
    await use(engine, "a-1")
    await releaser
    assert states(engine)["a.gguf"] == "loaded" and runtime.closed


@in_loop
async def test_requests_waiting_for_one_load_share_it(tmp_path: Path, loads: list[str]) -> None:
    engine = engine_for(tmp_path)
    await engine.load(engine.config)
    pings: list[int] = []

    async def ping() -> None:
        pings.append(1)

    results = await asyncio.gather(*(engine.ensure_loaded("c-1", ping) for _ in range(3)))
    assert results == [None, None, None]
    assert loads.count("c.gguf") == 1


@in_loop
async def test_a_failed_load_fails_its_request_and_is_retried_by_the_next(
    tmp_path: Path, loads: list[str]
) -> None:
    engine = engine_for(tmp_path)
    await engine.load(engine.config)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
            await engine._acquire("broken-1")
    broken = entry(engine, "broken.gguf")
    assert broken.state == "unloaded" and "broken.gguf" in broken.error
    await use(engine, "m")  # the others are unaffected


@in_loop
async def test_idle_models_are_unloaded_and_load_again_on_the_next_request(
    tmp_path: Path, loads: list[str]
) -> None:
    engine = engine_for(tmp_path, idle_unload_s=0.2)
    await engine.load(engine.config)
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(engine.unload_idle(stop))
    try:
        deadline = time.monotonic() + 5
        while states(engine)["default.gguf"] != "unloaded":
            assert time.monotonic() < deadline, states(engine)
            await asyncio.sleep(0.05)
        assert entry(engine, "default.gguf").unloaded_at is not None
        assert engine.status().state == "ready"  # the daemon serves on: it loads on demand
        await use(engine, "m")
        assert loads == ["default.gguf", "default.gguf"]
    finally:
        stop.set()
        await watcher
    assert engine.metrics.unloads.value(model="default", reason="idle") == 1


@in_loop
async def test_a_lowered_max_loaded_models_unloads_the_least_recently_used_at_once(
    tmp_path: Path, loads: list[str]
) -> None:
    engine = engine_for(tmp_path, max_loaded_models=3)
    await engine.load(engine.config)
    await use(engine, "a-1")
    await use(engine, "b-1")
    assert list(states(engine).values()).count("loaded") == 3
    lowered = engine.config.model_copy(
        update={"model": engine.config.model.model_copy(update={"max_loaded_models": 1})}
    )
    engine.apply_live_settings(lowered)
    deadline = time.monotonic() + 5
    while list(states(engine).values()).count("loaded") > 1:
        assert time.monotonic() < deadline, states(engine)
        await asyncio.sleep(0.02)
    assert states(engine)["b.gguf"] == "loaded"  # the most recently used one stays


@in_loop
async def test_a_template_that_cannot_render_is_reported_when_its_model_loads(
    tmp_path: Path, loads: list[str]
) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ raise_exception('no system here') }}")
    aliases = {"bad-*": str(tmp_path / "badtemplate.gguf")}
    engine = engine_for(tmp_path, chat_template=str(broken), aliases=aliases)
    await engine.load(engine.config)
    # What status and /health say (state error, with this error).
    assert engine.error is not None
    assert str(broken) in engine.error and "no system here" in engine.error
    with pytest.raises(NoChatTemplateError, match="no system here"):
        await use(engine, "anything")

    bad = entry(engine, "badtemplate.gguf")
    assert bad.template_problem is None  # its own template is read when it loads
    with pytest.raises(NoChatTemplateError, match=r"badtemplate\.gguf's own chat template"):
        await use(engine, "bad-1")
    assert "model.aliases.bad-*.chat_template" in bad.template_problem
