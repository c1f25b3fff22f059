"""Changes: waiters wake at a notify and re-check what they wait for."""

from __future__ import annotations

import asyncio

from pensieved.waiting import Changes


def test_until_returns_once_a_notify_finds_it_ready() -> None:
    async def scenario() -> tuple[bool, int]:
        changes, state = Changes(), {"left": 2}
        checks = 0

        def ready() -> bool:
            nonlocal checks
            checks += 1
            return state["left"] == 0

        waiter = asyncio.ensure_future(changes.until(ready))
        for _ in range(2):
            await asyncio.sleep(0)  # let the waiter block
            state["left"] -= 1
            changes.notify()
        return await waiter, checks

    done, checks = asyncio.run(scenario())
    assert done and checks == 3  # at the start, then once per notify


def test_until_says_false_when_the_time_is_up_and_a_lone_notify_wakes_nobody() -> None:
    async def scenario() -> bool:
        changes = Changes()
        changes.notify()  # nobody waits: nothing happens, nothing is remembered
        return await changes.until(lambda: False, timeout=0)

    assert asyncio.run(scenario()) is False
