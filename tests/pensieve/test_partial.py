"""Section-wise validation of a config file that is invalid at start."""

from __future__ import annotations

from typing import Any

import pytest

from pensieve.config import Config, ServerConfig, api_key, parse_config
from pensieve.partial import salvage_config

LAST_GOOD = {"server": {"port": 19000, "socket_path": "/tmp/last.sock", "api_key": "old-key"}}


def origins(data: Any, last_good: Any = None) -> dict[str, str]:
    return {s.section: s.origin for s in salvage_config(data, last_good).sources}


def test_a_typo_in_model_keeps_the_server_and_logging_sections() -> None:
    data = {
        "server": {"port": 18123, "socket_path": "/tmp/p.sock", "max_concurrent_requests": 3},
        "logging": {"level": "debug"},
        "model": {"swa_fulll": False, "context_size": 2048},
    }
    salvaged = salvage_config(data, LAST_GOOD)
    server = salvaged.config.server
    assert (server.port, server.socket_path, server.max_concurrent_requests) == (
        18123,
        "/tmp/p.sock",
        3,
    )
    assert salvaged.config.logging.level == "debug"
    assert salvaged.config.model == Config().model
    assert origins(data) == {"server": "file", "logging": "file", "model": "defaults"}
    described = salvaged.describe()
    assert "model: defaults (invalid: model.swa_fulll: unknown key)" in described
    assert "server: from the file" in described


def test_a_valid_model_section_is_not_served_from_an_invalid_file() -> None:
    data = {"logging": {"level": "loud"}, "model": {"context_size": 4096}}
    salvaged = salvage_config(data)
    assert salvaged.config.model.context_size == "auto"
    assert salvaged.config.logging == Config().logging
    model = salvaged.source("model")
    assert model.origin == "defaults" and model.issues == ()
    assert "no model is served" in (model.reason() or "")
    assert [i.path for i in salvaged.source("logging").issues] == ["logging.level"]


def test_an_invalid_server_falls_back_to_the_last_good_one_then_to_defaults() -> None:
    data = {"server": {"port": "18123"}, "logging": {"format": "json"}}
    salvaged = salvage_config(data, LAST_GOOD)
    assert salvaged.config.server.port == 19000
    assert salvaged.config.server.socket_path == "/tmp/last.sock"
    assert api_key(salvaged.config) == "old-key", "the last good key is kept"
    assert salvaged.config.logging.format == "json"
    source = salvaged.source("server")
    assert source.origin == "last_good" and [i.path for i in source.issues] == ["server.port"]
    assert "server: last good config (invalid: server.port:" in salvaged.describe()

    salvaged = salvage_config(data, None)
    assert salvaged.config.server == ServerConfig()
    assert salvaged.source("server").origin == "defaults"


@pytest.mark.parametrize(
    "last_good",
    [
        {"server": {"port": "not a port"}},  # saved by another version, say
        {"logging": {}},
        ["not", "an", "object"],
    ],
)
def test_a_last_good_config_without_a_valid_server_section_is_ignored(last_good: Any) -> None:
    assert origins({"server": {"port": -1}}, last_good)["server"] == "defaults"


def test_unreadable_file_uses_the_last_good_server_section() -> None:
    salvaged = salvage_config(None, LAST_GOOD)
    assert salvaged.config.server.port == 19000
    assert origins(None, LAST_GOOD) == {
        "server": "last_good",
        "logging": "defaults",
        "model": "defaults",
    }
    assert "the file is unusable" in salvaged.describe()
    assert "not a JSON object" in salvage_config([1, 2]).describe()


def test_a_misspelt_server_section_is_not_taken_for_the_defaults() -> None:
    data = {"sever": {"port": 18123}, "logging": {"level": "info"}}
    salvaged = salvage_config(data, LAST_GOOD)
    assert salvaged.config.server.port == 19000
    assert "unknown 'sever'" in (salvaged.source("server").reason() or "")
    assert salvaged.source("logging").origin == "file"


def test_public_host_without_key_never_binds_beyond_loopback() -> None:
    data = {"server": {"host": "0.0.0.0", "port": 18123}, "model": {"bad": 1}}
    salvaged = salvage_config(data)
    assert salvaged.config.server.host == "127.0.0.1"
    assert salvaged.config.server.port == 8080, "the section fails as a whole"
    source = salvaged.source("server")
    assert source.origin == "defaults" and [i.path for i in source.issues] == ["server.host"]
    assert "reachable from other machines" in salvaged.describe()


def test_a_stand_in_server_section_is_loopback_only_and_keeps_a_key() -> None:
    public = {"server": {"host": "0.0.0.0", "port": 19000, "api_key": "old-key"}}
    data = {"server": {"host": "0.0.0.0", "port": "x", "api_key": "new-key"}}
    salvaged = salvage_config(data, public)
    server = salvaged.config.server
    assert (server.host, server.port) == ("127.0.0.1", 19000)
    assert api_key(salvaged.config) == "old-key"
    assert "limited to 127.0.0.1" in (salvaged.source("server").reason() or "")
    # Without a key of its own, the stand-in takes the file's (or its key file) if usable.
    salvaged = salvage_config(data, {"server": {"port": 19000}})
    assert api_key(salvaged.config) == "new-key"
    assert "API key taken from the file" in salvaged.describe()
    by_file = salvage_config({"server": {"api_key_file": "/k", "port": "x"}})
    assert by_file.config.server.api_key_file == "/k"
    # A key the file gives in a form that cannot be used is not invented.
    assert salvage_config({"server": {"api_key": 5}}).config.server.api_key is None


def test_the_salvaged_config_passes_the_whole_validator() -> None:
    cases: list[Any] = [
        {"server": {"host": "0.0.0.0", "api_key": "k"}, "model": {"x": 1}},
        {"server": {"host": "0.0.0.0"}},
        None,
        {"server": {"port": "x", "api_key": "k"}},
    ]
    for data in cases:
        for last_good in (None, LAST_GOOD):
            config = salvage_config(data, last_good).config
            assert parse_config(config.model_dump()) == config
    # a public host with a key is a valid server section: used as it is
    kept = salvage_config(cases[0]).config.server
    assert kept.host == "0.0.0.0"
    assert kept.api_key is not None and kept.api_key.get_secret_value() == "k"
