"""Hot reload: watch the config file, validate it with the one validator, apply the difference.

What a change needs decides how it is applied (`plan_changes`):
- most keys (logging, limits, timeouts, CORS, aliases among loaded models) apply at once;
- host/port bind the new listener before the old one closes, so no request is refused;
- model keys load the new model in the background while the old one keeps serving, then
  `Engine.load` swaps them; requests in flight finish on the model they started with;
- `server.socket_path` applies at the next start (clients would lose the daemon otherwise).
An invalid file changes nothing: the running config stays and the error shows in `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pensieve.config import Config, ConfigError, apply_overrides, diff_configs, load_config_file
from pensieve.wire import Change, ChangeAction, ReloadResult
from pensieved.engine.service import Engine, default_model_path, wanted_models
from pensieved.errors import LoadCancelledError, ModelLoadError
from pensieved.logsetup import configure_logging

log = logging.getLogger("pensieved.reload")

_REBIND_KEYS = frozenset({"server.host", "server.port"})
_RESTART_KEYS = frozenset({"server.socket_path"})
_MODEL_KEYS = frozenset(
    {
        "model.model_path",
        "model.model_type",
        "model.context_size",
        "model.gpu_layers",
        "model.threads",
        "model.batch_size",
        "model.slots",
        "model.mmap",
    }
)


def action_for(key: str) -> ChangeAction:
    if key in _REBIND_KEYS:
        return "rebind"
    if key in _RESTART_KEYS:
        return "restart"
    if key in _MODEL_KEYS:
        return "model"
    return "live"


def model_key(config: Config) -> tuple[object, ...]:
    """Everything that decides which model objects must exist (what `Engine.load` builds)."""
    wanted = wanted_models(config)
    return (default_model_path(config), tuple(sorted(wanted.items(), key=lambda i: str(i[0]))))


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    rebind: bool = False
    model_load: bool = False
    logging: bool = False


def plan_changes(running: Config, new: Config, engine_config: Config, engine_ok: bool) -> Plan:
    """How to go from `running` to `new`.

    `engine_config`/`engine_ok` describe the models actually loaded: a model that failed to
    load is retried even when the file did not change, and an alias that points at a file not
    loaded yet needs a load although aliases alone are live.
    """
    plan = Plan()
    for key, (old, value) in diff_configs(running, new).items():
        plan.changes.append(Change(key=key, old=old, new=value, action=action_for(key)))
    keys = {c.key for c in plan.changes}
    plan.rebind = bool(keys & _REBIND_KEYS)
    plan.logging = any(k.startswith("logging.") for k in keys)
    plan.model_load = not engine_ok or model_key(engine_config) != model_key(new)
    return plan


class ReloadTarget(Protocol):
    """What the reloader changes: the daemon."""

    config: Config
    config_error: str | None
    engine: Engine
    http_sockets: list[socket.socket]  # empty: no HTTP listener (its address was busy)

    def rebind_http(self, config: Config) -> None:
        """Listen per `config` (new listener first); raise ListenError on failure."""

    def update_http_limits(self, config: Config) -> None:
        """Apply body size and idle timeouts to new connections."""

    async def load_models(self, config: Config) -> None:
        """`Engine.load(config)`, recorded as work in progress."""


class Reloader:
    def __init__(
        self,
        target: ReloadTarget,
        config_path: Path,
        overrides: dict[str, object],
        *,
        missing_ok: bool,
        listen_error: type[Exception],
    ) -> None:
        self.target = target
        self.config_path = config_path
        self.overrides = overrides
        self.missing_ok = missing_ok
        self.listen_error = listen_error
        self.last: ReloadResult | None = None
        self.model_loading: str | None = None
        self._lock = asyncio.Lock()
        self._model_task: asyncio.Task[None] | None = None

    def read(self, path: Path | None = None) -> Config:
        """The config a file describes, with the daemon's flags on top (flags win)."""
        if path is None:
            config = load_config_file(self.config_path, missing_ok=self.missing_ok)
        else:
            config = load_config_file(path)
        return apply_overrides(config, self.overrides) if self.overrides else config

    def plan(self, new: Config) -> Plan:
        engine = self.target.engine
        engine_ok = engine.state in ("ready", "no_model")
        return plan_changes(self.target.config, new, engine.config, engine_ok)

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            result = await self._reload(trigger)
        self.last = result
        return result

    async def _reload(self, trigger: str) -> ReloadResult:
        now = time.time()
        try:
            new = self.read()
        except ConfigError as exc:
            log.error("config not reloaded, the running config stays: %s", exc)
            self.target.config_error = str(exc)
            return ReloadResult(time=now, trigger=trigger, ok=False, error=str(exc))
        # One model load at a time: a change that arrives during a load is applied after it,
        # against what actually got loaded.
        if self._model_task is not None and not self._model_task.done():
            await asyncio.wait([self._model_task])
        plan = self.plan(new)
        # Also when nothing listens: a degraded start may have found its address busy.
        if plan.rebind or not self.target.http_sockets:
            try:
                self.target.rebind_http(new)
            except self.listen_error as exc:
                log.error("config not reloaded, the running config stays: %s", exc)
                return ReloadResult(
                    time=now, trigger=trigger, ok=False, error=str(exc), changes=plan.changes
                )
        if plan.logging:
            configure_logging(new.logging)
        self.target.update_http_limits(new)
        engine = self.target.engine
        if plan.model_load:
            # Everything but the models applies now; the models follow when loaded.
            engine.apply_live_settings(new.model_copy(update={"model": engine.config.model}))
            self.model_loading = str(default_model_path(new) or "")
            self._model_task = asyncio.create_task(self._load_models(new, trigger))
        else:
            engine.apply_live_settings(new)
            if engine.state == "ready":
                engine.error = None  # a failed alias load is moot once the alias is gone
        self.target.config = new
        self.target.config_error = None
        for change in plan.changes:
            log.info("config %s: %r -> %r (%s)", change.key, change.old, change.new, change.action)
        if not plan.changes and not plan.model_load:
            log.info("config reloaded (%s): nothing changed", trigger)
        return ReloadResult(
            time=now, trigger=trigger, ok=True, changes=plan.changes, model_loading=plan.model_load
        )

    async def _load_models(self, config: Config, trigger: str) -> None:
        try:
            await self.target.load_models(config)
        except LoadCancelledError as exc:
            log.info("%s", exc)
        except ModelLoadError as exc:
            serving = self.target.engine.default_model is not None
            note = "; the previous model keeps serving" if serving else ""
            log.error("%s%s", exc, note)
            if self.last is not None and self.last.model_loading:
                self.last = self.last.model_copy(
                    update={"ok": False, "error": f"{exc}{note}", "model_loading": False}
                )
        else:
            if self.last is not None and self.last.model_loading:
                self.last = self.last.model_copy(update={"model_loading": False})
        finally:
            self.model_loading = None

    def begin_model_load(self, load: Coroutine[Any, Any, None]) -> None:
        """Run a model load that later reloads wait for (the daemon's first load at start).

        Without this a reload during the first load would start a second, concurrent load
        of the same files, and one of the two copies would never be freed.
        """
        self._model_task = asyncio.create_task(load)

    async def wait_model_loaded(self) -> None:
        if self._model_task is not None:
            await asyncio.wait([self._model_task])


