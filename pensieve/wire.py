"""The control API's JSON shapes: the daemon writes them, `pensieve.client` parses replies into
them.

Field names here are a contract with `pensievectl` and with scripts using `status --json`: add
fields freely (with a default, so a newer pensievectl still reads an older running daemon), never
rename or remove one. Replies keep fields they do not know (a newer daemon's) so that
`status --json` passes them on; the one request refuses them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ChangeAction = Literal["live", "rebind", "model", "restart"]


class _ControlModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class Change(_ControlModel):
    key: str = Field(description="Dotted config key, e.g. `logging.level`.")
    old: Any = Field(description="The running value.")
    new: Any = Field(description="The value in the file.")
    action: ChangeAction = Field(
        description="How it is applied: `live` at once, `rebind` a new listener before the old "
        "one closes, `model` a background model load, `restart` only at the next start."
    )


class ReloadResult(_ControlModel):
    time: float = Field(description="Unix time when the reload ran.")
    trigger: str = Field(description="What asked for it: `watch`, `sighup`, `control`, `model`.")
    ok: bool = Field(description="False: nothing (or, for a model load, not the model) changed.")
    error: str | None = Field(None, description="Why the reload failed, for the user.")
    changes: list[Change] = Field(default_factory=list, description="What differed.")
    model_loading: bool = Field(
        False, description="A new model is loading in the background; the old one still serves."
    )


class Issue(_ControlModel):
    path: str = Field(description="Dotted key path of the problem, or `(json)` / `(file)`.")
    message: str = Field(description="What is wrong with it.")


class ValidateRequest(_ControlModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Absolute path of the config file to validate.")


class ValidateResponse(_ControlModel):
    valid: bool = Field(description="The file passes the daemon's validator.")
    source: str = Field(description="The file that was validated.")
    issues: list[Issue] = Field(default_factory=list, description="Every problem found.")
    changes: list[Change] = Field(
        default_factory=list, description="What loading it would change in the running daemon."
    )


class ConfigSource(_ControlModel):
    section: str = Field(description="A top-level config section: `server`, `logging`, `model`.")
    source: Literal["file", "last_good", "defaults"] = Field(
        description="Where the section in force came from: the file, the last good config "
        "pensieved saved for it, or the defaults."
    )
    reason: str | None = Field(
        None,
        description="Why not from the file (its key paths and problems), and what was changed "
        "for safety (a host limited to loopback, an API key kept).",
    )


class HttpStatus(_ControlModel):
    host: str = Field(description="Configured listen address.")
    port: int = Field(description="Bound port (the real one when the config says 0).")
    url: str | None = Field(description="Base URL of the Messages API, null if not listening.")
    error: str | None = Field(None, description="Why the HTTP listener is not up.")


class SpeculationStatus(_ControlModel):
    mode: str = Field("off", description="`model.speculative` for this model.")
    note: str = Field("", description="What speculation runs on this model, and why not more.")
    drafts: int = Field(0, description="Drafts verified.")
    drafted: int = Field(0, description="Tokens in those drafts.")
    accepted: int = Field(0, description="Draft tokens kept (each one a decode step saved).")
    forced: int = Field(
        0, description="Tokens a grammar forced, appended without sampling (jump-forward)."
    )
    acceptance_rate: float = Field(0.0, description="`accepted / drafted`.")
    tokens_per_step: float = Field(
        0.0, description="Output tokens per decode step of a generating request (1 without it)."
    )
    gained: int = Field(0, description="Output tokens that cost no step: accepted plus forced.")


class DecodeStatus(_ControlModel):
    steps: int = Field(description="Batches decoded since the model was loaded.")
    tokens: int = Field(description="Tokens in those batches (prompt and generated).")
    llama_s: float = Field(description="Seconds spent in llama.cpp's decode.")
    python_s: float = Field(
        description="Seconds of Python work around it: batches, sampling, text, events."
    )
    prompt_tokens: int = Field(
        0, description="Prompt tokens among them (evaluated, not read from the cache)."
    )
    prompt_s: float = Field(
        0.0,
        description="Their share of `llama_s` (each batch's time split by its tokens): "
        "`prompt_tokens / prompt_s` is the measured prefill rate.",
    )
    speculation: SpeculationStatus = Field(
        default_factory=SpeculationStatus,
        description="Speculative decoding: drafts, their acceptance, tokens gained.",
    )


class CheckpointStatus(_ControlModel):
    count: int = Field(0, description="Checkpoints the slot keeps.")
    bytes: int = Field(0, description="Their memory, together.")
    positions: list[int] = Field(
        default_factory=list, description="The token positions they restore to, oldest first."
    )


class KvSlotStatus(_ControlModel):
    slot: int = Field(description="The slot (a KV sequence of the model's context).")
    tokens: int = Field(description="Tokens its cache holds.")
    own_cells: int = Field(description="Cells only it holds: what evicting it would free.")
    cost_bytes: int = Field(
        description="What it really costs: its own cells plus its share of each shared cell."
    )
    checkpoints: CheckpointStatus = Field(
        default_factory=CheckpointStatus,
        description="States it can go back to (recurrent, hybrid and sliding-window models).",
    )


class KvStatus(_ControlModel):
    cache_type: str = Field(description="Storage type of K and V: f16, q8_0 or q4_0.")
    flash_attention: str = Field(
        description="`on`, `off` or `auto` (llama.cpp decides), and why when Pensieve chose."
    )
    unified: bool = Field(
        True,
        description="One KV cache all slots share (a common prefix stored once), or a cache "
        "per slot (`model.kv_unified`; `sizing` says why).",
    )
    pool_cells: int = Field(description="Token cells of the KV cache, all slots together.")
    cells_used: int = Field(description="Cells holding a token of some slot.")
    cells_shared: int = Field(description="Cells held by more than one slot (a common prefix).")
    bytes_per_token: int = Field(description="Memory of one cell: K and V of every layer.")
    allocated_bytes: int = Field(description="Memory of the whole KV cache, used or not.")
    budget_bytes: int = Field(description="The memory budget sizes were chosen against.")
    sizing: str = Field(description="The context and slots chosen, and why.")
    warning: str | None = Field(
        None, description="A plain warning, e.g. a context too small for Claude Code."
    )
    slots: list[KvSlotStatus] = Field(description="Each slot's part of the cache.")
    architecture: str = Field(
        "full attention",
        description="How the model's layers remember: full attention, sliding-window "
        "attention (window), hybrid recurrent + attention, or recurrent.",
    )
    cache_strategy: str = Field(
        "full-attention",
        description="full-attention, swa-full, swa-checkpoints or recurrent-checkpoints "
        "(docs/caching.md).",
    )
    cache_strategy_reason: str = Field("", description="What the strategy does, and why it.")
    checkpoint_bytes: int = Field(0, description="Memory of every slot's checkpoints.")


class CacheReport(_ControlModel):
    """How one request's prompt met the KV cache: why a turn was slow, in one record."""

    time: float = Field(description="Unix time the request started evaluating.")
    prompt_tokens: int = Field(description="Tokens of the rendered prompt.")
    cache_read_tokens: int = Field(description="Tokens of it read from the KV cache.")
    source: str = Field(
        description="Where they came from: `slot N`, `slot N (restored from disk)`, or `none`."
    )
    candidate_tokens: int = Field(
        description="Tokens the best cached candidate (the slot sharing the longest prefix) held."
    )
    diverged_at: int | None = Field(
        None,
        description="Token position where the prompt and that candidate first differ; null when "
        "the candidate was a whole prefix of the prompt (or there was none).",
    )
    common: str = Field("", description="The text just before the divergence.")
    prompt_next: str = Field("", description="What the prompt has from there.")
    cached_next: str = Field("", description="What the cache had from there.")


