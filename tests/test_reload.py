"""How a config change is applied: live, rebind, model load or restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pensieve.config import Config, ConfigError, parse_config
from pensieve.wire import ReloadResult
from pensieved.engine.service import Engine
from pensieved.errors import ModelLoadError
from pensieved.reload import Reloader, action_for, plan_changes, watch_model_files


def test_actions_per_key() -> None:
    assert action_for("logging.level") == "live"
    assert action_for("server.max_concurrent_requests") == "live"
    assert action_for("server.enable_cors") == "live"
    assert action_for("model.aliases") == "live"
    assert action_for("model.max_output_tokens") == "live"
    assert action_for("server.port") == "rebind"
    assert action_for("server.host") == "rebind"
    assert action_for("model.model_path") == "model"
    assert action_for("model.context_size") == "model"
    assert action_for("model.kv_unified") == "model"
    assert action_for("model.flash_attention") == "model"
    assert action_for("model.gpu_layers") == "model"
    assert action_for("model.threads") == "model"
    assert action_for("server.socket_path") == "restart"


def test_live_changes_need_no_model_load(tmp_path: Path) -> None:
    model = str(tmp_path / "a.gguf")
    old = parse_config({"model": {"model_path": model}})
    new = parse_config(
        {
            "logging": {"level": "debug", "format": "json"},
            "server": {"max_concurrent_requests": 2, "request_timeout_ms": 5000},
            "model": {"model_path": model, "aliases": {"claude-*": model}},
        }
    )
    plan = plan_changes(old, new, old, engine_ok=True)
    assert not plan.model_load and not plan.rebind and plan.logging
    assert {c.key for c in plan.changes} == {
        "logging.level",
        "logging.format",
        "server.max_concurrent_requests",
        "server.request_timeout_ms",
        "model.aliases",
    }
    assert all(c.action == "live" for c in plan.changes)


def test_model_keys_need_a_load(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    old = parse_config({"model": {"model_path": a}})
    for change in (
        {"model_path": b},
        {"model_path": a, "context_size": 4096},
        {"model_path": a, "gpu_layers": 0},
        {"model_path": a, "threads": 3},
    ):
        new = parse_config({"model": change})
        assert plan_changes(old, new, old, engine_ok=True).model_load, change


def test_a_new_alias_target_loads_on_its_first_request_not_at_reload(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    old = parse_config({"model": {"model_path": a}})
    for aliases in ({"claude-haiku-*": b}, {"claude-haiku-*": {"model_path": b}}):
        new = parse_config({"model": {"model_path": a, "aliases": aliases}})
        plan = plan_changes(old, new, old, engine_ok=True)
        assert not plan.model_load, aliases
        assert [(c.key, c.action) for c in plan.changes] == [("model.aliases", "live")]


def test_port_change_rebinds() -> None:
    old = parse_config({"server": {"port": 8080}})
    new = parse_config({"server": {"port": 9090}})
    plan = plan_changes(old, new, old, engine_ok=True)
    assert plan.rebind and not plan.model_load
    assert plan.changes[0].old == 8080 and plan.changes[0].new == 9090


def test_a_failed_model_is_retried_even_without_changes() -> None:
    config = parse_config({})
    plan = plan_changes(config, config, config, engine_ok=False)
    assert plan.model_load and not plan.changes


def test_load_need_is_judged_against_what_the_engine_loaded(tmp_path: Path) -> None:
    # The running config already names b (its load failed): the engine still has a.
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    loaded = parse_config({"model": {"model_path": a}})
    wanted = parse_config({"model": {"model_path": b}})
    assert plan_changes(wanted, wanted, loaded, engine_ok=True).model_load


def test_the_plan_carries_the_new_config_and_what_it_needs() -> None:
    old = parse_config({})
    new = parse_config({"logging": {"level": "debug"}, "server": {"socket_path": "/tmp/x.sock"}})
    plan = plan_changes(old, new, old, engine_ok=True)
    assert plan.config is new
    assert plan.logging and not plan.rebind and not plan.model_load
    assert {c.key: c.action for c in plan.changes} == {
        "logging.level": "live",
        "server.socket_path": "restart",
    }


def _reloader(tmp_path: Path, text: str, overrides: dict[str, object]) -> Reloader:
    path = tmp_path / "config.json"
    path.write_text(text or "{}")
    return Reloader(Engine(Config()), path, overrides, missing_ok=False)


def test_next_plan_reads_the_file_with_the_flags_on_top(tmp_path: Path) -> None:
    reloader = _reloader(
        tmp_path, '{"server": {"port": 9000, "host": "127.0.0.2"}}', {"server.port": 9100}
    )
    plan = asyncio.run(reloader.next_plan(Config()))
    assert (plan.config.server.host, plan.config.server.port) == ("127.0.0.2", 9100)
    assert plan.rebind
    # The engine has loaded nothing yet: the models are (re)loaded.
    assert plan.model_load


def test_next_plan_refuses_an_invalid_file(tmp_path: Path) -> None:
    reloader = _reloader(tmp_path, '{"server": {"port": "x"}}', {})
    with pytest.raises(ConfigError, match=r"server\.port"):
        asyncio.run(reloader.next_plan(Config()))


def test_a_plan_waits_for_the_model_load_in_progress(tmp_path: Path) -> None:
    reloader = _reloader(tmp_path, "", {})

    async def scenario() -> None:
        release = asyncio.Event()

        async def load() -> None:
            await release.wait()

        reloader.begin_model_load(load(), "a.gguf")
        assert reloader.model_loading == "a.gguf"
        planning = asyncio.ensure_future(reloader.next_plan(Config()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not planning.done()
        release.set()
        await planning
        assert reloader.model_loading is None

    asyncio.run(scenario())


def test_a_failed_background_load_marks_the_last_reload_failed(tmp_path: Path) -> None:
    reloader = _reloader(tmp_path, "", {})
    reloader.last = ReloadResult(time=0.0, trigger="watch", ok=True, model_loading=True)

    async def scenario() -> None:
        async def load() -> None:
            raise ModelLoadError("cannot load b.gguf: not a GGUF file")

        reloader.begin_model_load(load(), "b.gguf")
        await reloader.next_plan(Config())  # waits for the load

    asyncio.run(scenario())
    assert reloader.last is not None
    assert not reloader.last.ok and not reloader.last.model_loading
    assert reloader.last.error == "cannot load b.gguf: not a GGUF file"


def test_model_file_watch_loads_a_file_once_it_appears_and_settles(tmp_path: Path) -> None:
    model = tmp_path / "later.gguf"
    calls: list[tuple[float, int]] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        changed = asyncio.Event()

        async def on_change() -> None:
            info = model.stat()
            calls.append((info.st_mtime, info.st_size))
            changed.set()

        watcher = asyncio.ensure_future(watch_model_files(lambda: model, on_change, stop))
        await asyncio.sleep(0.3)
        assert not calls  # nothing there yet
        with model.open("wb") as f:  # written in pieces, as a copy does
            for _ in range(3):
                f.write(b"x" * 1000)
                f.flush()
                await asyncio.sleep(0.3)
        await asyncio.wait_for(changed.wait(), 15)
        stop.set()
        await asyncio.wait_for(watcher, 10)

    asyncio.run(scenario())
    assert [size for _, size in calls] == [3000]  # only the finished file was loaded
