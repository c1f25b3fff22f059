"""Config validation: every error names its key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pensieve.config import (
    Config,
    ConfigError,
    api_key,
    apply_overrides,
    diff_configs,
    load_config_file,
    parse_config,
    upstream_key,
)


def paths_of(exc: ConfigError) -> list[str]:
    return [issue.path for issue in exc.issues]


def test_original_design_file_loads_unchanged(tmp_path: Path) -> None:
    original = {
        "server": {
            "host": "127.0.0.1",
            "port": 8080,
            "max_concurrent_requests": 4,
            "request_timeout_ms": 300000,
            "enable_cors": False,
        },
        "logging": {"level": "INFO", "format": "text", "file": None},
        "model": {"model_path": None, "model_type": "gguf", "context_size": 4096, "gpu_layers": 0},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(original))
    config = load_config_file(path)
    assert config.server.port == 8080
    assert config.logging.level == "info"
    assert config.model.context_size == 4096
    assert config.model.model_path is None


def test_defaults() -> None:
    config = Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.model.aliases == {}


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        ({"server": {"port": "8080"}}, "server.port", "integer"),
        ({"server": {"port": 70000}}, "server.port", "65535"),
        ({"server": {"prot": 1}}, "server.prot", "unknown key"),
        ({"bogus": {}}, "bogus", "unknown key"),
        ({"model": {"context_size": 10}}, "model.context_size", "256"),
        ({"model": {"gpu_layers": -5}}, "model.gpu_layers", "-1"),
        ({"model": {"threads": 0}}, "model.threads", "1"),
        ({"model": {"model_type": "onnx"}}, "model.model_type", "gguf"),
        ({"model": {"aliases": {"claude-*": 3}}}, "model.aliases.claude-*", "string"),
        ({"logging": {"level": "loud"}}, "logging.level", "debug"),
        ({"server": {"enable_cors": "yes"}}, "server.enable_cors", "boolean"),
        ({"server": {"max_concurrent_requests": 0}}, "server.max_concurrent_requests", "1"),
        ({"server": {"socket_path": "/tmp/" + "x" * 200}}, "server.socket_path", "104"),
        ({"server": {"host": "0.0.0.0"}}, "server.host", "api_key"),
        ({"model": {"context_size": "big"}}, "model.context_size", "'auto'"),
        ({"model": {"slots": 0}}, "model.slots", "between 1 and 64"),
        ({"model": {"slots": True}}, "model.slots", "integer or 'auto'"),
        ({"model": {"memory_budget_mb": 10}}, "model.memory_budget_mb", "64"),
        ({"model": {"kv_cache_type": "q5_1"}}, "model.kv_cache_type", "q8_0"),
        ({"model": {"kv_unified": "yes"}}, "model.kv_unified", "auto"),
        (
            {"model": {"kv_cache_type": "q4_0", "flash_attention": "off"}},
            "model.kv_cache_type",
            "model.flash_attention",
        ),
    ],
)
def test_errors_name_key_path(data: dict[str, object], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert path in paths_of(info.value), info.value.issues
    message = next(i.message for i in info.value.issues if i.path == path)
    assert fragment in message or fragment in str(info.value)


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"port": -1, "host": 5}, "model": {"context_size": "big"}})
    assert {"server.port", "server.host", "model.context_size"} <= set(paths_of(info.value))


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{\n  "server": {"port": 80,}\n}')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.issues[0].path == "(json)"
    assert "line 2" in info.value.issues[0].message


def test_top_level_must_be_object() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([1, 2])
    assert paths_of(info.value) == ["(top level)"]


def test_missing_file(tmp_path: Path) -> None:
    assert load_config_file(tmp_path / "none.json", missing_ok=True) == Config()
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "none.json")
    assert "no such file" in str(info.value)


def test_overrides_and_diff() -> None:
    base = Config()
    changed = apply_overrides(base, {"server.port": 9999, "logging.level": "debug"})
    assert changed.server.port == 9999
    assert diff_configs(base, changed) == {
        "server.port": (8080, 9999),
        "logging.level": ("info", "debug"),
    }
    with pytest.raises(ConfigError):
        apply_overrides(base, {"server.port": 123456})


def test_remote_host_allowed_with_key() -> None:
    config = parse_config({"server": {"host": "0.0.0.0", "api_key": "secret"}})
    assert config.server.host == "0.0.0.0"


def test_loopback_lookalike_host_needs_a_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"host": "127.0.0.1.example.com"}})
    assert paths_of(info.value) == ["server.host"]
    assert parse_config({"server": {"host": "127.0.0.2"}}).server.host == "127.0.0.2"
    assert parse_config({"server": {"host": "::1"}}).server.host == "::1"


# ---- model.upstreams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "path", "fragment"),
    [
        ({"urls": []}, "model.upstreams.claude-opus-*.urls", "at least 1"),
        ({"urls": ["gpu-box:8000"]}, "model.upstreams.claude-opus-*.urls", "http://"),
        ({"urls": ["http://x/?a=1"]}, "model.upstreams.claude-opus-*.urls", "query"),
        ({"urls": ["http://u:pw@x"]}, "model.upstreams.claude-opus-*.urls", "api_key"),
        (
            {"urls": ["http://x"], "protocol": "grpc"},
            "model.upstreams.claude-opus-*.protocol",
            "openai",
        ),
        (
            {"urls": ["http://x"], "timeout": 5},
            "model.upstreams.claude-opus-*.timeout",
            "unknown key",
        ),
        (
            {"urls": ["http://x"], "timeout_ms": 10},
            "model.upstreams.claude-opus-*.timeout_ms",
            "100",
        ),
        (
            {"urls": ["http://x"], "max_concurrent_requests": 0},
            "model.upstreams.claude-opus-*.max_concurrent_requests",
            "1",
        ),
        (
            {"urls": ["http://x"], "api_key": "k", "api_key_file": "/k"},
            "model.upstreams.claude-opus-*.api_key_file",
            "not both",
        ),
        ({}, "model.upstreams.claude-opus-*.urls", "required"),
    ],
)
def test_upstream_errors_name_key_path(route: dict[str, object], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"upstreams": {"claude-opus-*": route}}})
    assert path in paths_of(info.value), info.value.issues
    message = next(i.message for i in info.value.issues if i.path == path)
    assert fragment in message


def test_upstream_key_is_masked_everywhere_it_is_shown(tmp_path: Path) -> None:
    data = {"model": {"upstreams": {"o-*": {"urls": ["http://gpu:8000/"], "api_key": "s3cret"}}}}
    config = parse_config(data)
    route = config.model.upstreams["o-*"]
    assert route.urls == ["http://gpu:8000"]  # the trailing slash is dropped
    assert upstream_key("o-*", route) == "s3cret"
    assert "s3cret" not in json.dumps(config.model_dump(mode="json"))
    assert "s3cret" not in repr(config)
    changed = parse_config(
        {"model": {"upstreams": {"o-*": {**data["model"]["upstreams"]["o-*"], "api_key": "new"}}}}
    )
    diff = diff_configs(config, changed)
    assert "model.upstreams" in diff and "s3cret" not in repr(diff) and "new" not in repr(diff)
    # Flags on top keep the key (a dump and re-validation must not lose it).
    assert (
        upstream_key("o-*", apply_overrides(config, {"server.port": 9000}).model.upstreams["o-*"])
        == "s3cret"
    )


def test_server_key_is_masked_everywhere_it_is_shown_but_still_used() -> None:
    config = parse_config({"server": {"host": "0.0.0.0", "api_key": "s3cret"}})
    assert api_key(config) == "s3cret"
    assert "s3cret" not in json.dumps(config.model_dump(mode="json"))
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    changed = parse_config({"server": {"host": "0.0.0.0", "api_key": "n3w"}})
    diff = diff_configs(config, changed)
    assert "server.api_key" in diff and "s3cret" not in repr(diff) and "n3w" not in repr(diff)
    assert api_key(apply_overrides(config, {"server.port": 9000})) == "s3cret"
    assert api_key(parse_config({"server": {"api_key": ""}})) is None


def test_server_key_and_key_file_together_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"api_key": "k", "api_key_file": "/k"}})
    assert paths_of(info.value) == ["server.api_key_file"]
    assert str(info.value.issues[0]) == (
        "server.api_key_file: set api_key or api_key_file, not both: remove one of them"
    )


def test_upstream_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    route = parse_config(
        {"model": {"upstreams": {"o-*": {"urls": ["http://x"], "api_key_file": str(key_file)}}}}
    ).model.upstreams["o-*"]
    assert upstream_key("o-*", route) == "from-file"
    key_file.write_text("")
    with pytest.raises(ConfigError) as info:
        upstream_key("o-*", route)
    assert paths_of(info.value) == ["model.upstreams.o-*.api_key_file"]


def test_sizes_default_to_auto_and_accept_numbers() -> None:
    assert (Config().model.context_size, Config().model.slots) == ("auto", "auto")
    model = parse_config({"model": {"context_size": 32768, "slots": 2}}).model
    assert (model.context_size, model.slots) == (32768, 2)
    quantized = parse_config({"model": {"kv_cache_type": "q8_0", "flash_attention": "auto"}})
    assert quantized.model.kv_cache_type == "q8_0"
    assert Config().model.kv_unified == "auto"
    assert parse_config({"model": {"kv_unified": False}}).model.kv_unified is False


def test_an_alias_is_a_path_or_an_object_with_a_chat_template(tmp_path: Path) -> None:
    from pensieve.config import AliasTarget, alias_target

    config = parse_config(
        {
            "model": {
                "aliases": {
                    "a-*": "/m/a.gguf",
                    "b-*": {"model_path": "/m/b.gguf", "chat_template": "gemma"},
                }
            }
        }
    )
    assert alias_target(config.model.aliases["a-*"]) == AliasTarget(model_path="/m/a.gguf")
    assert alias_target(config.model.aliases["b-*"]).chat_template == "gemma"
    # The dump round-trips through the validator (config show, generate, reload diffs).
    assert parse_config(config.model_dump()) == config


@pytest.mark.parametrize(
    ("aliases", "path", "fragment"),
    [
        (
            {"x": {"model_path": "/m", "chat_template": "nope"}},
            "model.aliases.x.chat_template",
            "built-in",
        ),
        ({"x": {"path": "/m"}}, "model.aliases.x.path", "unknown key"),
        ({"x": {"chat_template": "gemma"}}, "model.aliases.x.model_path", "required"),
    ],
)
def test_alias_object_errors_name_the_key(
    aliases: dict[str, object], path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"aliases": aliases}})
    assert path in paths_of(info.value), info.value.issues
    assert fragment in next(i.message for i in info.value.issues if i.path == path)


def test_speculation_is_set_per_alias_and_inherited_only_by_the_default_models_file() -> None:
    from pensieve.config import alias_target, speculation_of

    config = parse_config(
        {
            "model": {
                "model_path": "/m/big.gguf",
                "speculative": "draft",
                "draft_model_path": "/m/small.gguf",
                "aliases": {
                    "same-*": "/m/big.gguf",
                    "other-*": "/m/other.gguf",
                    "off-*": {"model_path": "/m/third.gguf", "speculative": "off"},
                    "own-*": {"model_path": "/m/fourth.gguf", "draft_model_path": "/m/s.gguf"},
                },
            }
        }
    )
    model = config.model
    of = {p: speculation_of(model, alias_target(v)) for p, v in model.aliases.items()}
    assert speculation_of(model, None) == ("draft", "/m/small.gguf")
    assert of["same-*"] == ("draft", "/m/small.gguf")  # the default model's file
    assert of["other-*"] == ("auto", None)
    assert of["off-*"] == ("off", None)
    assert of["own-*"] == ("auto", "/m/s.gguf")


@pytest.mark.parametrize(
    ("model", "path", "fragment"),
    [
        ({"speculative": "draft"}, "model.speculative", "'draft' needs a draft model"),
        (
            {"aliases": {"x": {"model_path": "/m/a.gguf", "speculative": "draft"}}},
            "model.aliases.x.speculative",
            "set draft_model_path beside it",
        ),
        (
            {
                "model_path": "/m/a.gguf",
                "aliases": {"x": {"model_path": "/m/a.gguf", "speculative": "off"}},
            },
            "model.aliases.x.speculative",
            "/m/a.gguf is loaded once for model and model.aliases.x",
        ),
        (
            {
                "aliases": {
                    "x": {"model_path": "/m/b.gguf", "draft_model_path": "/m/s.gguf"},
                    "y": "/m/b.gguf",
                }
            },
            "model.aliases.y.speculative",
            "ask for different speculation",
        ),
        ({"draft_model_path": "hf:nope"}, "model.draft_model_path", "hf:"),
        ({"speculative": "eagle"}, "model.speculative", "'auto', 'ngram', 'draft' or 'off'"),
    ],
)
def test_speculation_settings_errors_name_the_key(
    model: dict[str, object], path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": model})
    assert path in paths_of(info.value), info.value.issues
    assert fragment in next(i.message for i in info.value.issues if i.path == path)


def test_chat_template_is_a_builtin_name_or_an_existing_file(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    for value in ("chatml", "gemma", "llama3", str(template)):
        assert parse_config({"model": {"chat_template": value}}).model.chat_template == value
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"chat_template": str(tmp_path / "missing.jinja")}})
    assert paths_of(info.value) == ["model.chat_template"]
    assert "chatml, gemma, llama3" in info.value.issues[0].message


def test_idle_unload_and_max_loaded_models_bounds() -> None:
    assert parse_config({"model": {"idle_unload_s": 0}}).model.idle_unload_s == 0
    for key, value in (("idle_unload_s", -1), ("max_loaded_models", 0)):
        with pytest.raises(ConfigError) as info:
            parse_config({"model": {key: value}})
        assert paths_of(info.value) == [f"model.{key}"]