class BackgroundPrefill(_ControlModel):
    """A prompt whose client hung up mid-prefill, still being evaluated for its retry."""

    slot: int = Field(description="The slot it is evaluated in.")
    evaluated: int = Field(description="Prompt tokens in the cache so far.")
    prompt_tokens: int = Field(description="Tokens of the whole prompt.")


class ModelStatus(_ControlModel):
    name: str = Field(description="Model name from the GGUF metadata.")
    path: str = Field(description="The GGUF file.")
    size_bytes: int = Field(description="File size.")
    context_size: int = Field(description="Context window in tokens.")
    gpu_layers: int = Field(description="Layers offloaded to the GPU (-1 all).")
    threads: int = Field(description="CPU threads used.")
    slots: int = Field(description="KV-cache slots.")
    kv_bytes_per_slot: int = Field(
        description="Memory of one slot's KV cache (f16 K and V for the full context)."
    )
    cached_tokens: list[int] = Field(description="Tokens each slot's KV cache holds now.")
    decode: DecodeStatus
    kv: KvStatus | None = Field(None, description="The KV cache: sizes, use, sharing.")
    background_prefills: list[BackgroundPrefill] = Field(
        default_factory=list,
        description="Prompts whose client hung up during prefill, evaluated to their end at the "
        "lowest priority so that a retry reads them from the cache.",
    )
    recent_requests: list[CacheReport] = Field(
        default_factory=list,
        description="The last requests' prompt and cache use, newest last (`pensievectl cache`).",
    )


