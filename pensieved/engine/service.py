"""The engine's front door: which model serves a name, prompt preparation, admission, stats.

The API layer sees it through `ServingEngine` (interface.py). Models load and unload as
lifecycle.py says (lazily, when idle, to make room). A reload builds the new default model next
to the old one and swaps the table of models in one assignment; requests keep the
`ModelRuntime` they started on, so in-flight work finishes on the model it began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pensieve.activity import Activity
from pensieve.config import Config, speculation_of
from pensieve.hfref import model_file
from pensieve.paths import bundled_model_path
from pensieve.wire import DecodeStatus, ModelEntryStatus, ModelStatus
from pensieved.engine.dialects import by_name
from pensieved.engine.dialects.detect import DialectChoice, choose
from pensieved.engine.grammar import loosest_grammar, request_grammar
from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.interface import EngineState, EngineStatus, OnWait, Work
from pensieved.engine.lifecycle import (
    ModelEntry,
    ModelPool,
    ModelRuntime,
    ModelTable,
    alias_targets,
    entries_for,
    prefix_store_for,
)
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.persist import saved_summary
from pensieved.engine.prompt import render_request, template_caps, tokenize_rendered
from pensieved.engine.speculation import SpeculationMode
from pensieved.engine.templates import template_problem, template_source
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
    ChatTemplateError,
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
from pensieved.waiting import Changes

log = logging.getLogger("pensieved.engine")


def settings_for(config: Config, path: Path) -> ModelSettings:
    m = config.model
    speculative, draft = speculation_for(config, path)
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
        kv_unified=m.kv_unified,
        swa_full=m.swa_full,
        memory_budget_mb=m.memory_budget_mb,
        speculative=speculative,
        draft_path=model_file(draft) if draft is not None else None,
    )


def speculation_for(config: Config, path: Path) -> tuple[SpeculationMode, str | None]:
    """The `speculative` setting and draft model of the model in `path`: the default model's,
    else the first alias's that serves it (the config refuses aliases of one file that ask
    for different ones)."""
    if path == default_model_path(config):
        return speculation_of(config.model, None)
    for target in alias_targets(config).values():
        if model_file(target.model_path) == path:
            return speculation_of(config.model, target)
    return speculation_of(config.model, None)


def default_model_path(config: Config) -> Path | None:
    if config.model.model_path:
        return model_file(config.model.model_path)
    return bundled_model_path()


def wanted_models(config: Config) -> dict[Path, ModelSettings]:
    """Every model file `config` asks for (default and alias targets), with its settings."""
    paths = [default_model_path(config)]
    paths += [model_file(t.model_path) for t in alias_targets(config).values()]
    return {path: settings_for(config, path) for path in paths if path is not None}


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    requests_served: int = 0
    in_flight: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    cache_read_tokens: int = 0


@dataclass(frozen=True)
class PromptSettings:
    """The settings that shape a model's prompts: `chat_template` (None: the GGUF's) and
    `tool_dialect` (`auto`: detected from the template)."""

    chat_template: str | None = None
    tool_dialect: str = "auto"


_AUTO = PromptSettings()


def model_load_key(config: Config) -> tuple[object, ...]:
    """What decides the model `Engine.configure` loads at once: the default one (aliases' models
    load on their first request, so a new alias target needs no load)."""
    path = default_model_path(config)
    return (path, settings_for(config, path) if path is not None else None)


@dataclass(frozen=True)
class Session:
    """One Messages request on the engine, from admission to its last event."""

    engine: Engine
    request_id: str
    runtime: ModelRuntime
    prepared: PreparedPrompt
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def input_tokens(self) -> int:
        return self.prepared.input_tokens

    async def events(self) -> AsyncGenerator[Event, None]:
        """The generation's events; the activity record and the metrics follow its phases."""
        activity, work_id = self.engine.activity, self.request_id
        metrics = self.engine.metrics
        model = self.runtime.model.name
        slotted = first = None
        cached = 0
        # Closed with this one: a client gone must stop the generation now, not at the next
        # garbage collection.
        async with contextlib.aclosing(self.engine.generate(self.runtime, self.prepared)) as gen:
            async for event in gen:
                now = time.monotonic()
                # A few phase changes per request, never one per token.
                if isinstance(event, PromptCached):
                    slotted, cached = now, event.cache_read_tokens
                    metrics.queued.observe(now - self.admitted_at, model=model)
                    fresh = self.prepared.input_tokens - event.cache_read_tokens
                    activity.phase(
                        work_id,
                        f"evaluating the prompt ({fresh} new tokens, "
                        f"{event.cache_read_tokens} cached)",
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
        # The activity record names the requests that were running if the process crashes.
        self.activity = activity or Activity()
        self.metrics = EngineMetrics()
        self.pool = ModelPool(config, self.activity, self.metrics)
        self._state: EngineState = "loading"
        self._error: str | None = None
        self._template_error: str | None = None
        self.stats = Stats()
        self._ended = Changes()  # a request ended
        self._register_gauges()

    @property
    def config(self) -> Config:
        """The config in force: the one whose models are current."""
        return self.pool.config

    # ---- configuring -----------------------------------------------------------------------

    async def configure(self, config: Config) -> None:
        """Make `config`'s models current: its default model is loaded now, next to the
        current one, then the table of models is swapped in; aliases' models load on use.

        Models whose file and settings are unchanged are kept, not reloaded. On failure the
        current models stay and the error is raised (and recorded in `self.error`).
        """
        pool = self.pool
        old = pool.table
        default_path = default_model_path(config)
        entries = entries_for(wanted_models(config), old.entries)
        default = entries.get(default_path) if default_path else None
        fresh = default is not None and default is not old.default_entry
        try:
            if default is not None and default.state == "unloaded" and (fresh or self._error):
                await pool.load_beside(default, config)
            if pool.loads_cancelled:
                raise LoadCancelledError("model loads were abandoned: pensieved is stopping")
        except ModelLoadError as exc:
            if fresh and default is not None and default.runtime is not None:
                await pool.unload(default, "reload")
            if not isinstance(exc, LoadCancelledError):
                self._error = str(exc)
                if old.default_entry is None:
                    self._state = "error"
                    # Nothing was served before: list the config's models, the failed one
                    # with its error (`pensievectl models` says what is missing).
                    pool.install(ModelTable(config, default_path, entries))
            raise
        pool.install(ModelTable(config, default_path, entries))
        self._error = None
        self._state = "ready" if default is not None else "no_model"
        self._check_default_template()

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error or self._template_error

    def degrade(self, error: str) -> None:
        """No model can be loaded until an outside problem (the config file) is fixed."""
        self._state, self._error = "error", error

    def apply_live_settings(self, config: Config) -> None:
        """Settings that need no model load: aliases (their models load on use), limits."""
        entries = entries_for(wanted_models(config), self.pool.table.entries)
        self.pool.install(ModelTable(config, default_model_path(config), entries))
        self._check_default_template()

    def drop_stale_error(self) -> None:
        """A config that needs no model load makes a failed alias load moot (the alias is
        gone, or points at a loaded model)."""
        if self._state == "ready":
            self._error = None

    def _check_default_template(self) -> None:
        """A default model whose chat template is missing or cannot render (its own or the
        configured one) is reported at once (in status, /health and the log), not as a
        failure of every request."""
        entry = self.pool.table.default_entry
        runtime = entry.runtime if entry is not None else None
        message = None
        if entry is not None and runtime is not None:
            setting = self.config.model.chat_template
            own = runtime.model.chat_template
            message = template_problem(entry.path, setting, own, "model.chat_template")
        if message is not None:
            if self._template_error != message:
                log.error("%s", message)
            self._template_error = message
        elif self._template_error is not None and (entry is None or runtime is not None):
            self._template_error = None

    # ---- requests --------------------------------------------------------------------------

    async def load_model(self, name: str) -> ModelEntry:
        """`pensievectl models load NAME`: load the model serving `name` now."""
        entry = self._entry_named(name)
        await self.pool.load(entry)
        return entry

    async def unload_model(self, name: str) -> ModelEntry:
        """`pensievectl models unload NAME`: unload it once its requests are done."""
        entry = self._entry_named(name)
        await self.pool.unload(entry, "request")
        return entry

    def _entry_named(self, name: str) -> ModelEntry:
        entry = self.pool.entry_named(name)
        if entry is None:
            raise self._no_model_error()
        return entry

    def _no_model_error(self) -> ModelUnavailableError:
        if self._state == "loading":
            return ModelUnavailableError("the model is still loading; retry in a few seconds")
        if self._state == "error":
            return ModelUnavailableError(f"no model is loaded: {self._error}")
        return ModelUnavailableError(
            "no model is configured: run pensievectl pull (a coding model sized to this "
            "machine) and set model.model_path to the name it prints, or to a GGUF file"
        )

    def check_model(self, name: str) -> None:
        self.entry_for(name)

    def entry_for(self, name: str) -> ModelEntry:
        """The model entry that serves `name` (loaded or not); raises when none can."""
        table = self.pool.table
        if self.pool.draining:
            raise ShuttingDownError("pensieved is shutting down and takes no new requests")
        entry = table.resolve(name)[0]
        if entry is None or (
            self._state == "error"
            and entry is table.default_entry
            and entry.runtime is None
            and self._error
        ):
            raise self._no_model_error()
        return entry

    async def _acquire(
        self, name: str, on_wait: OnWait | None = None
    ) -> tuple[ModelRuntime, PromptSettings]:
        """Hold the loaded model serving `name` (loading it first if need be, awaiting
        `on_wait` every keep-alive period meanwhile); with its `chat_template` and
        `tool_dialect` settings."""
        entry = self.entry_for(name)
        _, setting, key = self.pool.table.resolve(name)
        while entry.state != "loaded" or entry.runtime is None:
            await self.pool.load(entry, on_wait)
        runtime = entry.runtime
        # Found when the model loaded (and in status since): the template cannot render.
        problem = template_problem(entry.path, setting, runtime.model.chat_template, key)
        if problem is not None:
            raise NoChatTemplateError(problem)
        self.pool.hold(runtime)
        return runtime, PromptSettings(setting, self.pool.table.tool_dialect(name))

    def _render_tokens(
        self, model: LoadedModel, request: GenerationRequest, settings: PromptSettings = _AUTO
    ) -> list[int]:
        return self._render(model, request, settings)[0]

    def _render(
        self, model: LoadedModel, request: GenerationRequest, settings: PromptSettings = _AUTO
    ) -> tuple[list[int], bool, str, list[int]]:
        """Prompt tokens, whether the prompt ends inside a reasoning block, the dialect's name,
        and where each content string ends. `settings.chat_template` overrides the model's own
        template."""
        template = settings.chat_template
        source = template_source(template) if template else model.chat_template
        caps = template_caps(source, settings.tool_dialect)
        reasoning = caps.dialect.dialect.reasoning
        rendered, contents = render_request(
            source,
            request,
            bos_text=model.bos_text,
            eos_text=model.eos_text,
            tool_dialect=settings.tool_dialect,
        )
        ends: list[int] = []
        tokens = tokenize_rendered(
            rendered,
            contents,
            lambda text, special, add_bos: model.tokenize(text, special=special, add_bos=add_bos),
            add_bos=model.add_bos,
            bos_text=model.bos_text,
            content_ends=ends,
        )
        dialect = caps.dialect.dialect
        return tokens, prompt_opens_thinking(rendered, reasoning.open), dialect.name, ends

    def _grammar(
        self, model: LoadedModel, request: GenerationRequest, dialect: str = "hermes"
    ) -> ParsedGrammar | None:
        """The request's grammar, built and parsed once per distinct tool set (both cached)."""
        started = time.monotonic()
        grammar, lazy = request_grammar(request, by_name(dialect))
        if grammar is None:
            return None
        try:
            trigger = by_name(dialect).syntax.trigger
            parsed = model.parsed_grammar(grammar, lazy=lazy, trigger=trigger)
            if parsed is not None:
                return parsed
            log.warning("llama.cpp refused the schema grammar; enforcing the JSON shape only")
            loosest = loosest_grammar(request, by_name(dialect))
            parsed = (
                model.parsed_grammar(loosest, lazy=lazy, trigger=trigger)
                if loosest is not None
                else None
            )
            if parsed is None:
                log.warning("llama.cpp refused the loosest grammar too; output is not constrained")
            return parsed
        finally:
            self.metrics.grammar_seconds.observe(time.monotonic() - started, model=model.name)

    def _prepare_sync(
        self, model: LoadedModel, request: GenerationRequest, settings: PromptSettings = _AUTO
    ) -> tuple[list[int], bool, ParsedGrammar | None, str, list[int]]:
        tokens, thinking_open, dialect, ends = self._render(model, request, settings)
        return tokens, thinking_open, self._grammar(model, request, dialect), dialect, ends

    async def count_tokens(self, name: str, request: GenerationRequest, work: Work) -> int:
        self.activity.begin(work.request_id, work.what, "rendering and tokenizing the prompt")
        try:
            runtime, template = await self._acquire(name)
            try:
                tokens = await asyncio.to_thread(
                    self._render_tokens, runtime.model, request, template
                )
            finally:
                self.pool.release(runtime)
        finally:
            self.activity.end(work.request_id)
        return len(tokens)

    @contextlib.asynccontextmanager
    async def session(
        self, name: str, request: GenerationRequest, work: Work, on_wait: OnWait | None = None
    ) -> AsyncIterator[Session]:
        """Admit, prepare and hold a model for one request; on exit (however it ends) hand
        the model back and count the request done. `on_wait` is awaited every keep-alive
        period while the model loads."""
        request_id = work.request_id
        # Counted from before tokenizing: a drain waits for it, and a full server says so
        # before spending any work on it.
        self._admit()
        admitted = time.monotonic()
        self.activity.begin(request_id, work.what, "rendering and tokenizing the prompt")
        try:
            runtime, prepared = await self._prepare(name, request, on_wait)
            try:
                self.activity.phase(
                    request_id, f"waiting for a slot ({prepared.input_tokens} prompt tokens)"
                )
                yield Session(self, request_id, runtime, prepared, admitted)
            finally:
                self.pool.release(runtime)
        finally:
            self.stats.in_flight -= 1
            self.stats.requests_served += 1
            self.activity.end(request_id)
            self._ended.notify()

    async def _prepare(
        self, name: str, request: GenerationRequest, on_wait: OnWait | None
    ) -> tuple[ModelRuntime, PreparedPrompt]:
        """Render, tokenize and fit the prompt; raises PromptTooLongError if it cannot fit.

        The returned runtime is held for the caller (`users`), so neither a reload nor an
        idle unload frees the model under it.
        """
        runtime, template = await self._acquire(name, on_wait)
        model = runtime.model
        try:
            tokens, thinking_open, grammar, dialect, ends = await asyncio.to_thread(
                self._prepare_sync, model, request, template
            )
            room = model.n_ctx - len(tokens)
            if room < 1:
                raise PromptTooLongError(len(tokens), model.n_ctx - 1)
        except BaseException:
            self.pool.release(runtime)
            raise
        max_tokens = min(request.max_tokens, room, self.config.model.max_output_tokens)
        prepared = PreparedPrompt(
            request,
            tuple(tokens),
            max_tokens,
            grammar=grammar,
            thinking_open=thinking_open,
            tool_dialect=dialect,
            content_ends=tuple(ends),
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
    ) -> AsyncGenerator[Event, None]:
        timeout_s = self.config.server.request_timeout_ms / 1000
        deadline = time.monotonic() + timeout_s
        stream = runtime.scheduler.stream(
            prepared, deadline, heartbeat_s=self.config.server.keepalive_ping_s
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
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
        return [e.runtime for e in self.pool.table.entries.values() if e.runtime is not None]

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
            lambda: per_model(lambda rt: rt.model.kv_bytes()),
            ("model",),
        )
        speculation = (
            ("drafted", "Tokens drafted by speculative decoding (n-gram), per loaded model."),
            ("accepted", "Drafted tokens kept: each one a decode step saved."),
            ("forced", "Tokens of text a grammar forced, kept without a step each (jump-forward)."),
            ("acceptance_rate", "Drafted tokens kept, as a fraction of those drafted."),
            ("tokens_per_step", "Output tokens per decode step of a generating request."),
            ("gained", "Output tokens that cost no decode step: accepted plus forced."),
        )

        def speculation_figure(name: str) -> Callable[[], list[tuple[dict[str, str], float]]]:
            return lambda: per_model(
                lambda rt: getattr(rt.scheduler.decode_stats.speculation, name)
            )

        for name, text in speculation:
            registry.gauge(
                f"pensieve_speculation_{name}", text, speculation_figure(name), ("model",)
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
        entry = self.pool.table.default_entry
        return entry.path.stem if entry is not None else None

    @property
    def default_model(self) -> LoadedModel | None:
        runtime = self.pool.table.default
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
            kv=model.kv_status(),
            background_prefills=runtime.scheduler.background_prefills(),
            recent_requests=list(runtime.scheduler.recent),
        )

    def _dialect_of(self, path: Path, runtime: ModelRuntime | None) -> DialectChoice | None:
        """The dialect requests to the model at `path` use (for its first name), or None
        while it depends on a GGUF template not yet read."""
        models = self.pool.table
        setting: str
        if path == models.default_path:
            template, setting = self.config.model.chat_template, self.config.model.tool_dialect
        else:
            targets = alias_targets(self.config).values()
            serving = [t for t in targets if Path(t.model_path).expanduser() == path]
            if not serving:
                return None
            template, setting = serving[0].chat_template, models.dialect_of_target(serving[0])
        if setting != "auto":
            return choose(None, setting)
        try:
            source = template_source(template) if template else None
        except ChatTemplateError:
            return None
        if source is None and runtime is not None:
            source = runtime.model.chat_template
        return choose(source, setting) if source else None

    def models_status(self) -> list[ModelEntryStatus]:
        """Every configured model, loaded or not (`status` and `pensievectl models`)."""
        models = self.pool.table
        store = prefix_store_for(self.config)
        out = []
        for path, entry in models.entries.items():
            runtime = entry.runtime
            disk_tokens, disk_bytes = saved_summary(store.directory, path)
            template = None
            if path == models.default_path:
                template = self.config.model.chat_template
            dialect = self._dialect_of(path, runtime)
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
                    tool_dialect=dialect.dialect.name if dialect else None,
                    tool_dialect_source=dialect.source if dialect else None,
                    memory_bytes=(
                        runtime.model.size_bytes + runtime.model.kv_bytes() if runtime else 0
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

    def status(self, *, models: bool = True) -> EngineStatus:
        """State and default-model facts for /health and `status`; with every model's state
        unless `models` is False (it reads the saved caches' headers: not for /health)."""
        runtime = self.pool.table.default
        facts = self._model_status(runtime) if runtime is not None else None
        aliases = {p: t.model_path for p, t in alias_targets(self.config).items()}
        state = "error" if self._template_error and self._state == "ready" else self._state
        listed = self.models_status() if models else []
        return EngineStatus(state, self.error, facts, aliases, listed, self.stats.in_flight)

    async def wait_requests(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for admitted requests to end; True if none is left."""
        return await self._ended.until(lambda: not self.stats.in_flight, timeout)

    def start_draining(self) -> None:
        self.pool.start_draining()

    def abort_all(self) -> None:
        error = ShuttingDownError("pensieved is shutting down; the request was ended early")
        # Requests still running on a model a reload replaced are ended too.
        for runtime in self._loaded() + self.pool.retiring_runtimes():
            runtime.scheduler.abort_all(error)

    async def close(self) -> None:
        await self.pool.close()


__all__ = ["Engine", "EngineStatus", "ModelEntry", "ModelRuntime", "PensieveError", "Session"]
