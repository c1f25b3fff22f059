"""pensieved's process lifecycle: start, serve, drain on a signal, exit.

The daemon never forks: launchd, systemd or `pensievectl start` supervise it. A model that
fails to load does not stop the process: it serves 503s that say why until a config change
fixes it, so a supervisor with KeepAlive does not crash-loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import tornado.httpserver
import tornado.netutil

from pensieved import __version__
from pensieved.api.app import make_app
from pensieved.cli import build_parser, overrides_from
from pensieved.config import Config, apply_overrides, load_config_file
from pensieved.engine.service import Engine
from pensieved.errors import ConfigError, ModelLoadError
from pensieved.logsetup import configure_logging
from pensieved.paths import default_config_path

log = logging.getLogger("pensieved")


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    CONFIG = 2  # the config (or a flag) is invalid at start
    ALREADY_RUNNING = 3  # another daemon owns the control socket
    LISTEN = 4  # the HTTP address cannot be bound


class ListenError(Exception):
    pass


def bind_http(config: Config) -> list[socket.socket]:
    host, port = config.server.host, config.server.port
    try:
        return tornado.netutil.bind_sockets(port, host)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another server may be "
            "using the port: stop it or set server.port (or --port) to a free one"
        ) from exc


class Daemon:
    def __init__(self, config: Config, config_path: Path, overrides: dict[str, object]) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.engine = Engine(config)
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._http: tornado.httpserver.HTTPServer | None = None
        self.http_sockets: list[socket.socket] = []

    # ---- start ------------------------------------------------------------------------------

    def _start_http(self, config: Config) -> None:
        sockets = bind_http(config)
        server = tornado.httpserver.HTTPServer(
            make_app(self.engine),
            idle_connection_timeout=config.server.idle_connection_timeout_s,
            body_timeout=config.server.idle_connection_timeout_s,
            max_body_size=config.server.max_body_bytes,
            max_buffer_size=config.server.max_body_bytes,
            xheaders=False,
        )
        server.add_sockets(sockets)
        self._http, self.http_sockets = server, sockets
        address = sockets[0].getsockname()
        log.info("pensieved %s listening on http://%s:%d", __version__, address[0], address[1])

    async def _load_models(self, config: Config) -> None:
        try:
            await self.engine.load(config)
        except ModelLoadError as exc:
            log.error("%s", exc)
        else:
            if self.engine.state == "no_model":
                log.warning("no model configured and the bundled model is not installed")

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: draining in-flight requests")
            self._stop.set()

    # ---- run --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._start_http(self.config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loader = asyncio.create_task(self._load_models(self.config))
        await self._stop.wait()
        loader.cancel()
        await self._drain()
        return ExitCode.OK

    async def _drain(self) -> None:
        if self._http is not None:
            self._http.stop()  # no new connections
        self.engine.start_draining()
        deadline = time.monotonic() + self.config.server.drain_timeout_ms / 1000
        while self.engine.stats.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.stats.in_flight:
            log.warning("drain timeout: ending %d request(s) early", self.engine.stats.in_flight)
            self.engine.abort_all()
            end = time.monotonic() + 5
            while self.engine.stats.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.05)
        if self._http is not None:
            await self._http.close_all_connections()
        await self.engine.close()
        log.info("stopped")


def load_startup_config(
    config_arg: str | None, overrides: dict[str, object]
) -> tuple[Config, Path]:
    path = Path(config_arg).expanduser() if config_arg else default_config_path()
    # Only the implicit default location may be absent; a named file must exist.
    missing_ok = config_arg is None and path == default_config_path()
    config = load_config_file(path, missing_ok=missing_ok)
    if overrides:
        config = apply_overrides(config, overrides)
    return config, path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = overrides_from(args)
    try:
        config, path = load_startup_config(args.config, overrides)
    except ConfigError as exc:
        print(f"pensieved: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    configure_logging(config.logging)
    log.info("config: %s", path)
    try:
        return asyncio.run(Daemon(config, path, overrides).run())
    except ListenError as exc:
        log.error("%s", exc)
        return ExitCode.LISTEN


if __name__ == "__main__":
    raise SystemExit(main())
