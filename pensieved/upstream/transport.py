"""One HTTP request to an upstream, its body read as it arrives, and abortable at any time.

Tornado's client has no cancel: a closed client connection must still close the upstream
request (so the upstream stops generating), so the connection class registers itself by
request and `Call.abort` closes its socket. Nothing here knows Anthropic or OpenAI.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import tornado.httpclient
import tornado.simple_httpclient
from tornado.httputil import HTTPHeaders

# Far above any sensible route's max_concurrent_requests: queueing is the route's job, and
# a request queued inside Tornado's client would spend its timeout there.
_MAX_CLIENTS = 10_000
_MAX_BODY = 256 * 1024 * 1024


class _Connection(tornado.simple_httpclient._HTTPConnection):
    """Tornado's connection, findable from its request so that it can be closed."""

    live: weakref.WeakValueDictionary[int, _Connection] = weakref.WeakValueDictionary()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        original = getattr(self.request, "request", self.request)
        _Connection.live[id(original)] = self

    @property
    def connected(self) -> bool:
        return hasattr(self, "stream")

    def abort(self) -> None:
        error = tornado.simple_httpclient.HTTPStreamClosedError("cancelled by pensieved")
        self._handle_exception(type(error), error, None)


class _Client(tornado.simple_httpclient.SimpleAsyncHTTPClient):
    def _connection_class(self) -> type:
        return _Connection


_client: tuple[asyncio.AbstractEventLoop, _Client] | None = None


def client() -> _Client:
    """One client per event loop (the daemon has one; tests start several)."""
    global _client
    loop = asyncio.get_running_loop()
    if _client is None or _client[0] is not loop:
        made = _Client(force_instance=True, max_clients=_MAX_CLIENTS, max_body_size=_MAX_BODY)
        _client = (loop, made)
    return _client[1]


@dataclass
class Failure:
    """How a request failed before or while its response arrived."""

    error: BaseException
    connected: bool  # False: the upstream never saw the request (safe to send elsewhere)
    timed_out: bool
    during_connect: bool


_END = object()


@dataclass
class Call:
    """A request in flight: `start` waits for the status line, `chunks` yields the body."""

    request: tornado.httpclient.HTTPRequest
    status: int = 0
    headers: HTTPHeaders = field(default_factory=HTTPHeaders)
    failure: Failure | None = None
    _queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    _headers_seen: asyncio.Event = field(default_factory=asyncio.Event)
    _fetch: asyncio.Future[tornado.httpclient.HTTPResponse] | None = None
    _status_line: bool = True

    def _on_header(self, line: str) -> None:
        if self._status_line:
            self._status_line = False
            self.status = int(line.split(" ", 2)[1])
        elif line in ("\r\n", "\n"):
            self._headers_seen.set()
        else:
            with contextlib.suppress(Exception):
                self.headers.parse_line(line)

    def _on_chunk(self, chunk: bytes) -> None:
        self._queue.put_nowait(chunk)

    def _on_done(self, future: asyncio.Future[tornado.httpclient.HTTPResponse]) -> None:
        if future.cancelled():
            self._queue.put_nowait(_END)
            return
        # Connection failures and timeouts raise even with raise_error=False.
        error = future.exception()
        if error is None and future.result().code == 599:
            error = future.result().error
        if error is not None:
            connection = _Connection.live.get(id(self.request))
            connected = connection.connected if connection is not None else True
            message = str(error)
            timed_out = isinstance(error, tornado.simple_httpclient.HTTPTimeoutError)
            self.failure = Failure(
                error,
                connected=connected and "while connecting" not in message,
                timed_out=timed_out,
                during_connect="while connecting" in message or not connected,
            )
        self._headers_seen.set()
        self._queue.put_nowait(_END)

    async def start(self) -> None:
        """Send the request; return once the status line and headers arrived or it failed."""
        self._fetch = asyncio.ensure_future(client().fetch(self.request, raise_error=False))
        self._fetch.add_done_callback(self._on_done)
        await self._headers_seen.wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ends at its end, or with `failure` set mid-way."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            assert isinstance(item, bytes)
            yield item

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    @property
    def done(self) -> bool:
        return self._fetch is not None and self._fetch.done()

    def abort(self) -> None:
        """Close the connection (the upstream sees its client leave); harmless when done."""
        if self.done:
            return
        connection = _Connection.live.get(id(self.request))
        if connection is not None:
            connection.abort()


def new_call(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    connect_timeout_s: float,
) -> Call:
    call: Call
    request = tornado.httpclient.HTTPRequest(
        url,
        method="POST",
        body=body,
        headers=headers,
        request_timeout=timeout_s,
        connect_timeout=connect_timeout_s,
        follow_redirects=False,
        decompress_response=True,
        header_callback=lambda line: call._on_header(line),
        streaming_callback=lambda chunk: call._on_chunk(chunk),
    )
    call = Call(request)
    return call