ModelState = Literal["loaded", "loading", "unloading", "unloaded"]


class ModelEntryStatus(_ControlModel):
    file: str = Field(description="The GGUF file's name.")
    path: str = Field(description="The GGUF file.")
    names: list[str] = Field(
        description="What serves from it: `(default)` for model.model_path, alias patterns."
    )
    state: ModelState = Field(description="`loaded`, `loading`, `unloading` or `unloaded`.")
    since: float = Field(description="Unix time it entered this state.")
    last_used: float | None = Field(
        None, description="Unix time a request last let go of it (null: never used)."
    )
    unloaded_at: float | None = Field(None, description="When it was unloaded, if it is.")
    load_s: float | None = Field(None, description="How long its last load took, in seconds.")
    error: str | None = Field(None, description="Why its last load failed.")
    chat_template: str | None = Field(
        None, description="The `chat_template` setting in force for it (null: the GGUF's)."
    )
    tool_dialect: str | None = Field(
        None,
        description="The tool-call dialect its requests use (docs/dialects.md); null: not "
        "known until it loads (detected from the GGUF's template).",
    )
    tool_dialect_source: Literal["configured", "detected", "generic"] | None = Field(
        None,
        description="How the dialect was chosen: `configured` (tool_dialect), `detected` "
        "(from the chat template), `generic` (the template renders no calls: our own tool "
        "section, in hermes).",
    )
    memory_bytes: int = Field(
        0, description="Weights plus KV caches while loaded (0 when unloaded)."
    )
    cached_tokens: int = Field(0, description="Tokens its slots' KV caches hold now.")
    disk_cached_tokens: int = Field(
        0, description="Tokens in its KV caches saved on disk (read back at its next load)."
    )
    disk_cache_bytes: int = Field(0, description="Size of those saved caches.")
    model: ModelStatus | None = Field(None, description="Facts of the loaded model.")


class ModelsResponse(_ControlModel):
    models: list[ModelEntryStatus] = Field(description="Every model file the config names.")
    aliases: dict[str, str] = Field(description="`model.aliases`: pattern -> model file.")
    idle_unload_s: float = Field(description="`model.idle_unload_s` in force.")
    max_loaded_models: int = Field(description="`model.max_loaded_models` in force.")


class ModelActionRequest(_ControlModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="A requested model name, an alias pattern, or a GGUF file's name or path."
    )


class ModelActionResponse(_ControlModel):
    action: Literal["load", "unload"] = Field(description="What was done.")
    model: ModelEntryStatus = Field(description="The model afterwards.")
    seconds: float = Field(description="How long it took.")


class ProcessStatus(_ControlModel):
    rss_bytes: int = Field(description="Resident memory.")
    cpu_percent: float = Field(description="CPU use since the previous status call (or start).")
    cpu_time_s: float = Field(description="User plus system CPU time since start.")
    threads: int = Field(description="OS threads.")


class RequestStatus(_ControlModel):
    served: int = Field(description="Requests finished since start.")
    in_flight: int = Field(description="Requests admitted and not finished (running + queued).")
    running: int = Field(description="Generations running on a KV slot.")
    queued: int = Field(description="Generations waiting for a slot.")
    tokens_generated: int = Field(description="Output tokens since start.")
    prompt_tokens: int = Field(description="Prompt tokens since start.")
    cache_read_tokens: int = Field(description="Prompt tokens reused from the KV cache.")


class WorkItem(_ControlModel):
    id: str = Field(description="The request's `request-id` (or `load-N` for a model load).")
    what: str = Field(description="What it asked for: method, path, model, stream, max_tokens.")
    phase: str = Field(description="Where it is: preparing, waiting for a slot, evaluating...")
    since: float = Field(description="Unix time it began.")
    phase_since: float = Field(description="Unix time it entered this phase.")


class PreviousExit(_ControlModel):
    pid: int = Field(description="The daemon that died.")
    started_at: float = Field(description="Unix time it had started.")
    signal: int | None = Field(description="The fatal signal, when its log or exit status says.")
    signal_name: str | None = Field(description="`SIGSEGV`, `SIGILL`...")
    exit_code: int | None = Field(description="Its exit status, when it exited without a signal.")
    cause: str = Field(description="How it ended, for the user.")
    work: list[WorkItem] = Field(description="What it was doing when it died.")
    log_file: str | None = Field(description="Its log file, if its output went to a file.")
    log_tail: list[str] = Field(description="The last lines it wrote to that log.")
    supervisor: str | None = Field(
        None, description="`systemd` or `launchd` when one of them had started it."
    )


