"""Unit tests of the request guards: Host check, CORS matching, API key, and body limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pensieve.config import Config, parse_config
from pensieved.api import limits, security
from pensieved.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RequestTooLargeError,
)


def config(**server: Any) -> Config:
    return parse_config({"server": server})


# ---- Host -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8080", "localhost"),
        ("LocalHost", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("evil.com:8080", "evil.com"),
        ("::1", "::1"),
    ],
)
def test_host_name(header: str, name: str) -> None:
    assert security.host_name(header) == name


@pytest.mark.parametrize(
    "header", ["localhost:1", "127.0.0.1:8080", "127.8.9.10", "[::1]:8080", "LOCALHOST"]
)
def test_loopback_hosts_pass(header: str) -> None:
    security.check_host(header, config())


@pytest.mark.parametrize(
    "header",
    [
        "evil.com",
        "127.0.0.1.evil.com",
        "localhost.evil.com:8080",
        "127.1",  # shorthand the browser would resolve, but not a name we answer to
        "2130706433",
        "[::ffff:7f00:1]:80",
        "0.0.0.0:8080",
        "",
        "x" * 5000,
    ],
)
def test_foreign_hosts_are_refused(header: str) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        security.check_host(header, config())
    assert len(str(info.value)) < 600, "attacker text in the message must be bounded"


def test_allowed_hosts_and_bind_address() -> None:
    cfg = config(allowed_hosts=["Pensieve.LAN"], host="192.168.1.5", api_key="k")
    security.check_host("pensieve.lan:8080", cfg)
    security.check_host("192.168.1.5:8080", cfg)
    with pytest.raises(PermissionDeniedError):
        security.check_host("192.168.1.6:8080", cfg)
    security.check_host("anything.example", config(allowed_hosts=["*"]))
    with pytest.raises(PermissionDeniedError):
        security.check_host("0.0.0.0", config(host="0.0.0.0", api_key="k"))


def test_missing_host_is_not_a_browser() -> None:
    security.check_host(None, config())


# ---- CORS -----------------------------------------------------------------------------------

DEFAULT_ORIGINS = ["http://localhost:*", "http://127.0.0.1:*"]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://localhost", True),
        ("http://127.0.0.1:8080", True),
        ("HTTP://LOCALHOST:3000", True),
        ("https://localhost:3000", False),
        ("http://localhost:3000.evil.com", False),
        ("http://localhost.evil.com", False),
        ("http://localhostx:3000", False),
        ("http://localhost:abc", False),
        ("http://evil.com", False),
        ("null", False),
        ("", False),
    ],
)
def test_default_origin_patterns(origin: str, allowed: bool) -> None:
    cfg = config(enable_cors=True)
    assert cfg.server.cors_origins == DEFAULT_ORIGINS
    assert security.origin_allowed(origin, cfg) is allowed


def test_name_part_wildcard_matches_one_label() -> None:
    cfg = config(enable_cors=True, cors_origins=["https://*.example.com"])
    assert security.origin_allowed("https://app.example.com", cfg)
    assert not security.origin_allowed("https://a.b.example.com", cfg)
    assert not security.origin_allowed("https://example.com", cfg)
    assert not security.origin_allowed("https://app.example.com.evil.org", cfg)


def test_cors_off_allows_no_origin() -> None:
    cfg = config()
    assert not security.origin_allowed("http://localhost:3000", cfg)
    with pytest.raises(PermissionDeniedError, match="enable_cors"):
        security.cors_headers("http://localhost:3000", cfg)
    assert security.cors_headers(None, cfg) == {}


def test_null_origin_is_never_allowed() -> None:
    cfg = config(enable_cors=True, cors_origins=["null", "*"])
    assert not security.origin_allowed("null", cfg)


def test_cors_headers_reflect_the_origin_without_credentials() -> None:
    headers = security.cors_headers("http://localhost:5173", config(enable_cors=True))
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in headers


def test_wildcard_config_sends_star_and_never_credentials() -> None:
    headers = security.cors_headers(
        "https://x.example", config(enable_cors=True, cors_origins=["*"])
    )
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


def test_preflight_headers() -> None:
    cfg = config(enable_cors=True)
    out = security.preflight_headers(
        {
            "Access-Control-Request-Headers": "content-type, x-api-key",
            "Access-Control-Request-Private-Network": "true",
        },
        cfg,
    )
    assert out["Access-Control-Allow-Headers"] == "content-type, x-api-key"
    assert out["Access-Control-Allow-Private-Network"] == "true"
    assert "POST" in out["Access-Control-Allow-Methods"]
    # Not a token list: never copied into a response header.
    bad = security.preflight_headers({"Access-Control-Request-Headers": "a\r\nSet-Cookie: x"}, cfg)
    assert "Access-Control-Allow-Headers" not in bad


# ---- API key --------------------------------------------------------------------------------


def test_no_key_configured_lets_everyone_in() -> None:
    security.check_api_key("/v1/messages", {}, config())


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "secret"},
        {"Authorization": "Bearer secret"},
        {"Authorization": "BEARER secret"},
        {"x-api-key": "nope", "Authorization": "Bearer secret"},
    ],
)
def test_right_key_passes(headers: dict[str, str]) -> None:
    security.check_api_key("/v1/messages", headers, config(api_key="secret"))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": ""},
        {"x-api-key": "secre"},
        {"x-api-key": "secret2"},
        {"Authorization": "Basic secret"},
        {"Authorization": "Bearer"},
        {"x-api-key": "sécret"},
    ],
)
def test_wrong_or_missing_key_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationError) as info:
        security.check_api_key("/v1/models", headers, config(api_key="secret"))
    assert "secret" not in str(info.value).replace("x-api-key", "")


def test_probes_need_no_key() -> None:
    for path in ("/", "/health"):
        security.check_api_key(path, {}, config(api_key="secret"))


def test_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("first\n")
    cfg = config(api_key_file=str(key_file))
    security.check_api_key("/v1/models", {"x-api-key": "first"}, cfg)
    key_file.write_text("second-key\n")
    security.check_api_key("/v1/models", {"x-api-key": "second-key"}, cfg)
    with pytest.raises(AuthenticationError):
        security.check_api_key("/v1/models", {"x-api-key": "first"}, cfg)
    key_file.write_text("")
    with pytest.raises(AuthenticationError, match="api_key_file"):
        security.check_api_key("/v1/models", {"x-api-key": ""}, cfg)
    key_file.unlink()
    with pytest.raises(AuthenticationError, match="api_key_file"):
        security.check_api_key("/v1/models", {"x-api-key": "second-key"}, cfg)


# ---- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"[" * 64 + b"]" * 64, False),
        (b"[" * 65 + b"]" * 65, True),
        (b"[" * 100_000, True),
        (b'{"a": "' + b"[" * 1000 + b'"}', False),  # brackets inside strings do not count
        (b'{"a": "\\"' + b"[" * 1000 + b'"}', False),  # nor after an escaped quote
        (b"[" * 10 + b"}" * 10, False),
        (b"[[[]]]" * 1000, False),
    ],
)
def test_json_depth(body: bytes, deep: bool) -> None:
    assert limits.json_depth_exceeds(limits.json_brackets(body), limits.MAX_JSON_DEPTH) is deep


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        (b"[" * 70 + b"]" * 70, InvalidRequestError, "levels deep"),
        (b"[]," * (limits.MAX_JSON_CONTAINERS + 1), RequestTooLargeError, "arrays and objects"),
        (b'"",' * (limits.MAX_JSON_QUOTES // 2 + 1), RequestTooLargeError, "quote"),
        (b"1" * 5000, InvalidRequestError, "not valid JSON"),
        (b'{"a": NaN}', InvalidRequestError, "NaN"),
        (b'{"a": Infinity}', InvalidRequestError, "Infinity"),
        (b'{"a": "\xff\xfe"}', InvalidRequestError, "not valid JSON"),
        (b'{"a": {"b": ["ok", "\\udc80"]}}', InvalidRequestError, "a.b.1"),
        (b'{"\\ud800": 1}', InvalidRequestError, "surrogate"),
        (b"", InvalidRequestError, "not valid JSON"),
    ],
)
def test_decode_json_refusals(body: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        limits.decode_json(body)


def test_decode_json_accepts_real_unicode_and_nul() -> None:
    data = limits.decode_json(json.dumps({"t": "\U0001f600 \x00 é [{"}).encode())
    assert data == {"t": "\U0001f600 \x00 é [{"}
    assert limits.decode_json(b'{"t": "\\ud83d\\ude00"}') == {"t": "\U0001f600"}


def test_request_shape_limits() -> None:
    limits.check_request_shape({"messages": [{"content": [{}] * 10}] * 10})
    with pytest.raises(InvalidRequestError, match="10001 messages"):
        limits.check_request_shape({"messages": [{}] * (limits.MAX_MESSAGES + 1)})
    with pytest.raises(InvalidRequestError, match=r"messages\.1\.content: 1001"):
        limits.check_request_shape({"messages": [{"content": []}, {"content": [{}] * 1001}]})
    with pytest.raises(InvalidRequestError, match="in all"):
        limits.check_request_shape({"messages": [{"content": [{}] * 1000}] * 51})
    with pytest.raises(InvalidRequestError, match="stop_sequences"):
        limits.check_request_shape({"stop_sequences": ["x"] * 1000})
    # Wrong types are left for validation to explain.
    limits.check_request_shape({"messages": "x", "tools": {}, "system": 3})


def test_declared_body() -> None:
    assert limits.check_declared_body(None, 1000)
    assert limits.check_declared_body("1000", 1000)
    assert limits.check_declared_body("abc", 1000)
    assert not limits.check_declared_body("1001", 1000)
    with pytest.raises(RequestTooLargeError, match="max_body_bytes"):
        limits.check_declared_body(str(1000 + limits.BODY_DRAIN_ALLOWANCE + 1), 1000)


def test_header_limit() -> None:
    limits.check_headers([("Host", "localhost")], 20)
    with pytest.raises(RequestTooLargeError, match="headers"):
        limits.check_headers([("X", "a" * limits.MAX_HEADER_BYTES)], 20)