async def watch_config(
    path: Path, on_change: Callable[[], Awaitable[object]], stop: asyncio.Event
) -> None:
    """Call `on_change` whenever `path` is written, replaced by a rename, or recreated.

    The directory is watched, not the file: editors save by writing a temporary file and
    renaming it over the old one, which a watch on the file itself would lose.
    """
    from watchfiles import awatch  # deferred: only the daemon needs it

    # watchfiles logs every filtered event at debug: with the log file in the config's
    # directory, each log line would be another event.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

    directory, name = path.parent, path.name

    def relevant(_change: object, changed: str) -> bool:
        return os.path.basename(changed) == name

    while not stop.is_set():
        if not directory.is_dir():
            await _sleep_or_stop(stop, 2.0)
            continue
        try:
            async for _changes in awatch(
                directory,
                watch_filter=relevant,
                recursive=False,
                stop_event=stop,
                debounce=1000,
                step=50,
            ):
                if not path.exists():
                    log.warning("config file %s was removed; the running config stays", path)
                    continue
                await on_change()
        except (OSError, RuntimeError) as exc:
            log.warning("watching %s failed (%s); retrying", directory, exc)
            await _sleep_or_stop(stop, 1.0)


async def watch_model_files(reloader: Reloader, stop: asyncio.Event) -> None:
    """While no model could be loaded, retry once the model file appears or changes.

    A file must look the same on two polls in a row first: a model still being copied
    would otherwise be loaded (and fail) once a second.
    """
    engine = reloader.target.engine
    previous: tuple[float, int] | None = None
    attempted: tuple[float, int] | None = None
    while not stop.is_set():
        await _sleep_or_stop(stop, 1.0)
        if engine.state != "error" or reloader.target.config_error is not None:
            previous = attempted = None
            continue
        path = default_model_path(reloader.target.config)
        try:
            info = path.stat() if path is not None else None
        except OSError:
            info = None
        seen = (info.st_mtime, info.st_size) if info is not None else None
        stable = seen is not None and seen == previous
        previous = seen
        if stable and seen != attempted:
            attempted = seen
            log.info("model file %s changed; loading it", path)
            await reloader.reload("model")


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
