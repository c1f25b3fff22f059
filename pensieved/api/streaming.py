"""SSE replies on a Tornado handler, whatever fills them (a local generation in either dialect,
an upstream's bytes): opening the stream, keep-alive comments, piping chunks, and an error that
arrives once the status line is gone.

The one module that reads Tornado's private response state: whether headers went out decides
between a plain HTTP error and an in-band SSE error event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import tornado.iostream
import tornado.web

from pensieved.api.errors import classify, internal_message
from pensieved.errors import PensieveError

log = logging.getLogger("pensieved.api")

# The SSE bytes that carry an error in the client's dialect: (status, type, message, exc).
ErrorEvent = Callable[[int, str, str, Exception], bytes]

_EVENT_END = b"\n\n"


def headers_sent(handler: tornado.web.RequestHandler) -> bool:
    """Whether the status line and headers are gone (some of the body was flushed)."""
    return bool(handler._headers_written)


def start_event_stream(handler: tornado.web.RequestHandler) -> None:
    """The headers of an SSE reply, whichever dialect or source fills it; proxies must not
    buffer it."""
    handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
    handler.set_header("Cache-Control", "no-cache")
    handler.set_header("X-Accel-Buffering", "no")


async def send_comment(handler: tornado.web.RequestHandler, comment: bytes) -> None:
    """Open the stream if need be and send an SSE comment (clients skip them; proxies and idle
    timers see traffic)."""
    if not headers_sent(handler):
        start_event_stream(handler)
    handler.write(comment)
    await handler.flush()


async def send_error(
    handler: tornado.web.RequestHandler, exc: Exception, request_id: str, error_event: ErrorEvent
) -> None:
    """Headers are gone: the error travels as an SSE event."""
    known = classify(exc)
    if known is None:
        log.error("stream failed (request-id %s)", request_id, exc_info=exc)
        status, error_type, message = 500, "api_error", internal_message(request_id)
    else:
        status, error_type, message = known
        log.info("stream failed (request-id %s): %s", request_id, message)
    with contextlib.suppress(tornado.iostream.StreamClosedError):
        handler.write(error_event(status, error_type, message, exc))
        await handler.flush()


@contextlib.asynccontextmanager
async def errors_in_band(
    handler: tornado.web.RequestHandler, request_id: str, error_event: ErrorEvent
) -> AsyncIterator[None]:
    """A PensieveError raised inside, once keep-alives opened the stream, ends it with an SSE
    error event; before that it propagates (a plain HTTP error)."""
    try:
        yield
    except PensieveError as exc:
        if not headers_sent(handler) or handler._finished:
            raise
        await send_error(handler, exc, request_id, error_event)
        handler.finish()


async def pipe(
    handler: tornado.web.RequestHandler,
    chunks: AsyncGenerator[bytes, None],
    request_id: str,
    error_event: ErrorEvent,
) -> None:
    """Send `chunks` as a streamed reply and finish it. A failure before anything was sent is
    raised (a plain HTTP error); after, it ends the stream as an error event (closing an event
    the source left half-sent first). A client that hangs up ends it quietly, and `chunks` is
    closed at once: left to the garbage collector, its generation would run on meanwhile."""
    if not headers_sent(handler):
        start_event_stream(handler)
    tail = _EVENT_END
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if chunk:
                    handler.write(chunk)
                    await handler.flush()
                    tail = (tail + chunk)[-2:]
    except tornado.iostream.StreamClosedError:
        log.info("client closed the stream (request-id %s)", request_id)
    except Exception as exc:
        if not headers_sent(handler):
            raise
        if tail != _EVENT_END:
            handler.write(_EVENT_END)
        await send_error(handler, exc, request_id, error_event)
    handler.finish()
