"""`pensievectl start` and `stop`: bring the daemon up or down and wait until it is so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pensieve.client import NoAnswerError, SocketPermissionError
from pensieve.exitcodes import DaemonExit
from pensieve.paths import log_dir
from pensieve.runrecord import LockTimeoutError, RunRecord, read_record, start_lock
from pensieve.sockets import probe
from pensievectl.context import CommandContext
from pensievectl.errors import CtlError, StartError, StopError
from pensievectl.service import Supervisor
from pensievectl.status import examine_dead, human_bytes, human_duration

if TYPE_CHECKING:
    from pensieve.wire import StatusResponse

SupervisorFinder = Callable[[], Supervisor | None]


def default_log_path() -> Path:
    return log_dir() / "pensieved.log"


def _daemon_command(ctx: CommandContext) -> list[str]:
    argv = [sys.executable, "-m", "pensieved"]
    if ctx.config_arg:
        argv += ["--config", str(ctx.config_path)]
    if ctx.socket_arg:
        argv += ["--socket", str(Path(ctx.socket_arg).expanduser().absolute())]
    return argv


def spawn_daemon(ctx: CommandContext, log_path: Path) -> subprocess.Popen[bytes]:
    """Run pensieved detached: its own session, no terminal, output appended to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("ab") as log:
        return subprocess.Popen(
            _daemon_command(ctx),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env=env,
        )


