"""The upstream HTTP client against a real Tornado server on 127.0.0.1 (in this process)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import tornado.httpserver
import tornado.netutil
import tornado.web

from pensieved.upstream.transport import Call, new_call


class _Slow(tornado.web.RequestHandler):
    """Sends its headers and one chunk, then waits for the client to leave."""

    closed: asyncio.Event

    def on_connection_close(self) -> None:
        _Slow.closed.set()

    async def post(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.write(b"data: first\n\n")
        await self.flush()
        await _Slow.closed.wait()


class _Ok(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_status(503)
        self.set_header("Retry-After", "3")
        self.finish(self.request.body)


def _run(scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        _Slow.closed = asyncio.Event()
        app = tornado.web.Application([("/slow", _Slow), ("/ok", _Ok)])
        [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        try:
            await scenario(f"http://127.0.0.1:{sock.getsockname()[1]}")
        finally:
            server.stop()

    asyncio.run(main())


def _call(url: str, timeout_s: float = 10.0) -> Call:
    return new_call(
        url,
        b'{"a": 1}',
        {"Content-Type": "application/json"},
        timeout_s=timeout_s,
        connect_timeout_s=2.0,
    )


def test_status_headers_and_body() -> None:
    async def scenario(base: str) -> None:
        call = _call(base + "/ok")
        await call.start()
        assert call.status == 503 and call.headers["Retry-After"] == "3"
        assert await call.read() == b'{"a": 1}'
        assert call.failure is None

    _run(scenario)


def test_abort_closes_the_connection_the_server_sees() -> None:
    async def scenario(base: str) -> None:
        call = _call(base + "/slow")
        await call.start()
        chunks = call.chunks()
        assert await anext(chunks) == b"data: first\n\n"
        call.abort()
        await asyncio.wait_for(_Slow.closed.wait(), 5)  # the server saw its client leave
        assert [c async for c in chunks] == []
        assert call.failure is not None and call.failure.connected

    _run(scenario)


def test_timeout_mid_body() -> None:
    async def scenario(base: str) -> None:
        call = _call(base + "/slow", timeout_s=0.5)
        await call.start()
        assert call.status == 200
        body = await call.read()
        assert body == b"data: first\n\n"
        failure = call.failure
        assert failure is not None and failure.timed_out and not failure.during_connect

    _run(scenario)


def test_refused_connection_never_reached_the_server() -> None:
    async def scenario(base: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            call = _call(f"http://127.0.0.1:{port}/v1/messages")
            await call.start()
        failure = call.failure
        assert failure is not None and not failure.connected and failure.during_connect

    _run(scenario)
