"""Notice a client that hung up while nothing is being written to it."""

from __future__ import annotations

import asyncio
import socket

import tornado.iostream

# How often a running request checks that its client is still connected.
POLL_S = 0.2


async def cancel_on_hangup(stream: tornado.iostream.IOStream, task: asyncio.Task[None]) -> None:
    """Cancel `task` as soon as the peer of `stream` closes the connection.

    Tornado learns of a closed connection only when a write fails, and nothing is written
    while a long prompt is evaluated (or a non-streamed reply generated); peeking at the
    socket sees the EOF at once and consumes nothing a pipelining client sent.
    """
    while not task.done():
        await asyncio.sleep(POLL_S)
        sock = stream.socket
        if sock is None or stream.closed():
            task.cancel()
            return
        try:
            peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            peeked = b""
        if not peeked:
            task.cancel()
            return
