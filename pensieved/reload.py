"""Hot reload: watch the config file, validate it with the one validator, apply the difference.

What a change needs decides how it is applied (`plan_changes`):
- most keys (logging, limits, timeouts, CORS, aliases among loaded models) apply at once;
- host/port bind the new listener before the old one closes, so no request is refused;
- model keys load the new model in the background while the old one keeps serving, then
  `Engine.configure` swaps them; requests in flight finish on the model they started with;
- `server.socket_path` applies at the next start (clients would lose the daemon otherwise).
An invalid file changes nothing: the running config stays and the error shows in `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pensieve.config import (
    Config,
    apply_overrides,
    diff_configs,
    parse_config,
    read_config_data,
)
from pensieve.wire import Change, ChangeAction, ReloadResult
from pensieved.engine.service import Engine, model_load_key
from pensieved.errors import LoadCancelledError, ModelLoadError

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
        "model.kv_cache_type",
        "model.kv_unified",
        "model.swa_full",
        "model.flash_attention",
        "model.memory_budget_mb",
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


@dataclass
class Plan:
    """What a new config needs; the daemon applies it (`Daemon.apply`)."""

    config: Config
    changes: list[Change] = field(default_factory=list)
    rebind: bool = False
    model_load: bool = False
    logging: bool = False
    # The file's decoded JSON, saved as the last good config once the plan is in force.
    file_data: Any = None


def plan_changes(running: Config, new: Config, engine_config: Config, engine_ok: bool) -> Plan:
    """How to go from `running` to `new`.

    `engine_config`/`engine_ok` describe the models actually loaded: a model that failed to
    load is retried even when the file did not change, and an alias that points at a file not
    loaded yet needs a load although aliases alone are live.
    """
    plan = Plan(new)
    for key, (old, value) in diff_configs(running, new).items():
        plan.changes.append(Change(key=key, old=old, new=value, action=action_for(key)))
    keys = {c.key for c in plan.changes}
    plan.rebind = bool(keys & _REBIND_KEYS)
    plan.logging = any(k.startswith("logging.") for k in keys)
    plan.model_load = not engine_ok or model_load_key(engine_config) != model_load_key(new)
    return plan


class Reloader:
    """Reads and plans config changes, one at a time, and keeps the record of the last one
    and of the model load it started."""

    def __init__(
        self, engine: Engine, config_path: Path, overrides: dict[str, object], *, missing_ok: bool
    ) -> None:
        self.engine = engine
        self.config_path = config_path
        self.overrides = overrides
        self.missing_ok = missing_ok
        self.last: ReloadResult | None = None
        self.model_loading: str | None = None
        self.lock = asyncio.Lock()
        self._model_task: asyncio.Task[None] | None = None

    def read(self, path: Path | None = None) -> Config:
        """The config a file describes, with the daemon's flags on top (flags win)."""
        return self._read(path)[0]

    def _read(self, path: Path | None = None) -> tuple[Config, Any]:
        """`read`, and the file's decoded JSON."""
        where = path or self.config_path
        data = read_config_data(where, missing_ok=path is None and self.missing_ok)
        config = parse_config(data, source=str(where))
        return (apply_overrides(config, self.overrides) if self.overrides else config), data

    async def next_plan(self, running: Config) -> Plan:
        """The plan from `running` to the file's config; raises ConfigError.

        Call it holding `lock`. One model load at a time: a change that arrives during a load
        is planned after it, against what actually got loaded.
        """
        new, data = self._read()
        if self._model_task is not None and not self._model_task.done():
            await asyncio.wait([self._model_task])
        plan = self.plan(running, new)
        plan.file_data = data
        return plan

    def plan(self, running: Config, new: Config) -> Plan:
        engine = self.engine
        return plan_changes(running, new, engine.config, engine.state in ("ready", "no_model"))

    def begin_model_load(self, load: Coroutine[Any, Any, None], model: str | None) -> None:
        """Run a model load that later reloads wait for; `model` names it in `status` while
        it runs (None: the first load at start, which `status` shows otherwise).

        Without this a reload during the first load would start a second, concurrent load
        of the same files, and one of the two copies would never be freed.
        """
        self.model_loading = model
        self._model_task = asyncio.create_task(self._track_load(load))

    async def _track_load(self, load: Coroutine[Any, Any, None]) -> None:
        try:
            await load
        except LoadCancelledError as exc:
            log.info("%s", exc)
        except ModelLoadError as exc:
            serving = self.engine.default_model is not None
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


async def watch_model_files(
    waiting_for: Callable[[], Path | None],
    on_change: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
) -> None:
    """Call `on_change` once the model file `waiting_for()` names appears or changes (None:
    nothing to wait for, as while a model is loaded); a file that failed is retried once.

    The file must then look the same for a second: a model still being copied would
    otherwise be loaded (and fail) once a second.
    """
    from watchfiles import awatch  # deferred: only the daemon needs it

    attempted: tuple[float, int] | None = None
    while not stop.is_set():
        path = waiting_for()
        if path is None or not path.parent.is_dir():
            attempted = attempted if path else None
            await _sleep_or_stop(stop, 1.0)
            continue
        # Woken by a change, or every few seconds to follow what `waiting_for` names.
        async for _changes in awatch(
            path.parent,
            watch_filter=_named(path.name),
            recursive=False,
            stop_event=stop,
            rust_timeout=5000,
            yield_on_timeout=True,
        ):
            break
        seen = await _settled(path, stop)
        if seen is not None and seen != attempted and waiting_for() == path:
            attempted = seen
            log.info("model file %s changed; loading it", path)
            await on_change()


def _named(name: str) -> Callable[[object, str], bool]:
    return lambda _change, changed: os.path.basename(changed) == name


def _identity(path: Path) -> tuple[float, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime, info.st_size


async def _settled(path: Path, stop: asyncio.Event) -> tuple[float, int] | None:
    """`path`'s identity once it has stayed the same for a second (None: no such file)."""
    seen = _identity(path)
    while seen is not None and not stop.is_set():
        await _sleep_or_stop(stop, 1.0)
        now = _identity(path)
        if now == seen:
            break
        seen = now
    return seen


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
