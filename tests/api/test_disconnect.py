"""The hang-up watcher sees a closed peer while nothing is written, and consumes nothing."""

from __future__ import annotations

import asyncio
import socket

import tornado.iostream

from pensieved.api.disconnect import cancel_on_hangup


async def _forever() -> None:
    await asyncio.Event().wait()


def test_a_hang_up_cancels_the_task_and_pipelined_bytes_stay_unread() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        stream = tornado.iostream.IOStream(ours)
        work = asyncio.ensure_future(_forever())
        watcher = asyncio.ensure_future(cancel_on_hangup(stream, work))
        theirs.sendall(b"GET / HTTP/1.1\r\n")  # a pipelining client's next request
        await asyncio.sleep(0.5)
        assert not work.done()  # data waiting is not a hang-up
        assert ours.recv(64, socket.MSG_PEEK) == b"GET / HTTP/1.1\r\n"  # and was not consumed
        assert ours.recv(64) == b"GET / HTTP/1.1\r\n"
        theirs.close()
        await asyncio.wait_for(watcher, 5)
        assert work.cancelled()
        stream.close()

    asyncio.run(scenario())


def test_the_watch_ends_with_the_task() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        stream = tornado.iostream.IOStream(ours)
        work = asyncio.ensure_future(asyncio.sleep(0.1))
        await asyncio.wait_for(cancel_on_hangup(stream, work), 5)
        assert work.done() and not work.cancelled()
        stream.close()
        theirs.close()

    asyncio.run(scenario())
