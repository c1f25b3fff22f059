"""Slots, queueing and the bridge between the batcher thread and the event loop.

Each request gets the free slot whose KV cache is a prefix of its prompt (only the new suffix
is evaluated), else an empty slot (a prefix another slot holds is shared or copied into it,
see `Generation.begin`), else the
slot sharing the longest prefix when that reuses at least as much as it throws away, else
evicts the free slot that is cheapest to lose: GreedyDual-Size, where
a slot's value is its cached token count (what re-reading it would cost) plus an inflation
that grows with every eviction, so long conversations survive a stream of short side requests
while stale caches still age out. Requests that find no free slot wait in FIFO order.
Generation runs on the model's batcher thread (see `batcher.py`); its events reach the event
loop through a thread-safe hand-off, so the loop never blocks on llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping

from pensieve.wire import BackgroundPrefill, CacheReport
from pensieved.engine.batcher import DecodeStats, Runner
from pensieved.engine.generation import Generation
from pensieved.engine.slots import Slot
from pensieved.engine.types import Event, Failed, Finished, Heartbeat, PreparedPrompt
from pensieved.errors import PensieveError, RequestTimeoutError

log = logging.getLogger("pensieved.engine")

# How many requests' cache reports a model keeps (`pensievectl cache`).
RECENT_REQUESTS = 20


def choose_slot(
    free: list[Slot], tokens: tuple[int, ...], value: Mapping[int, float] | None = None
) -> Slot:
    """The slot to run `tokens` on; `value` maps slot index to its eviction priority.

    A slot whose whole cache is a prefix of `tokens` (a conversation's next turn) wins.
    Otherwise an empty slot: whatever prefix another slot holds is shared or copied into it
    (see `Generation.begin`), so nothing cached is dropped. Without one, the longest shared prefix
    wins when it reuses at least as many tokens as it discards: a chat template's common
    header (a handful of tokens) must not make a short side request overwrite a long
    conversation. Otherwise the lowest `value` (least recently used when no values are
    given, or on ties).
    """
    shared = {slot.index: slot.shared_prefix(tokens) for slot in free}
    best = max(free, key=lambda slot: (shared[slot.index], -slot.last_used))
    reused = shared[best.index]
    if reused > 0 and reused == len(best.tokens):
        return best
    empty = [slot for slot in free if not slot.tokens]
    if empty:
        return min(empty, key=lambda slot: slot.last_used)
    if reused > 0 and reused >= len(best.tokens) - reused:
        return best
    values = value or {}
    return min(free, key=lambda slot: (values.get(slot.index, 0.0), slot.last_used))


class Outbox:
    """Hands events from the batcher's thread to the event loop, once per decode step.

    One wake-up of the loop per step instead of one per token and stream: where llama.cpp's
    threads use every core, each wake-up pre-empts one of them, and its partner then spins at
    the next barrier until it is back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []

    def post(self, loop: asyncio.AbstractEventLoop, call: Callable[[], None]) -> None:
        with self._lock:
            self._items.append((loop, call))

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for loop, call in items:
            by_loop.setdefault(loop, []).append(call)
        for loop, calls in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


class Scheduler:
    def __init__(
        self, slots: int, runner: Runner, on_release: Callable[[], None] = lambda: None
    ) -> None:
        self.slots = [Slot(index) for index in range(slots)]
        self._runner = runner
        # Called whenever a slot is freed: the model pool waits for its models to fall idle.
        self._on_release = on_release
        self._outbox = Outbox()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.running = 0
        self._promised = 0
        self._active: set[tuple[threading.Event, asyncio.Queue[Event | None]]] = set()
        # GreedyDual-Size state: each slot's value, and the inflation that ages them all.
        self._value: dict[int, float] = {}
        self._inflation = 0.0
        # Prompts whose client hung up mid-prefill, still evaluated for a retry (batcher.py).
        self._background: set[Generation] = set()
        self.recent: deque[CacheReport] = deque(maxlen=RECENT_REQUESTS)

    def adopt_cached(self) -> None:
        """Value slots that were filled from disk like slots filled by a request."""
        for slot in self.slots:
            if slot.tokens:
                self._value[slot.index] = float(len(slot.tokens))

    @property
    def decode_stats(self) -> DecodeStats:
        return self._runner.stats

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _free_slots(self) -> list[Slot]:
        return [slot for slot in self.slots if not slot.busy]

    def background_prefills(self) -> list[BackgroundPrefill]:
        return [
            BackgroundPrefill(
                slot=g.seq, evaluated=g.evaluated, prompt_tokens=len(g.prepared.tokens)
            )
            for g in sorted(self._background, key=lambda g: g.seq)
        ]

    def _preempt_background(self, tokens: tuple[int, ...]) -> None:
        """A background prefill gives way to a request that carries it on (a retry, or any
        prompt that extends what it has evaluated: that request shares its cells) and, when
        no slot is free, to any request."""
        no_slot = len(self._free_slots()) - self._promised <= 0
        for generation in sorted(self._background, key=lambda g: g.evaluated):
            slot = generation.slot
            carried_on = bool(slot.tokens) and slot.shared_prefix(tokens) >= len(slot.tokens)
            if no_slot or carried_on:
                log.info(
                    "slot %d: its background prefill (%d of %d tokens) gives way to a new "
                    "request (%s)",
                    slot.index,
                    generation.evaluated,
                    len(generation.prepared.tokens),
                    "which carries it on" if carried_on else "which needs its slot",
                )
                generation.cancel.set()
                no_slot = False

    async def _acquire(self, tokens: tuple[int, ...]) -> Slot:
        if self._background:
            self._preempt_background(tokens)
        # FIFO: a newcomer may take a free slot only if nobody is waiting and no free slot
        # has already been promised to a woken waiter.
        if len(self._free_slots()) - self._promised <= 0 or self._waiters:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._promised -= 1
                    self._wake_next()  # pass the promised slot on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            self._promised -= 1
        slot = choose_slot(self._free_slots(), tokens, self._value)
        if slot.shared_prefix(tokens) < len(slot.tokens):
            # Part of this slot's cache is overwritten: an eviction, which ages every other slot.
            self._inflation = max(self._inflation, self._value.get(slot.index, 0.0))
        slot.busy = True
        self.running += 1
        return slot

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._promised += 1
                waiter.set_result(None)
                return

    def _release(self, slot: Slot) -> None:
        slot.busy = False
        slot.last_used = time.monotonic()
        self._value[slot.index] = self._inflation + len(slot.tokens)
        self.running -= 1
        self._wake_next()
        self._on_release()

    async def stream(
        self, prepared: PreparedPrompt, deadline: float | None = None, heartbeat_s: float = 5.0
    ) -> AsyncGenerator[Event, None]:
        """Run one generation; yields events. Closing the iterator early cancels it.

        After `heartbeat_s` without an event, a Heartbeat is yielded (and again every period).
        """
        loop = asyncio.get_running_loop()
        try:
            slot = await asyncio.wait_for(self._acquire(prepared.tokens), _remaining(deadline))
        except TimeoutError:
            raise RequestTimeoutError(_timeout_message()) from None
        cancel = threading.Event()
        # None in the queue means the deadline passed (the loop's clock is time.monotonic). One
        # timer per request instead of a wait_for per token, which wraps each get in a new task.
        events: asyncio.Queue[Event | None] = asyncio.Queue()

        outbox = self._outbox

        def emit(event: Event) -> None:
            outbox.post(loop, functools.partial(events.put_nowait, event))

        stopped: asyncio.Future[None] = loop.create_future()

        def on_done() -> None:
            outbox.post(loop, stop)

        generation = Generation(slot, prepared, cancel, emit, on_done, self.slots, outbox.flush)

        def stop() -> None:
            self._background.discard(generation)
            if generation.report is not None:
                self.recent.append(generation.report)
            self._release(slot)
            if not stopped.done():
                stopped.set_result(None)

        self._runner.submit(generation)
        handle = (cancel, events)
        self._active.add(handle)
        timer = None if deadline is None else loop.call_at(deadline, events.put_nowait, None)
        last_event = time.monotonic()
        heartbeat: asyncio.TimerHandle | None = None

        def beat() -> None:
            # Streams stay silent while a long prompt is evaluated; a heartbeat lets the API
            # layer send keep-alive pings so clients and proxies do not give up on us.
            nonlocal heartbeat
            if time.monotonic() - last_event >= heartbeat_s:
                events.put_nowait(Heartbeat())
            heartbeat = loop.call_later(heartbeat_s, beat)

        heartbeat = loop.call_later(heartbeat_s, beat)
        hung_up = False
        try:
            while True:
                event = await events.get()
                if event is None:
                    raise RequestTimeoutError(_timeout_message())
                last_event = time.monotonic()
                yield event
                if isinstance(event, Finished | Failed):
                    break
        except (GeneratorExit, asyncio.CancelledError):
            hung_up = True  # the client went away (a timeout or an abort is not this)
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            if timer is not None:
                timer.cancel()
            self._active.discard(handle)
            if hung_up and not stopped.done():
                # The batcher decides: still in its prompt, it goes on in the background (and
                # holds the slot until it is done or preempted); otherwise it ends.
                self._background.add(generation)
                generation.hung_up = True  # read by the batcher's next step
            else:
                cancel.set()
                # The batcher releases the slot once it has stopped touching this sequence;
                # the request is over only then.
                await asyncio.shield(stopped)

    def abort_all(self, error: PensieveError) -> None:
        """End every running generation with `error` (used when a drain times out)."""
        for cancel, events in list(self._active):
            cancel.set()
            events.put_nowait(Failed(error))
        for generation in self._background:
            generation.cancel.set()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def close(self) -> None:
        self._runner.close()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _timeout_message() -> str:
    return (
        "request timed out (server.request_timeout_ms): it waited and ran longer than allowed; "
        "retry, ask for fewer max_tokens, or raise the limit in the config"
    )
