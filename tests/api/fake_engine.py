"""A `ServingEngine` whose generation is a script: the API's tests run handlers over real HTTP
against it, with no model. It records what a handler did to it (sessions opened and closed,
generations cancelled) for the tests to check."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pensieve.activity import Activity
from pensieve.config import Config
from pensieved.engine.interface import EngineState, EngineStatus, OnWait, Work
from pensieved.engine.types import Event, GenerationRequest
from pensieved.metrics import EngineMetrics

PROMPT_TOKENS = 10


class Hang:
    """A script step: the generation waits here until it is cancelled."""


@dataclass
class FakeSession:
    engine: FakeEngine
    input_tokens: int = PROMPT_TOKENS

    async def events(self) -> AsyncIterator[Event]:
        for step in self.engine.script:
            if isinstance(step, Hang):
                self.engine.hanging.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.engine.cancelled.set()
                    raise
            else:
                yield step


class FakeEngine:
    """Serves every model name with `script`. Before a session opens, its model takes
    `load_waits` keep-alive periods to load and then fails with `load_error`, if set."""

    def __init__(self, script: list[Event | Hang], config: Config | None = None) -> None:
        self.script = script
        self.config = config or Config()
        self.activity = Activity()
        self.metrics = EngineMetrics()
        self.state: EngineState = "ready"
        self.default_model_name: str | None = "fake"
        self.load_waits = 0
        self.load_error: Exception | None = None
        self.in_flight = 0
        self.served = 0
        self.cancelled = asyncio.Event()
        self.hanging = asyncio.Event()  # a generation reached a `Hang`
        self.closed = asyncio.Event()  # a session ended

    def status(self, *, models: bool = True) -> EngineStatus:
        return EngineStatus(self.state, None, None, {}, [], self.in_flight)

    def check_model(self, name: str) -> None:
        pass

    async def count_tokens(self, name: str, request: GenerationRequest, work: Work) -> int:
        return PROMPT_TOKENS

    @contextlib.asynccontextmanager
    async def session(
        self, name: str, request: GenerationRequest, work: Work, on_wait: OnWait | None = None
    ) -> AsyncIterator[FakeSession]:
        self.in_flight += 1
        self.activity.begin(work.request_id, work.what, "preparing")
        try:
            for _ in range(self.load_waits):
                if on_wait is not None:
                    await on_wait()
            if self.load_error is not None:
                raise self.load_error
            yield FakeSession(self)
        finally:
            self.in_flight -= 1
            self.served += 1
            self.activity.end(work.request_id)
            self.closed.set()
