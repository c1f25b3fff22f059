"""Which models are loaded: each model file the config names is a `ModelEntry`, unloaded,
loading, loaded or unloading, and the Engine's `ModelPool` moves it between those states.

The default model loads at start, an alias's model on its first request. A model idle for
`model.idle_unload_s` is unloaded with its KV caches saved; `model.max_loaded_models` and
`model.memory_budget_mb` bound what stays loaded, and the least recently used idle model makes
room. A request for a model that is not loaded waits for it (the API layer sends keep-alives
meanwhile): it never fails because another model is loaded, and a model in use is never
unloaded under it. Whoever waits for a model to load, to be let go of or for room waits on
the pool's `Changes`, notified wherever that state changes.

Who frees a model's native objects (weights, context, batch, samplers): only
`ModelRuntime.close`, which first stops and joins the model's decode thread (the one thread
that decodes and samples on them), then saves the KV caches, then frees the context before
the weights. Every runtime a load made is closed exactly once: by an unload (idle, room,
`pensievectl`), by its retirement once the requests that started on it before a reload are
done, or at a stop by `ModelPool.close`, which also closes the runtimes still retiring. None
is left to interpreter shutdown: its decode thread could still be inside llama.cpp while the
process frees what that thread reads (a SIGSEGV at stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pensieve.activity import Activity
from pensieve.config import AliasTarget, Config, alias_target
from pensieve.gguf import read_gguf_metadata
from pensieve.hfref import model_file
from pensieve.paths import cache_dir
from pensieved.engine.batcher import Batcher
from pensieved.engine.interface import OnWait
from pensieved.engine.llama import attention_on_gpu
from pensieved.engine.memory import budget_bytes, plan_for_file
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import PrefixStore
from pensieved.engine.scheduler import Scheduler
from pensieved.engine.templates import template_problem
from pensieved.errors import (
    LoadCancelledError,
    OverloadedError,
    ShuttingDownError,
)
from pensieved.metrics import EngineMetrics
from pensieved.waiting import Changes

log = logging.getLogger("pensieved.engine")

EntryState = Literal["unloaded", "loading", "loaded", "unloading"]


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
    # replaced model is freed only when none is left (see ModelPool.unload).
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


def open_runtime(
    settings: ModelSettings,
    store: PrefixStore,
    keep_loading: Callable[[float], bool],
    on_release: Callable[[], None],
) -> ModelRuntime:
    """Load a model, start its scheduler and read back its saved KV caches (a thread's job).
    `on_release` is called on the event loop whenever the scheduler frees a slot."""
    model = LoadedModel(settings, keep_loading)
    if not keep_loading(1.0):
        model.close()
        raise LoadCancelledError(f"loading model {settings.path} was abandoned")
    runtime = ModelRuntime(model, Scheduler(model.slots, Batcher(model), on_release))
    try:
        store.restore(model, runtime.scheduler.slots)
        runtime.scheduler.adopt_cached()
    except Exception:
        log.exception("reading saved KV caches failed; starting cold")
    return runtime


T = TypeVar("T")


async def _in_own_thread(threads: set[threading.Thread], fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a daemon thread of its own, added to `threads` (whose owner drops the
    threads that have ended).

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
        # RuntimeError: the loop is gone (the daemon stopped without waiting for us).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

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

    def tool_dialect(self, name: str) -> str:
        """The `tool_dialect` setting for requests to `name` (`auto`: detect)."""
        for pattern, target in alias_targets(self.config).items():
            if fnmatch.fnmatchcase(name, pattern):
                return self.dialect_of_target(target)
        return self.config.model.tool_dialect

    def dialect_of_target(self, target: AliasTarget) -> str:
        if target.tool_dialect is not None:
            return target.tool_dialect
        if Path(target.model_path).expanduser() == self.default_path:
            return self.config.model.tool_dialect
        return "auto"

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


class ModelPool:
    """The models the config in force names, and which of them are loaded (see the module's
    docstring). The Engine holds one and installs a new `ModelTable` on every config change."""

    def __init__(self, config: Config, activity: Activity, metrics: EngineMetrics) -> None:
        self.table = ModelTable(config, None, {})
        self.activity = activity
        self.metrics = metrics
        self.draining = False
        self._cancelled = threading.Event()  # set once: loads are abandoned, none start
        # Loading threads (inside llama.cpp); a thread is dropped once it has ended.
        self._threads: set[threading.Thread] = set()
        self.changes = Changes()
        # Entries a new config dropped whose model is not freed yet, by id (see `_retire`).
        self._retiring: dict[int, tuple[ModelEntry, asyncio.Task[None]]] = {}
        self._closing = False  # the daemon stops: retiring models are freed now

    @property
    def config(self) -> Config:
        return self.table.config

    def install(self, table: ModelTable) -> None:
        """Make `table` current. Models it dropped are unloaded once their requests are done;
        idle models beyond a lowered `model.max_loaded_models` at once."""
        old, self.table = self.table, table
        self.changes.notify()
        with contextlib.suppress(RuntimeError):  # no loop: nothing was loaded either
            loop = asyncio.get_running_loop()
            for job in (self._check_alias_templates(), self._unload_beyond_limit()):
                loop.create_task(job).add_done_callback(retrieve)
            for path, entry in old.entries.items():
                if table.entries.get(path) is not entry and id(entry) not in self._retiring:
                    task = loop.create_task(self._retire(entry))
                    task.add_done_callback(retrieve)
                    self._retiring[id(entry)] = (entry, task)

    # ---- loading ---------------------------------------------------------------------------

    def keep_loading(self, path: Path, fraction: float) -> bool:
        """Called from the loading thread as llama.cpp reads `path`'s weights (`fraction` of
        them so far, several times a second); False abandons the load. It turns False when
        the daemon stops, so a stop does not wait for a large model to finish loading."""
        return not self._cancelled.is_set()

    def start_draining(self) -> None:
        """The daemon stops: no model loads or makes room for a new request any more."""
        self.draining = True
        self.changes.notify()

    def cancel_loads(self) -> None:
        """Abandon model loads in progress (at their next progress call) and refuse new ones."""
        self._cancelled.set()
        self.changes.notify()

    @property
    def loads_cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def wait_loads(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for loading threads to end; True if none is left."""
        threads = list(self._threads)
        deadline = time.monotonic() + timeout

        def join() -> None:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

        if threads:
            await asyncio.to_thread(join)
        self._drop_ended_threads()
        return not self._threads

    def _drop_ended_threads(self) -> None:
        self._threads.difference_update([t for t in self._threads if not t.is_alive()])

    async def load(self, entry: ModelEntry, on_wait: OnWait | None = None) -> None:
        """Return once `entry` is loaded: loading it (after making room) unless a load is
        under way already, which every waiting request shares. `on_wait` is awaited every
        keep-alive period meanwhile; a failed load is raised to every waiting request."""
        entry.waiting += 1
        try:
            while not self._is_loaded(entry):
                task = entry.task
                if task is None or task.done():
                    task = self._start(entry, self._make_room_and_load(entry))
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
            self.changes.notify()

    @staticmethod
    def _is_loaded(entry: ModelEntry) -> bool:
        # A method, not an inline test: mypy narrows `entry.state` across the awaits above.
        return entry.state == "loaded"

    def _start(self, entry: ModelEntry, job: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """Run `job` as `entry`'s load or unload task; its end wakes whoever waits on it."""
        task = asyncio.get_running_loop().create_task(job)
        task.add_done_callback(retrieve)
        task.add_done_callback(lambda _: self.changes.notify())
        entry.task = task
        return task

    async def _make_room_and_load(self, entry: ModelEntry) -> None:
        await self._make_room(entry)
        await self.load_beside(entry, self.config)

    async def load_beside(self, entry: ModelEntry, config: Config) -> None:
        """Load `entry`'s model for `config` (maybe not installed yet) beside those loaded
        now, making no room, and restore its saved KV caches."""
        path = entry.path
        entry.set_state("loading")
        log.info("loading model %s (context %s)", path, entry.settings.context_size)
        started = time.monotonic()
        try:
            with self.activity.loading(str(path)):
                self._drop_ended_threads()
                runtime = await _in_own_thread(
                    self._threads,
                    open_runtime,
                    entry.settings,
                    prefix_store_for(config),
                    lambda fraction: self.keep_loading(path, fraction),
                    self.changes.notify,
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
        """Wait until `entry` may load under `model.max_loaded_models` and the memory budget,
        unloading the least recently used idle models; OverloadedError if none frees up within
        the request timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.request_timeout_ms / 1000
        while True:
            if self._cancelled.is_set() or self.draining:
                raise ShuttingDownError("pensieved is shutting down and takes no new requests")
            others = [
                e for e in self.table.entries.values() if e is not entry and e.state != "unloaded"
            ]
            if len(others) < self.config.model.max_loaded_models and await self._fits(
                entry, others
            ):
                return
            idle = [e for e in others if e.state == "loaded" and not e.busy]
            if idle:
                victim = min(idle, key=lambda e: e.used_at)
                log.info("unloading %s to make room for %s", victim.path.name, entry.path.name)
                await self.unload(victim, "room")
                continue
            if not await self.changes.wait(deadline - loop.time()):
                raise OverloadedError(
                    f"cannot load {entry.path.name}: model.max_loaded_models "
                    f"({self.config.model.max_loaded_models}) models are loaded and all are busy; "
                    "retry shortly, or raise model.max_loaded_models",
                    retry_after_s=5,
                )

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

    # ---- holding ---------------------------------------------------------------------------

    @staticmethod
    def hold(runtime: ModelRuntime) -> None:
        """Count a request in on `runtime`: neither a reload nor an unload frees it meanwhile."""
        runtime.users += 1

    def release(self, runtime: ModelRuntime) -> None:
        runtime.users -= 1
        runtime.last_used = time.time()
        self.changes.notify()

    # ---- unloading -------------------------------------------------------------------------

    async def unload(self, entry: ModelEntry, reason: str) -> bool:
        """Unload `entry` once its requests are done and no load or unload of it is under way
        (a request arriving meanwhile waits for it); False if it is not loaded by then."""
        # At a stop the drain has ended its requests; unloading joins its decode thread first.
        await self.changes.until(
            lambda: (self._closing or not entry.busy) and (entry.task is None or entry.task.done())
        )
        if entry.state != "loaded":
            return False
        reason = "stop" if self._closing else reason
        task = self._start(entry, self._unload_now(entry, reason))
        # Shielded: a caller cancelled meanwhile (the idle watcher at a stop) must not leave
        # the model half closed; close() waits for the task instead.
        await asyncio.shield(task)
        return True

    async def _retire(self, entry: ModelEntry) -> None:
        """Free a model a new config replaced or dropped, once its requests are done (at a
        stop, at once)."""
        try:
            if await self.unload(entry, "reload"):
                log.info("released model %s", entry.path.name)
        finally:
            self._retiring.pop(id(entry), None)

    def retiring_runtimes(self) -> list[ModelRuntime]:
        """The loaded models a new config replaced, still serving requests begun on them."""
        return [e.runtime for e, _ in self._retiring.values() if e.runtime is not None]

    async def _unload_now(self, entry: ModelEntry, reason: str) -> None:
        """Save `entry`'s KV caches and free its model."""
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

    async def unload_idle(self, stop: asyncio.Event) -> None:
        """Unload models idle for `model.idle_unload_s`, until `stop` is set. Between rounds
        it sleeps until the next model falls due, or until something changes (a request let
        go of a model, a new config)."""

        async def stopped() -> None:
            await stop.wait()

        stopping = asyncio.ensure_future(stopped())
        try:
            while not stop.is_set():
                due = await self._unload_idle_now()
                change = self.changes.next()
                await asyncio.wait(
                    {stopping, change}, timeout=due, return_when=asyncio.FIRST_COMPLETED
                )
                change.cancel()
        finally:
            stopping.cancel()

    async def _unload_idle_now(self) -> float | None:
        """Unload the models idle for long enough; seconds until the next one falls due."""
        idle_s = self.config.model.idle_unload_s
        if idle_s <= 0 or self.draining:
            return None
        due = None
        for entry in list(self.table.entries.values()):
            if entry.state != "loaded" or entry.busy:
                continue
            left = entry.used_at + idle_s - time.time()
            if left <= 0:
                log.info("model %s idle for %.0fs: unloading it", entry.path.name, idle_s)
                await self.unload(entry, "idle")
            else:
                due = left if due is None else min(due, left)
        return due

    async def _unload_beyond_limit(self) -> None:
        while True:
            loaded = [e for e in self.table.entries.values() if e.state == "loaded"]
            idle = [e for e in loaded if not e.busy]
            if len(loaded) <= self.config.model.max_loaded_models or not idle:
                return
            await self.unload(min(idle, key=lambda e: e.used_at), "room")

    async def close(self) -> None:
        """Unload every model (the daemon stops): loads or unloads under way get a few
        seconds to end, requests none (they were ended). The models a new config replaced
        are freed first, and waited for."""
        self._closing = True
        self.changes.notify()
        retiring = {task for _, task in self._retiring.values()}
        if retiring:
            await asyncio.wait(retiring)
        table, self.table = self.table, ModelTable(self.config, None, {})
        for entry in table.entries.values():
            if entry.task is not None and not entry.task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait({entry.task}, timeout=5)
            if entry.runtime is not None:
                await self._unload_now(entry, "stop")

    # ---- names -----------------------------------------------------------------------------

    def entry_named(self, name: str) -> ModelEntry | None:
        """The entry a model name, an alias pattern or a file name (or path) denotes."""
        table = self.table
        for entry in table.entries.values():
            path = entry.path
            if name in (str(path), path.name, path.stem) or name in table.names_of(path):
                return entry
        return table.resolve(name)[0]

    async def _check_alias_templates(self) -> None:
        """Report an alias whose model has no chat template and that names none (from the
        GGUF's header), or whose template cannot render (the one it names, or once its model
        is loaded its own), before any request is refused for it (status, `models`, the log)."""
        table = self.table
        for pattern, target in alias_targets(table.config).items():
            entry, setting, key = table.resolve_pattern(pattern, target)
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
