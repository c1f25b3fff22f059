"""The HTTP listeners of the Messages API: bind, rebind without refusing a connection, live
limits, and the drain of old servers."""

from __future__ import annotations

import logging
import socket

import tornado.httpserver
import tornado.netutil
import tornado.web

from pensieve import __version__
from pensieve.config import Config
from pensieved.api import limits

log = logging.getLogger("pensieved")


class ListenError(Exception):
    """The configured address cannot be listened on."""


def bind_http(config: Config) -> list[socket.socket]:
    host, port = config.server.host, config.server.port
    try:
        return tornado.netutil.bind_sockets(port, host)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another server may be "
            "using the port: stop it or set server.port (or --port) to a free one"
        ) from exc


class Listeners:
    """Owns the HTTP servers: the newest is last; older ones linger after a rebind until their
    connections finish, and are closed on stop."""

    def __init__(self, app: tornado.web.Application) -> None:
        self._app = app
        self._servers: list[tornado.httpserver.HTTPServer] = []
        self._config: Config | None = None  # what the current listener was bound per
        self.sockets: list[socket.socket] = []  # empty: not listening
        self.error: str | None = None  # why not listening

    @property
    def listening(self) -> bool:
        return bool(self.sockets)

    def address(self) -> tuple[str, int] | None:
        if not self.sockets:
            return None
        name = self.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def _serve(self, config: Config, sockets: list[socket.socket]) -> None:
        server = tornado.httpserver.HTTPServer(
            self._app,
            idle_connection_timeout=config.server.idle_connection_timeout_s,
            body_timeout=config.server.idle_connection_timeout_s,
            max_body_size=config.server.max_body_bytes,
            # Bodies are streamed to the handlers (which apply the live limit), so the stream
            # buffer holds only headers and one chunk at a time.
            max_buffer_size=limits.STREAM_BUFFER_BYTES,
            max_header_size=limits.HARD_MAX_HEADER_BYTES,
            xheaders=False,
        )
        server.add_sockets(sockets)
        self._servers.append(server)
        self._config = config
        self.sockets = sockets
        self.error = None
        address = sockets[0].getsockname()
        log.info("pensieved %s listening on http://%s:%d", __version__, address[0], address[1])

    def start(self, config: Config, *, tolerate_failure: bool) -> None:
        """Listen per `config`; on failure raise ListenError, or, when `tolerate_failure`
        (degraded already: keep the control socket up rather than crash-loop), record it."""
        try:
            self._serve(config, bind_http(config))
        except ListenError as exc:
            if not tolerate_failure:
                raise
            self.error = str(exc)
            log.error("%s", exc)

    def rebind(self, config: Config) -> None:
        """Bind the new address before closing the old one, so no connection is refused."""
        old = self._servers[-1] if self.sockets else None
        try:
            sockets = bind_http(config)
        except ListenError:
            if old is None or self._config is None:
                raise
            if config.server.port not in {int(s.getsockname()[1]) for s in self.sockets}:
                raise
            # Same port on an overlapping address (127.0.0.1 -> localhost): it cannot be
            # bound twice, so close the old listener first and put it back on failure.
            previous = self._config
            old.stop()
            self.sockets = []
            try:
                sockets = bind_http(config)
            except ListenError:
                self._serve(previous, bind_http(previous))
                raise
        self._serve(config, sockets)
        if old is not None:
            old.stop()  # stops listening; its open connections finish their requests

    def update_limits(self, config: Config) -> None:
        """Body size and idle timeouts, for the connections accepted from now on."""
        self._config = config
        for server in self._servers:
            params = server.conn_params
            params.max_body_size = config.server.max_body_bytes
            params.body_timeout = config.server.idle_connection_timeout_s
            params.header_timeout = config.server.idle_connection_timeout_s

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.stop()

    async def close_connections(self) -> None:
        for server in self._servers:
            await server.close_all_connections()
