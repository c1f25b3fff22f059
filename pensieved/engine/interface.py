"""What the API layer needs of an engine, and nothing more: `ServingEngine`.

The API depends on this protocol, not on `Engine` (service.py), so its tests drive it with a
small fake and the engine's internals can change without touching a handler. Nothing here
imports llama.cpp.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pensieve.activity import Activity
from pensieve.config import Config
from pensieve.wire import ModelEntryStatus, ModelStatus
from pensieved.engine.types import Event, GenerationRequest
from pensieved.metrics import EngineMetrics

EngineState = Literal["loading", "ready", "no_model", "error"]
# A keep-alive callback of the API layer, awaited every `server.keepalive_ping_s` while a
# request waits for its model to load.
OnWait = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    error: str | None
    model: ModelStatus | None  # the default model, when loaded
    aliases: dict[str, str]  # pattern -> model file
    models: list[ModelEntryStatus] = field(default_factory=list)
    in_flight: int = 0  # requests admitted and not finished


@dataclass(frozen=True)
class Work:
    """A request as the activity record (and a crash report) names it."""

    request_id: str
    what: str  # e.g. "POST /v1/messages model=... stream=true"


class GenerationSession(Protocol):
    """One admitted request holding its model, its prompt prepared."""

    @property
    def input_tokens(self) -> int:
        """The prompt's length in tokens, cached ones included."""
        ...

    def events(self) -> AsyncGenerator[Event, None]:
        """The generation's events, up to its `Finished` or `Failed`."""
        ...


class ServingEngine(Protocol):
    """The engine as the HTTP API sees it."""

    @property
    def config(self) -> Config:
        """The config in force now (it is hot-reloaded: read it per request)."""
        ...

    @property
    def activity(self) -> Activity:
        """The record of running work that a crash report names."""
        ...

    @property
    def metrics(self) -> EngineMetrics: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def default_model_name(self) -> str | None:
        """The default model's name, loaded or not."""
        ...

    def status(self, *, models: bool = True) -> EngineStatus:
        """State and default-model facts; with every model's state unless `models` is False."""
        ...

    def check_model(self, name: str) -> None:
        """Raise what a request for `name` would get when no local model can serve it."""
        ...

    async def count_tokens(self, name: str, request: GenerationRequest, work: Work) -> int:
        """The prompt's length in the tokens of the model serving `name`."""
        ...

    def session(
        self, name: str, request: GenerationRequest, work: Work, on_wait: OnWait | None = None
    ) -> AbstractAsyncContextManager[GenerationSession]:
        """Admit `request`, prepare its prompt and hold its model until the context exits;
        `on_wait` is awaited every keep-alive period while its model loads."""
        ...
