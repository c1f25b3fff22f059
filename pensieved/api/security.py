"""Who may talk to the HTTP API: Host-header (DNS-rebinding) check, CORS, API key.

A loopback server is reachable by every web page the user opens, so the checks here are what
keep a page from using the model:

- A page that rebinds its own domain to 127.0.0.1 is same-origin with us as far as the browser
  is concerned, but its requests carry its domain in `Host`: only loopback names, the address
  we are bound to and `server.allowed_hosts` pass.
- Any other page's requests carry its `Origin`. Without CORS the browser would still *send* a
  "simple" POST (it only hides the reply), which is enough to burn CPU on the user's laptop, so
  a request with a foreign `Origin` is refused outright, not merely left without CORS headers.
- The API key, when configured, is the only defence against other machines (and other local
  users); it is compared in constant time and never echoed or logged.

Every function takes the config explicitly: it is hot-reloaded, so callers pass the current
one on each request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pensieve.config import Config, ConfigError, is_loopback_name
from pensieve.config import api_key as configured_api_key
from pensieved.errors import AuthenticationError, PermissionDeniedError

log = logging.getLogger("pensieved.api")

ALLOWED_METHODS = "GET, HEAD, POST, OPTIONS"
# Headers a browser page may read from our replies (CORS hides all others).
EXPOSED_HEADERS = "request-id, retry-after"
PREFLIGHT_MAX_AGE_S = 600
# Paths a client may probe without a key: they reveal only that the server is up.
UNAUTHENTICATED_PATHS = frozenset({"/", "/health"})

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_TOKEN_LIST_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def _shown(value: str, limit: int = 80) -> str:
    # Attacker-supplied text goes into messages and logs: quoted, escaped and bounded.
    return repr(value if len(value) <= limit else value[:limit] + "...")


# ---- Host header -----------------------------------------------------------------------------


def host_name(host_header: str) -> str:
    """The name or address part of a Host header, lower-cased, without port or brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    # "localhost." is the same name as "localhost" (a fully qualified name).
    return host[:-1] if host.endswith(".") else host


def check_host(host_header: str | None, config: Config) -> None:
    """Refuse a Host header that is not ours: that is what a DNS-rebinding page sends."""
    if host_header is None:
        return  # HTTP/1.0 clients may omit it; browsers never do, so no page can get here
    allowed = [h.lower().rstrip(".") for h in config.server.allowed_hosts]
    if "*" in allowed:
        return
    name = host_name(host_header)
    if is_loopback_name(name) or name in allowed:
        return
    bound = config.server.host.lower()
    if bound not in _WILDCARD_HOSTS and name == bound.strip("[]"):
        return
    raise PermissionDeniedError(
        f"Host header {_shown(host_header)} is not allowed: pensieved answers only to loopback "
        "names (localhost, 127.0.0.1, [::1]), its bind address and server.allowed_hosts, so "
        "that web pages cannot reach it through DNS rebinding; if you reach it under this "
        "name on purpose, add the name to server.allowed_hosts"
    )


# ---- CORS ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _origin_pattern(pattern: str) -> re.Pattern[str]:
    """`http://localhost:*` → regex; `*` stands for one name label or, after `:`, any port."""
    pattern = pattern.strip().lower().rstrip("/")
    parts: list[str] = []
    rest = pattern
    if rest.endswith(":*"):
        rest = rest[:-2]
        port = r"(:[0-9]{1,5})?"
    else:
        port = ""
    for index, chunk in enumerate(rest.split("*")):
        if index:
            parts.append(r"[a-z0-9-]+")
        parts.append(re.escape(chunk))
    return re.compile("".join(parts) + port)


def origin_allowed(origin: str, config: Config) -> bool:
    if not config.server.enable_cors:
        return False
    origin = origin.strip().lower()
    # "null" is the origin of every sandboxed iframe and file:// page: allowing it would allow
    # any web page that sandboxes itself, so no configuration can allow it.
    if origin == "null":
        return False
    for pattern in config.server.cors_origins:
        if pattern.strip() == "*" or _origin_pattern(pattern).fullmatch(origin):
            return True
    return False


