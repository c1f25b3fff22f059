"""pensieved's process lifecycle: start, serve, drain on a signal, exit.

The daemon never forks: launchd, systemd or `pensievectl start` supervise it. Neither a broken
config file nor a model that fails to load stops the process: it answers on the control
socket, serves 503s that say why, and recovers by itself when the file is fixed, so a
supervisor with KeepAlive does not crash-loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tornado.httpserver

from pensieve import __version__
from pensieve.activity import Activity, read_activity
from pensieve.config import (
    Config,
    ConfigError,
    apply_overrides,
    parse_config,
    read_config_data,
)
from pensieve.config import api_key as configured_api_key
from pensieve.exitcodes import DaemonExit
from pensieve.partial import Salvaged, salvage_config
from pensieve.paths import default_config_path
from pensieve.postmortem import Death, examine
from pensieve.runrecord import (
    RecordDirError,
    RunRecord,
    activity_path,
    pid_alive,
    read_last_good,
    read_record,
    remove_record,
    socket_is_ours,
    write_last_good,
    write_record,
)
from pensieve.sockets import (
    BoundSocket,
    SocketInUseError,
    SocketPathError,
    bind_control_socket,
    probe,
    resolve_socket_path,
)
from pensieve.wire import (
    ConfigResponse,
    ConfigSource,
    HttpStatus,
    Issue,
    ModelActionResponse,
    ModelsResponse,
    PreviousExit,
    ProcessStatus,
    ReloadResult,
    RequestStatus,
    StatusResponse,
    StopResponse,
    UpstreamStatus,
    ValidateResponse,
    WorkItem,
)
from pensieved.api.app import make_app
from pensieved.cli import build_parser, overrides_from
from pensieved.control.server import make_control_app
from pensieved.crashlog import enable_faulthandler, stderr_log, supervisor_from_environment
from pensieved.engine.service import Engine, default_model_path
from pensieved.listeners import ListenError, Listeners
from pensieved.logsetup import configure_logging
from pensieved.reload import Plan, Reloader, watch_config, watch_model_files
from pensieved.upstream.pool import Upstreams

log = logging.getLogger("pensieved")


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: Path,
        overrides: dict[str, object],
        *,
        control: BoundSocket,
        missing_ok: bool = False,
        config_error: str | None = None,
        salvaged: Salvaged | None = None,
        activity: Activity | None = None,
        previous_exit: Death | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.control = control
        self.config_error = config_error
        # The file was invalid at start: where each section in force came from, until a
        # reload puts a valid file in force.
        self.salvaged = salvaged
        self.activity = activity or Activity()
        self.previous_exit = previous_exit
        # A model load still inside llama.cpp when the drain ended: main() exits without
        # waiting for it (see _drain).
        self.abandoned_load = False
        self.engine = Engine(config, self.activity)
        self.reloader = Reloader(self.engine, config_path, overrides, missing_ok=missing_ok)
        # Upstream routes follow the config in force at once (a reload's model load does
        # not hold them back).
        self.upstreams = Upstreams(lambda: self.config)
        self.upstreams.register_metrics(self.engine.metrics.registry)
        self.listeners = Listeners(make_app(self.engine, self.upstreams))
        if config_error is not None:
            self._degrade()
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the baseline

    def _degrade(self) -> None:
        """Serve 503s that say why until the file is fixed (the watcher notices), and what is
        in force meanwhile: where the clients should look."""
        note = ""
        if self.salvaged is not None:
            address = self.listeners.address()
            host, port = address or (self.config.server.host, self.config.server.port)
            note = f"\nin force meanwhile, HTTP on {host}:{port}: {self.salvaged.describe()}"
        fix = "fix the file: pensieved reloads it by itself"
        self.engine.degrade(f"{self.config_error}{note}\n{fix}")

    def _sources(self) -> list[ConfigSource]:
        if self.salvaged is None:
            return []
        return [
            ConfigSource(section=s.section, source=s.origin, reason=s.reason())
            for s in self.salvaged.sources
        ]

    # ---- control operations -----------------------------------------------------------------

    def status(self) -> StatusResponse:
        engine = self.engine.status()
        stats = self.engine.stats
        with self._process.oneshot():
            times = self._process.cpu_times()
            process = ProcessStatus(
                rss_bytes=self._process.memory_info().rss,
                cpu_percent=self._process.cpu_percent(None),
                cpu_time_s=times.user + times.system,
                threads=self._process.num_threads(),
            )
        address = self.listeners.address()
        url = None
        if address is not None:
            host = address[0]
            url = f"http://{f'[{host}]' if ':' in host else host}:{address[1]}"
        http_error = self.listeners.error
        error = engine.error
        if http_error:
            error = f"{error}; {http_error}" if error else http_error
        return StatusResponse(
            pid=os.getpid(),
            version=__version__,
            started_at=self.started_at,
            uptime_s=time.time() - self.started_at,
            state=engine.state,
            error=error,
            config_file=str(self.config_path),
            config_error=self.config_error,
            config_sources=self._sources(),
            socket_path=str(self.control.path),
            log_file=self.config.logging.file,
            http=HttpStatus(
                host=self.config.server.host,
                port=address[1] if address else self.config.server.port,
                url=url,
                error=http_error,
            ),
            model=engine.model,
            model_loading=self.reloader.model_loading
            or (self._boot_model() if engine.state == "loading" else None),
            aliases=engine.aliases,
            process=process,
            requests=RequestStatus(
                served=stats.requests_served,
                in_flight=stats.in_flight,
                running=self.engine.running,
                queued=self.engine.queued,
                tokens_generated=stats.tokens_generated,
                prompt_tokens=stats.prompt_tokens,
                cache_read_tokens=stats.cache_read_tokens,
            ),
            last_reload=self.reloader.last,
            activity=[WorkItem(**item) for item in self.activity.snapshot()],
            previous_exit=PreviousExit(**self.previous_exit.to_dict())
            if self.previous_exit is not None
            else None,
            upstreams=[UpstreamStatus.model_validate(u) for u in self.upstreams.status()],
            models=engine.models,
        )

    def models(self) -> ModelsResponse:
        engine = self.engine.status()
        model = self.engine.config.model
        return ModelsResponse(
            models=engine.models,
            aliases=engine.aliases,
            idle_unload_s=model.idle_unload_s,
            max_loaded_models=model.max_loaded_models,
        )

    async def model_action(self, action: str, name: str) -> ModelActionResponse:
        """Load or unload the model `name` denotes (PensieveError when none does)."""
        started = time.monotonic()
        if action == "load":
            entry = await self.engine.load_model(name)
        else:
            entry = await self.engine.unload_model(name)
        status = next(m for m in self.engine.models_status() if m.path == str(entry.path))
        return ModelActionResponse(
            action="load" if action == "load" else "unload",
            model=status,
            seconds=time.monotonic() - started,
        )

    def running_config(self) -> ConfigResponse:
        return ConfigResponse(
            config_file=str(self.config_path),
            values=self.config.model_dump(mode="json"),
            flags=sorted(self.overrides),
            config_error=self.config_error,
            config_sources=self._sources(),
            api_key=self._api_key(),
        )

    def _api_key(self) -> str | None:
        try:
            return configured_api_key(self.config)
        except ConfigError:
            return None  # an unreadable key file: pensievectl reads it to say why

    def _boot_model(self) -> str | None:
        path = default_model_path(self.config)
        return str(path) if path else None

    def stop_soon(self) -> StopResponse:
        # After this reply is written: the drain keeps the control socket open until the end.
        asyncio.get_running_loop().call_soon(self.request_stop)
        return StopResponse(pid=os.getpid(), drain_timeout_ms=self.config.server.drain_timeout_ms)

    async def reload(self, trigger: str) -> ReloadResult:
        async with self.reloader.lock:
            try:
                plan = await self.reloader.next_plan(self.config)
            except ConfigError as exc:
                log.error("config not reloaded, the running config stays: %s", exc)
                self.config_error = str(exc)
                if self.salvaged is not None and self.engine.state == "error":
                    self._degrade()  # the 503s name the file's problems of now
                result = ReloadResult(time=time.time(), trigger=trigger, ok=False, error=str(exc))
            else:
                result = self.apply(plan, trigger)
        self.reloader.last = result
        return result

    def apply(self, plan: Plan, trigger: str) -> ReloadResult:
        """Put a reload plan in force: listeners, logging, limits, then the models."""
        now, new = time.time(), plan.config
        # Also when nothing listens: a degraded start may have found its address busy.
        if plan.rebind or not self.listeners.listening:
            try:
                self.listeners.rebind(new)
            except ListenError as exc:
                log.error("config not reloaded, the running config stays: %s", exc)
                return ReloadResult(
                    time=now, trigger=trigger, ok=False, error=str(exc), changes=plan.changes
                )
        if plan.logging:
            configure_logging(new.logging)
        self.listeners.update_limits(new)
        if plan.model_load:
            # Everything but the models applies now; the models follow when loaded.
            self.engine.apply_live_settings(
                new.model_copy(update={"model": self.engine.config.model})
            )
            model = str(default_model_path(new) or "")
            self.reloader.begin_model_load(self.engine.load(new), model)
        else:
            self.engine.apply_live_settings(new)
            self.engine.drop_stale_error()
        self.config, self.config_error, self.salvaged = new, None, None
        save_last_good(self.config_path, plan.file_data)
        for change in plan.changes:
            log.info("config %s: %r -> %r (%s)", change.key, change.old, change.new, change.action)
        if not plan.changes and not plan.model_load:
            log.info("config reloaded (%s): nothing changed", trigger)
        return ReloadResult(
            time=now, trigger=trigger, ok=True, changes=plan.changes, model_loading=plan.model_load
        )

    def validate(self, path: str) -> ValidateResponse:
        try:
            new = self.reloader.read(Path(path).expanduser())
        except ConfigError as exc:
            issues = [Issue(path=i.path, message=i.message) for i in exc.issues]
            return ValidateResponse(valid=False, source=exc.source, issues=issues)
        changes = self.reloader.plan(self.config, new).changes
        return ValidateResponse(valid=True, source=path, changes=changes)

    # ---- run --------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _first_load(self) -> None:
        await self.engine.load(self.config)
        if self.engine.state == "no_model":
            log.warning("no model configured and the bundled model is not installed")

    def _model_awaited(self) -> Path | None:
        """The model file to load once it appears: only while none could be loaded."""
        if self.engine.state != "error" or self.config_error is not None:
            return None
        return default_model_path(self.config)

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: draining in-flight requests")
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        control = tornado.httpserver.HTTPServer(make_control_app(self))
        control.add_socket(self.control.sock)
        log.info("control socket: %s", self.control.path)
        self.listeners.start(self.config, tolerate_failure=self.config_error is not None)
        if self.config_error is not None:
            self._degrade()  # now with the address bound
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("sighup")))
        if self.config_error is None:
            self.reloader.begin_model_load(self._first_load(), None)
        self._spawn(watch_config(self.config_path, lambda: self.reload("watch"), self._stop))
        self._spawn(
            watch_model_files(self._model_awaited, lambda: self.reload("model"), self._stop)
        )
        self._spawn(self.engine.unload_idle(self._stop))
        await self._stop.wait()
        # A model load may take minutes: it is abandoned at once rather than waited for.
        self.engine.cancel_loads()
        for task in list(self._tasks):
            task.cancel()
        await self._drain()
        control.stop()
        return DaemonExit.OK

    def _in_flight(self) -> int:
        return self.engine.stats.in_flight + self.upstreams.in_flight

    async def _drain(self) -> None:
        self.listeners.stop_accepting()
        self.engine.start_draining()
        deadline = time.monotonic() + self.config.server.drain_timeout_ms / 1000
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.stats.in_flight:
            log.warning("drain timeout: ending %d request(s) early", self.engine.stats.in_flight)
            self.engine.abort_all()
            end = time.monotonic() + 5
            while self.engine.stats.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.05)
        await self.listeners.close_connections()
        # Loads see the cancellation at llama.cpp's next progress call, within milliseconds;
        # one stuck elsewhere (creating the context) is left behind: main() exits without it.
        if not await self.engine.wait_loads(2.0):
            log.warning("a model load is still running in llama.cpp; exiting without it")
            self.abandoned_load = True
        await self.engine.close()
        log.info("stopped")


@dataclass(frozen=True)
class StartupConfig:
    config: Config  # flags applied
    error: str | None = None  # the file is invalid: why
    salvaged: Salvaged | None = None  # then: where each section in force came from


def load_startup_config(
    path: Path, missing_ok: bool, overrides: dict[str, object]
) -> StartupConfig:
    """The file's config with the flags on top; if the file is invalid, what of it can be used
    (`pensieve.partial`), with the last good config's server section standing in for an
    invalid one. Raises ConfigError only when the flags do not fit that config."""
    data = None
    try:
        data = read_config_data(path, missing_ok=missing_ok)
        config = parse_config(data, source=str(path))
    except ConfigError as exc:
        salvaged = salvage_config(data, read_last_good(path))
        config = apply_overrides(salvaged.config, overrides) if overrides else salvaged.config
        return StartupConfig(config, str(exc), salvaged)
    save_last_good(path, data)
    return StartupConfig(apply_overrides(config, overrides) if overrides else config)


def save_last_good(config_path: Path, data: object) -> None:
    """Keep the data of a config file that validated, for a start on a broken file (best
    effort: without it such a start uses the defaults)."""
    try:
        write_last_good(config_path, data)
    except (OSError, RecordDirError) as exc:
        log.warning("cannot save the last good config (%s)", exc)


def config_location(config_arg: str | None) -> tuple[Path, bool]:
    """The config file, and whether it may be absent (only the implicit default may)."""
    path = Path(config_arg).expanduser() if config_arg else default_config_path()
    return path, config_arg is None and path == default_config_path()


def _predecessor(
    config_path: Path, log_file: str | None, log_offset: int
) -> tuple[RunRecord | None, Death | None]:
    """The daemon recorded for this config file: alive (then we must not start), or dead
    without a clean exit (then what is known about its death)."""
    record = read_record(config_path)
    if record is None or record.pid == os.getpid():
        return None, None
    if pid_alive(record.pid):
        socket_path = Path(record.socket_path)
        if socket_is_ours(socket_path) and probe(socket_path) == "live":
            return record, None
        return None, None  # its pid now belongs to another process: a stale record
    log_end = log_offset if record.log_path and record.log_path == log_file else None
    death = examine(record, read_activity(activity_path(config_path)), log_end=log_end)
    return None, death


def _record_run(
    config_path: Path, socket_path: Path, log_file: str | None, log_offset: int
) -> Activity:
    """Write this daemon's run record and open its activity file (best effort)."""
    activity = Activity()
    try:
        write_record(  # creates the private directory the activity file goes to
            RunRecord(
                pid=os.getpid(),
                config_path=str(config_path),
                socket_path=str(socket_path.absolute()),
                started_at=time.time(),
                version=__version__,
                log_path=log_file,
                log_offset=log_offset,
                supervisor=supervisor_from_environment(),
            )
        )
    except (OSError, RecordDirError) as exc:
        log.warning(
            "cannot write the run record (%s): pensievectl finds this daemon only through "
            "the config file's server.socket_path",
            exc,
        )
        return activity
    try:
        activity.open(activity_path(config_path))
    except OSError as exc:
        log.warning("cannot keep the activity file (%s): a crash will not name its requests", exc)
    return activity


