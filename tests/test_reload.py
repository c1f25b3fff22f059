"""How a config change is applied: live, rebind, model load or restart."""

from __future__ import annotations

from pathlib import Path

from pensieve.config import parse_config
from pensieved.reload import action_for, plan_changes


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


def test_model_keys_and_new_alias_targets_need_a_load(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    old = parse_config({"model": {"model_path": a}})
    for change in (
        {"model_path": b},
        {"model_path": a, "context_size": 4096},
        {"model_path": a, "gpu_layers": 0},
        {"model_path": a, "threads": 3},
        {"model_path": a, "aliases": {"claude-haiku-*": b}},
    ):
        new = parse_config({"model": change})
        assert plan_changes(old, new, old, engine_ok=True).model_load, change


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