class UpstreamURLStatus(_ControlModel):
    url: str = Field(description="The upstream's base URL.")
    state: str = Field(
        description="`up` (its last request went through), `failing` (its last one failed), "
        "`backing_off` (skipped for now after a failure) or `unknown` (not used yet)."
    )
    outstanding: int = Field(description="Requests sent to it and not finished.")
    requests: int = Field(description="Requests sent to it since start.")
    errors: int = Field(description="Requests that failed there since start.")
    errors_by_kind: dict[str, int] = Field(
        default_factory=dict,
        description="Those failures by kind: unreachable, timeout, connection, overloaded, "
        "http_<status>.",
    )
    last_error: str | None = Field(None, description="The most recent failure, for the user.")
    last_error_at: float | None = Field(None, description="Unix time of that failure.")
    latency_ms: float | None = Field(
        None, description="Average time from sending a request to the reply's headers."
    )
    backing_off_s: float = Field(0.0, description="Seconds until it is tried again first.")


class UpstreamStatus(_ControlModel):
    pattern: str = Field(description="The model-name pattern the route serves.")
    protocol: str = Field(description="`anthropic` or `openai`.")
    model: str | None = Field(None, description="The model name sent upstream (null: as asked).")
    max_concurrent_requests: int = Field(description="The route's limit on requests in flight.")
    in_flight: int = Field(description="The route's requests in flight now.")
    requests: int = Field(description="Requests routed here since start.")
    refused: int = Field(0, description="Requests refused (529) at the route's limit.")
    urls: list[UpstreamURLStatus] = Field(description="Each URL's health.")


class StatusResponse(_ControlModel):
    pid: int = Field(description="The daemon's process id.")
    version: str = Field(description="pensieved version.")
    started_at: float = Field(description="Unix time the daemon started.")
    uptime_s: float = Field(description="Seconds since start.")
    state: str = Field(
        description="`ready`, `loading`, `no_model`, or `error` (degraded: see `error`)."
    )
    error: str | None = Field(description="Why the daemon is not serving, if it is not.")
    config_file: str = Field(description="The config file the daemon reads and watches.")
    config_error: str | None = Field(
        description="The config file is invalid; the daemon runs on the last good (or default) "
        "config until it is fixed."
    )
    config_sources: list[ConfigSource] = Field(
        default_factory=list,
        description="The file has been invalid since start: where each section of the config "
        "in force came from (empty: the whole config is the file's, or the last good one "
        "read while running).",
    )
    socket_path: str = Field(description="This control socket.")
    log_file: str | None = Field(description="`logging.file`, if set (stderr is always used).")
    http: HttpStatus
    model: ModelStatus | None = Field(description="The default model, once loaded.")
    model_loading: str | None = Field(description="A model file being loaded in the background.")
    aliases: dict[str, str] = Field(description="`model.aliases` in effect.")
    process: ProcessStatus
    requests: RequestStatus
    last_reload: ReloadResult | None = Field(description="The most recent reload, if any.")
    activity: list[WorkItem] = Field(
        default_factory=list, description="Requests and model loads in progress."
    )
    previous_exit: PreviousExit | None = Field(
        None,
        description="The previous daemon for this config file died (a crash, a kill) and this "
        "one started after it (launchd and systemd restart it).",
    )
    upstreams: list[UpstreamStatus] = Field(
        default_factory=list, description="`model.upstreams` routes and their URLs' health."
    )
    models: list[ModelEntryStatus] = Field(
        default_factory=list,
        description="Every model file the config names: loaded, loading, unloading or "
        "unloaded (and since when).",
    )


class ConfigResponse(_ControlModel):
    config_file: str = Field(description="The config file the daemon reads and watches.")
    values: dict[str, dict[str, Any]] = Field(
        description="The config in force: the last good read of the file, flags on top."
    )
    flags: list[str] = Field(description="Dotted keys set by command-line flags.")
    config_error: str | None = Field(
        description="Why the file's current content is not in force, if it is not."
    )
    config_sources: list[ConfigSource] = Field(
        default_factory=list,
        description="As in the status: where each section came from, while the file has been "
        "invalid since start.",
    )
    api_key: str | None = Field(
        None,
        description="The API key in force (`server.api_key`, or its key file's), which `values` "
        "shows masked: for `pensievectl claude`, over a socket only its owner can use. Null: no "
        "key, or a key file the daemon cannot read. Never printed.",
    )


class StopResponse(_ControlModel):
    pid: int = Field(description="The process that is stopping.")
    drain_timeout_ms: int = Field(description="How long in-flight requests may still run.")


class ErrorResponse(_ControlModel):
    error: str = Field(description="What went wrong and what to do.")