def main(argv: list[str] | None = None) -> int:
    # Before anything else: what our log file is, and how long it was before our lines.
    log_file, log_offset = stderr_log()
    enable_faulthandler()
    args = build_parser().parse_args(argv)
    overrides = overrides_from(args)
    path, missing_ok = config_location(args.config)
    try:
        # Flags are checked alone first: a wrong flag is fatal, a wrong file only degrades.
        if overrides:
            apply_overrides(Config(), overrides)
        startup = load_startup_config(path, missing_ok, overrides)
    except ConfigError as exc:
        print(f"pensieved: {exc}", file=sys.stderr)
        return DaemonExit.CONFIG
    config, config_error = startup.config, startup.error
    configure_logging(config.logging)
    crash_reports = enable_faulthandler(config.logging.file)
    log.info("config: %s", path)
    log.debug("fatal-signal reports (faulthandler) go to %s", crash_reports)
    if startup.salvaged is not None:
        log.error("%s", config_error)
        log.error(
            "running degraded (HTTP answers 503) until %s is fixed; in force meanwhile: %s",
            path,
            startup.salvaged.describe(),
        )
    resolved = path.resolve()
    running, death = _predecessor(resolved, log_file, log_offset)
    if running is not None:
        log.error(
            "another pensieved (pid %d) is already running for %s, on %s: use `pensievectl "
            "status` to see it, or `pensievectl stop` to stop it first",
            running.pid,
            path,
            running.socket_path,
        )
        return DaemonExit.ALREADY_RUNNING
    if death is not None:
        log.warning(
            "the previous pensieved for this config did not exit cleanly: %s (`pensievectl "
            "status` shows its last log lines)",
            death.summary(),
        )
    socket_path = resolve_socket_path(config.server.socket_path, path)
    try:
        control = bind_control_socket(socket_path)
    except SocketInUseError as exc:
        log.error("%s", exc)
        return DaemonExit.ALREADY_RUNNING
    except SocketPathError as exc:
        log.error("%s", exc)
        return DaemonExit.SOCKET
    activity = _record_run(resolved, socket_path, log_file, log_offset)
    daemon: Daemon | None = None
    try:
        daemon = Daemon(
            config,
            path,
            overrides,
            control=control,
            missing_ok=missing_ok,
            config_error=config_error,
            salvaged=startup.salvaged,
            activity=activity,
            previous_exit=death,
        )
        code = asyncio.run(daemon.run())
    except ListenError as exc:
        log.error("%s", exc)
        code = DaemonExit.LISTEN
    finally:
        control.remove()
        remove_record(resolved, os.getpid())
        activity.close(remove=True)
    if daemon is not None and daemon.abandoned_load:
        # Interpreter shutdown would wait for (or run C++ destructors under) the load
        # thread still inside llama.cpp: leave at once, everything else is already closed.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
