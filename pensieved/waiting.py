"""Waiting on the event loop for shared state to change, without polling.

`asyncio.Condition` needs its lock held to notify, and the places that change the state are
plain callbacks (a scheduler freeing a slot, a request letting go of a model, a loading thread
ending): `Changes.notify` is callable from any of them, on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class Changes:
    """Wakes every waiter at the next `notify`; waiters re-check what they wait for."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def next(self) -> asyncio.Future[None]:
        """A future resolved at the next `notify`."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the next `notify`; False if `timeout` seconds pass first."""
        waiter = self.next()
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return True

    async def until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until `ready()` holds, checking it at each `notify`; False if `timeout`
        seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not ready():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await self.wait(remaining)
        return True