def _wildcard_cors(config: Config) -> bool:
    return any(p.strip() == "*" for p in config.server.cors_origins)


def cors_headers(origin: str | None, config: Config) -> dict[str, str]:
    """CORS response headers for an ordinary request; refuses a foreign Origin outright.

    No `Access-Control-Allow-Credentials` is ever sent: the API key travels in a header the
    page sets itself, so cookies are never needed, and `*` stays safe.
    """
    if origin is None:
        return {"Vary": "Origin"} if config.server.enable_cors else {}
    if not origin_allowed(origin, config):
        if config.server.enable_cors:
            hint = "add it to server.cors_origins to allow it"
        else:
            hint = "set server.enable_cors and list the origin in server.cors_origins to allow it"
        raise PermissionDeniedError(
            f"cross-origin requests from {_shown(origin)} are not allowed: {hint}"
        )
    return {
        "Access-Control-Allow-Origin": "*" if _wildcard_cors(config) else origin,
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        "Vary": "Origin",
    }


def preflight_headers(headers: Mapping[str, str], config: Config) -> dict[str, str]:
    """Headers of a 204 answer to a CORS preflight (`cors_headers` already passed)."""
    out = {
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    requested = headers.get("Access-Control-Request-Headers", "").strip()
    # The origin is trusted, so echo what it asks for (the SDKs send many x-stainless-*
    # headers), but only if it is a well-formed token list: it becomes a response header.
    if requested and _TOKEN_LIST_RE.match(requested):
        out["Access-Control-Allow-Headers"] = requested
    # Chrome's Private Network Access asks before a public page may reach a loopback server.
    if headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        out["Access-Control-Allow-Private-Network"] = "true"
    return out


# ---- API key ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyFileStamp:
    path: str
    mtime_ns: int
    size: int


_key_file_cache: dict[_KeyFileStamp, str] = {}


def _expected_key(config: Config) -> str | None:
    key_file = config.server.api_key_file
    if config.server.api_key or not key_file:
        return configured_api_key(config)
    # The key file is re-read only when it changes: a rotated key applies at once, without
    # reading a file on every request.
    path = str(Path(key_file).expanduser())
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _key_unreadable(f"cannot read {path}: {exc.strerror}") from None
    stamp = _KeyFileStamp(path, info.st_mtime_ns, info.st_size)
    cached = _key_file_cache.get(stamp)
    if cached is not None:
        return cached
    try:
        key = configured_api_key(config)
    except ConfigError as exc:
        raise _key_unreadable("; ".join(i.message for i in exc.issues)) from None
    _key_file_cache.clear()
    if key is not None:
        _key_file_cache[stamp] = key
    return key


def _key_unreadable(why: str) -> AuthenticationError:
    # Fail closed: a key that cannot be read must not turn into "no key required".
    log.error("server.api_key_file: %s; refusing API requests until it is fixed", why)
    return AuthenticationError(
        "pensieved cannot read its API key file (server.api_key_file), so it refuses every "
        "request; the details are in the pensieved log"
    )


def presented_keys(headers: Mapping[str, str]) -> list[str]:
    keys = []
    x_api_key = headers.get("x-api-key")
    if x_api_key:
        keys.append(x_api_key.strip())
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the presented key's length too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def check_api_key(path: str, headers: Mapping[str, str], config: Config) -> None:
    """Refuse a request without the configured key (no-op when no key is configured)."""
    if path in UNAUTHENTICATED_PATHS:
        return
    expected = _expected_key(config)
    if expected is None:
        return
    presented = presented_keys(headers)
    if not presented:
        raise AuthenticationError(
            "missing API key: this pensieved requires server.api_key; send it in the "
            "x-api-key header or as Authorization: Bearer <key>"
        )
    want = _digest(expected)
    # Every presented key is compared (no early exit) so timing does not say which one failed.
    matched = False
    for key in presented:
        matched |= hmac.compare_digest(_digest(key), want)
    if not matched:
        raise AuthenticationError("invalid API key")