class _Progress:
    """One line that updates in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, ctx: CommandContext) -> None:
        self.ctx = ctx
        self.tty = ctx.err.isatty()
        self.last_print = 0.0
        self.dirty = False

    def show(self, message: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.ctx.err.write(f"\r\033[K{message}")
            self.ctx.err.flush()
            self.dirty = True
        elif force or now - self.last_print >= 5:
            self.ctx.note(message)
            self.last_print = now

    def done(self) -> None:
        if self.dirty:
            self.ctx.err.write("\r\033[K")
            self.ctx.err.flush()
            self.dirty = False


def _loading_message(status: StatusResponse, started: float) -> str:
    path = status.model_loading
    elapsed = human_duration(time.monotonic() - started)
    if not path:
        return f"pensieved is starting... {elapsed}"
    try:
        size = f" ({human_bytes(Path(path).stat().st_size)})"
    except OSError:
        size = ""
    return f"loading model {Path(path).name}{size}... {elapsed}"


def _spawned_death(
    ctx: CommandContext,
    process: subprocess.Popen[bytes],
    log_path: Path | None,
    log_offset: int,
    spawned_at: float,
) -> str:
    """What `start` can say about a daemon it spawned that died before it was ready."""
    record = read_record(ctx.config_path)
    if record is None or record.pid != process.pid:
        # It died before it wrote its record: what we know is our own.
        record = RunRecord(
            pid=process.pid,
            config_path=str(ctx.config_path.resolve()),
            socket_path=str(ctx.socket_path),
            started_at=spawned_at,
            version="",
            log_path=str(log_path) if log_path else None,
            log_offset=log_offset,
        )
    return examine_dead(record, exit_status=process.returncode).describe()


def wait_until_serving(
    ctx: CommandContext,
    *,
    timeout: float,
    process: subprocess.Popen[bytes] | None,
    log_path: Path | None,
    describe_log: str,
    log_offset: int = 0,
) -> StatusResponse:
    """Poll the control socket until the model is loaded; raise StartError with the reason."""
    client = ctx.client(timeout=5.0)
    progress = _Progress(ctx)
    began = time.time()
    started = time.monotonic()
    deadline = started + timeout
    progress.show(f"starting pensieved (socket {ctx.socket_path})...", force=True)
    try:
        while True:
            if process is not None and process.poll() is not None:
                if process.returncode == DaemonExit.ALREADY_RUNNING:
                    # Another daemon took this socket or config first: wait for that one.
                    process = None
                    ctx.relocate()
                    client = ctx.client(timeout=5.0)
                    continue
                raise StartError(
                    "pensieved did not come up:\n"
                    f"{_spawned_death(ctx, process, log_path, log_offset, began)}"
                    f"\n(log: {describe_log})"
                )
            status: StatusResponse | None = None
            if probe(ctx.socket_path) == "live":
                try:
                    status = client.status()
                except (NoAnswerError, CtlError):
                    status = None
            if status is not None:
                if status.state == "ready":
                    return status
                if status.state in ("error", "no_model") and not status.model_loading:
                    raise StartError(
                        f"pensieved is running (pid {status.pid}) but cannot serve: "
                        f"{status.error}\nIt stays up answering 503 and recovers by itself "
                        "once the config or model file is fixed; `pensievectl stop` stops it. "
                        f"(log: {describe_log})"
                    )
                progress.show(_loading_message(status, started))
            else:
                progress.show(f"waiting for pensieved's socket {ctx.socket_path}...")
            if time.monotonic() > deadline:
                where = f"pid {process.pid}" if process is not None else "the service"
                raise StartError(
                    f"pensieved ({where}) did not come up within {timeout:g} s; it may still be "
                    f"loading a large model: check `pensievectl status` and the log "
                    f"({describe_log})"
                )
            time.sleep(0.1)
    finally:
        progress.done()


def _ready_message(status: StatusResponse) -> str:
    model = status.model.name if status.model else "no model"
    return (
        f"pensieved is running (pid {status.pid}) on {status.http.url} "
        f"with {model}; socket {status.socket_path}"
    )


def run_start(
    ctx: CommandContext,
    *,
    timeout: float,
    log_file: str | None,
    find_supervisor: SupervisorFinder,
) -> int:
    def waiting() -> None:
        ctx.note(f"another `pensievectl start` for {ctx.config_path} is under way; waiting for it")

    # One start at a time per config file: the second finds the first's daemon running.
    try:
        with start_lock(ctx.config_path, timeout, on_wait=waiting):
            return _start_locked(
                ctx, timeout=timeout, log_file=log_file, find_supervisor=find_supervisor
            )
    except LockTimeoutError:
        raise StartError(
            f"another `pensievectl start` for {ctx.config_path} did not finish within "
            f"{timeout:g} s; check `pensievectl status`"
        ) from None


def _start_locked(
    ctx: CommandContext,
    *,
    timeout: float,
    log_file: str | None,
    find_supervisor: SupervisorFinder,
) -> int:
    location = ctx.relocate()
    state = probe(location.socket_path)
    if state == "live":
        status = ctx.client().status()
        if status.state == "loading":
            status = wait_until_serving(
                ctx, timeout=timeout, process=None, log_path=None, describe_log="its log"
            )
        ctx.say(f"pensieved is already running (pid {status.pid}) on {status.http.url}")
        return 0
    if state == "denied":
        raise SocketPermissionError(
            f"permission denied on {ctx.socket_path}: it is not your socket; use your own "
            "(--socket PATH or server.socket_path)"
        )
    if location.orphan is not None:
        raise StartError(
            f"pensieved (pid {location.orphan.pid}) already runs for {ctx.config_path}, but its "
            f"control socket {location.orphan.socket_path} is gone, so it cannot be "
            f"controlled; stop it with `kill {location.orphan.pid}`, then start again"
        )
    if location.dead is not None:
        ctx.note(examine_dead(location.dead).describe())
        ctx.note("starting a new one")
    supervisor = find_supervisor()
    if supervisor is not None:
        ctx.note(f"starting pensieved through {supervisor.name}")
        supervisor.start()
        status = wait_until_serving(
            ctx,
            timeout=timeout,
            process=None,
            log_path=None,
            describe_log=f"the log configured for {supervisor.name}",
        )
    else:
        log_path = Path(log_file).expanduser().absolute() if log_file else default_log_path()
        try:
            log_offset = log_path.stat().st_size
        except OSError:
            log_offset = 0
        process = spawn_daemon(ctx, log_path)
        status = wait_until_serving(
            ctx,
            timeout=timeout,
            process=process,
            log_path=log_path,
            describe_log=str(log_path),
            log_offset=log_offset,
        )
        ctx.note(f"log: {log_path}")
    ctx.say(_ready_message(status))
    return 0


def _process_gone(pid: int) -> bool:
    import psutil  # deferred: only `stop` needs it

    try:
        # Reparented to an init that does not reap: a zombie has exited all the same.
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_stop(
    ctx: CommandContext, *, timeout: float | None, find_supervisor: SupervisorFinder
) -> int:
    supervisor = find_supervisor()
    if supervisor is not None and supervisor.restarts_clean_exit and supervisor.is_loaded():
        # A plain exit would be restarted at once: stop it through its supervisor.
        ctx.note(f"stopping pensieved through {supervisor.name} (`{supervisor.stop_command()}`)")
        pid = _pid_if_running(ctx)
        supervisor.stop()
        if pid is not None:
            _wait_gone(ctx, pid, timeout or 40.0)
        ctx.say(
            f"pensieved stopped; {supervisor.name} will not restart it until `pensievectl start`"
        )
        return 0
    state = probe(ctx.socket_path)
    location = ctx.location
    if state in ("absent", "stale") and location.orphan is not None:
        raise StopError(
            f"pensieved (pid {location.orphan.pid}) runs for {ctx.config_path} but its control "
            f"socket {location.orphan.socket_path} is gone: stop it with `kill "
            f"{location.orphan.pid}`"
        )
    if state in ("absent", "stale") and location.dead is not None:
        ctx.note(
            f"the last pensieved for {ctx.config_path} (pid {location.dead.pid}) "
            f"{examine_dead(location.dead).cause}; `pensievectl status` tells more"
        )
    if state == "absent":
        ctx.say(f"pensieved is not running (no socket at {ctx.socket_path})")
        return 0
    if state == "stale":
        ctx.say(
            f"pensieved is not running (stale socket at {ctx.socket_path}, left by a daemon "
            "that was killed; `pensievectl start` removes it)"
        )
        return 0
    reply = ctx.client().stop()
    pid = reply.pid
    wait = timeout if timeout is not None else reply.drain_timeout_ms / 1000 + 10
    ctx.note(f"stopping pensieved (pid {pid}): in-flight requests may finish")
    _wait_gone(ctx, pid, wait)
    ctx.say(f"pensieved stopped (pid {pid})")
    return 0


def _pid_if_running(ctx: CommandContext) -> int | None:
    try:
        return ctx.client(timeout=3.0).status().pid
    except CtlError:
        return None


def _wait_gone(ctx: CommandContext, pid: int, timeout: float) -> None:
    # Not psutil.wait_procs: for a process that is not our child it waits while the pid exists,
    # and a zombie left to an init that does not reap (a container's) exists until the timeout.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_gone(pid) and probe(ctx.socket_path) != "live":
            return
        time.sleep(0.05)
    raise StopError(
        f"pensieved (pid {pid}) is still running {timeout:g} s after it was asked to stop "
        f"(socket {ctx.socket_path}); see its log, or end it with `kill {pid}`"
    )
