"""Which models are loaded: each model file the config names is a `ModelEntry`, unloaded,
loading, loaded or unloading, and `ModelLifecycle` (a part of the Engine) moves it between
those states.

The default model loads at start, an alias's model on its first request. A model idle for
`model.idle_unload_s` is unloaded with its KV caches saved; `model.max_loaded_models` and
`model.memory_budget_mb` bound what stays loaded, and the least recently used idle model makes
room. A request for a model that is not loaded waits for it (the API layer sends keep-alives
meanwhile): it never fails because another model is loaded, and a model in use is never
unloaded under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pensieve.activity import Activity
from pensieve.config import AliasTarget, Config, alias_target
from pensieve.gguf import read_gguf_metadata
from pensieve.hfref import model_file
from pensieve.paths import cache_dir
from pensieved.engine.batcher import Batcher
from pensieved.engine.llama import attention_on_gpu
from pensieved.engine.memory import budget_bytes, plan_for_file
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import PrefixStore
from pensieved.engine.scheduler import Scheduler
from pensieved.engine.templates import template_problem
from pensieved.errors import (
    LoadCancelledError,
    ModelUnavailableError,
    OverloadedError,
    ShuttingDownError,
)
from pensieved.metrics import EngineMetrics

log = logging.getLogger("pensieved.engine")

EntryState = Literal["unloaded", "loading", "loaded", "unloading"]
# A keep-alive callback of the API layer, awaited every `server.keepalive_ping_s` while a
# request waits for its model to load.
OnWait = Callable[[], Awaitable[None]]


def alias_targets(config: Config) -> dict[str, AliasTarget]:
    """`model.aliases`, every value as an object."""
    return {pattern: alias_target(value) for pattern, value in config.model.aliases.items()}


def release_freed_memory() -> None:
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
class ModelTable:
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
        path = model_file(target.model_path)
        setting = target.chat_template
        if setting is None and path == self.default_path:
            setting = self.config.model.chat_template
        return self.entries.get(path), setting, f"model.aliases.{pattern}.chat_template"

    def names_of(self, path: Path) -> list[str]:
        names = [
            pattern
            for pattern, target in alias_targets(self.config).items()
            if model_file(target.model_path) == path
        ]
        return (["(default)"] if path == self.default_path else []) + names


def entries_for(
    wanted: dict[Path, ModelSettings], old: dict[Path, ModelEntry]
) -> dict[Path, ModelEntry]:
    """The entries `config` names: unchanged ones kept (loaded or not), the others new."""
    entries: dict[Path, ModelEntry] = {}
    for path, settings in wanted.items():
        current = old.get(path)
        entries[path] = (
            current if current and current.settings == settings else ModelEntry(settings)
        )
    return entries


def gguf_has_template(path: Path) -> bool | None:
    try:
        return "tokenizer.chat_template" in read_gguf_metadata(path)
    except (OSError, ValueError):
        return None  # missing or unreadable: its load will say why


def retrieve(task: asyncio.Task[None]) -> None:
    # A load nobody waits for any more (its requests went away) must not log "exception
    # never retrieved"; its error is kept in the entry for status.
    if not task.cancelled():
        task.exception()


class ModelLifecycle:
    """The Engine's model loading and unloading (see the module's docstring); the Engine
    sets these attributes."""

    config: Config
    activity: Activity
    metrics: EngineMetrics
    _models: ModelTable
    _draining: bool
    _cancel_loads: threading.Event
    _load_threads: set[threading.Thread]

    def _no_model_error(self) -> ModelUnavailableError:
        raise NotImplementedError

    def load_progress(self, path: Path, fraction: float) -> bool:
        raise NotImplementedError

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
        await self._check_alias_templates()  # its own template, for the aliases it serves

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
            model = self.config.model
            gpu = attention_on_gpu(model.gpu_layers)
            return plan_for_file(model, path, gpu=gpu).total_bytes
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
        await asyncio.to_thread(release_freed_memory)
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
                    task.add_done_callback(retrieve)
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

    async def _retire(self, entries: list[ModelEntry]) -> None:
        """Free replaced models once the requests that started on them are done."""
        for entry in entries:
            while entry.busy or (entry.task is not None and not entry.task.done()):
                await asyncio.sleep(0.1)
            if entry.runtime is not None:
                await self._unload(entry, "reload")
                log.info("released model %s", entry.path.name)

    def _after_config_change(self) -> None:
        """After a config change: report missing chat templates, and unload idle models
        beyond a lowered `model.max_loaded_models`."""
        for job in (self._check_alias_templates(), self._unload_beyond_limit()):
            task = asyncio.get_running_loop().create_task(job)
            task.add_done_callback(retrieve)

    async def _unload_beyond_limit(self) -> None:
        while True:
            loaded = [e for e in self._models.entries.values() if e.state == "loaded"]
            idle = [e for e in loaded if not e.busy]
            if len(loaded) <= self.config.model.max_loaded_models or not idle:
                return
            await self._start_unload(min(idle, key=lambda e: e.used_at), "room")

    async def _check_alias_templates(self) -> None:
        """Report an alias whose model has no chat template and that names none (from the
        GGUF's header), or whose template cannot render (the one it names, or once its model
        is loaded its own), before any request is refused for it (status, `models`, the log)."""
        models = self._models
        for pattern, target in alias_targets(models.config).items():
            entry, setting, key = models.resolve_pattern(pattern, target)
            if entry is None:
                continue
            if entry.has_template is None:
                entry.has_template = await asyncio.to_thread(gguf_has_template, entry.path)
            message = None
            if setting is not None or entry.runtime is not None or entry.has_template is False:
                own = entry.runtime.model.chat_template if entry.runtime is not None else None
                message = template_problem(entry.path, setting, own, key)
            if message is not None:
                if entry.template_problem != message:
                    log.error("%s", message)
                entry.template_problem = message
            elif entry.template_problem is not None and key in entry.template_problem:
                entry.template_problem = None
