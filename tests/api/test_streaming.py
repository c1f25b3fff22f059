"""SSE piping: a client that hangs up mid-stream ends what fills the stream at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import tornado.iostream

from pensieved.api import streaming


class HungUpHandler:
    """The handler surface `pipe` uses; the client is gone after the first flush."""

    _headers_written = False

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.written: list[bytes] = []
        self.finished = False

    def set_header(self, name: str, value: str) -> None:
        self.headers[name] = value

    def write(self, chunk: bytes) -> None:
        self.written.append(chunk)

    async def flush(self) -> None:
        self._headers_written = True
        if len(self.written) > 1:
            raise tornado.iostream.StreamClosedError()

    def finish(self) -> None:
        self.finished = True


def test_a_hang_up_closes_the_chunk_source_before_pipe_returns() -> None:
    closed = asyncio.Event()

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            for i in range(1000):
                yield b"data: %d\n\n" % i
        finally:
            closed.set()  # where a generation learns its client went away

    async def main() -> None:
        handler: Any = HungUpHandler()
        source = chunks()
        await streaming.pipe(handler, source, "req_1", lambda *_: b"")
        assert closed.is_set()  # not left to the garbage collector (`source` is still held)
        assert handler.finished and len(handler.written) == 2

    asyncio.run(main())
