"""Tornado handlers for the Messages API, models, health and the root probe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import tornado.http1connection
import tornado.iostream
import tornado.web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pensieve import __version__
from pensieved.api import forward, limits, security, streaming
from pensieved.api.convert import messages_request, new_id, to_generation_request
from pensieved.api.disconnect import cancel_on_hangup
from pensieved.api.errors import STATUS_TYPES, classify, envelope, internal_message
from pensieved.api.sse import LOADING_COMMENT, AnthropicStream, whole_message
from pensieved.engine.interface import GenerationSession, ServingEngine, Work
from pensieved.engine.types import Event, GenerationRequest
from pensieved.errors import InvalidRequestError, NotFoundError, PensieveError
from pensieved.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pensieved.upstream.pool import Upstreams
from pensieved.wire.anthropic import (
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    ModelInfo,
    ModelList,
)

log = logging.getLogger("pensieved.api")
access_log = logging.getLogger("pensieved.access")

M = TypeVar("M", bound=BaseModel)


def _is_branch(part: int | str) -> bool:
    # Union branches in pydantic's loc: our tagged ones (`<list>`, `<tool_result>`) and
    # untagged ones (`list[...]`, model class names); users know only field paths.
    return isinstance(part, str) and (part[:1] in ("<",) or "[" in part or part[:1].isupper())


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not _is_branch(p)) or "body"


def _problem(item: ErrorDetails) -> str:
    loc = tuple(item["loc"])
    message = item["msg"]
    if item["type"] == "list_type" and loc[-1:] == ("<list>",):
        message = "Input should be a string or a list of content blocks"
    return f"{_field_path(loc)}: {message}"


def validation_message(error: ValidationError) -> str:
    return "; ".join(_problem(item) for item in error.errors(include_url=False)[:5])


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Request ids, error envelopes, and the checks every API request passes through.

    The body is streamed in (`data_received`) so that Host, Origin, API key and size checks run
    in `prepare`, before any of it is buffered. Read it with `parse_body`: `request.body` is
    filled in only then.
    """

    request_id: str
    _cors: dict[str, str] | None = None
    _body_limit: int = 0
    _body_size: int = 0
    _body_refused: bool = False
    _chunks: list[bytes] | None = None

    def initialize(self, engine: ServingEngine, upstreams: Upstreams | None = None) -> None:
        self.engine = engine
        self.upstreams = upstreams or Upstreams(lambda: engine.config)

    def set_default_headers(self) -> None:
        # Called again by clear() when an error replaces the response: the id must survive.
        if not hasattr(self, "request_id"):
            self.request_id = new_id("req_")
        self.set_header("request-id", self.request_id)
        self.set_header("Content-Type", "application/json")
        # An allowed page must be able to read our errors too, so CORS headers survive clear().
        for name, value in (self._cors or {}).items():
            self.set_header(name, value)

    def prepare(self) -> None:
        # The config is hot-reloaded: always check against the one in force now.
        config = self.engine.config
        headers = self.request.headers
        security.check_host(headers.get("Host"), config)
        self._cors = security.cors_headers(headers.get("Origin"), config)
        for name, value in self._cors.items():
            self.set_header(name, value)
        start_line = len(self.request.method or "") + len(self.request.uri or "") + 10
        limits.check_headers(headers.get_all(), start_line)
        if self.request.method != "OPTIONS":  # a preflight never carries credentials
            security.check_api_key(self.request.path, headers, config)
        self._body_limit = config.server.max_body_bytes
        self._body_refused = not limits.check_declared_body(
            headers.get("Content-Length"), self._body_limit
        )
        # Tornado enforces this while reading; beyond the limit (and within the drain
        # allowance) data_received discards the body and parse_body answers 413.
        connection = self.request.connection
        if isinstance(connection, tornado.http1connection.HTTP1Connection):
            connection.set_max_body_size(self._body_limit + limits.BODY_DRAIN_ALLOWANCE)

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_refused or self._body_size > self._body_limit:
            self._body_refused, self._chunks = True, None
            return
        if self._chunks is None:
            self._chunks = []
        self._chunks.append(chunk)

    def options(self, *args: str) -> None:
        """CORS preflight: `prepare` has already refused foreign origins and hosts."""
        origin = self.request.headers.get("Origin")
        if origin is not None and self.request.headers.get("Access-Control-Request-Method"):
            for name, value in security.preflight_headers(
                self.request.headers, self.engine.config
            ).items():
                self.set_header(name, value)
        self.set_header("Allow", security.ALLOWED_METHODS)
        self.clear_header("Content-Type")
        self.set_status(204)
        self.finish()

    def write_json(self, data: dict[str, Any] | BaseModel, status: int = 200) -> None:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        self.set_status(status)
        self.finish(json.dumps(data, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        known = classify(exc) if exc is not None else None
        if known is not None:
            status_code, error_type, message = known
            if isinstance(exc, PensieveError) and hasattr(exc, "retry_after_s"):
                self.set_header("retry-after", str(exc.retry_after_s))
        elif isinstance(exc, tornado.web.HTTPError):
            error_type = STATUS_TYPES.get(status_code, "api_error")
            message = exc.log_message or self._reason
            if status_code == 405:
                message = f"method {self.request.method} is not allowed on {self.request.path}"
        elif status_code >= 500:
            error_type, message = "api_error", internal_message(getattr(self, "request_id", "-"))
        else:
            error_type, message = STATUS_TYPES.get(status_code, "api_error"), self._reason
        status_code, body = self.error_reply(status_code, error_type, message, exc)
        self.set_status(status_code)
        self.finish(body)

    def error_reply(
        self, status: int, error_type: str, message: str, exc: BaseException | None
    ) -> tuple[int, str]:
        """The status and body of an error reply: Anthropic's envelope, unless a dialect's
        handler says otherwise."""
        return status, json.dumps(envelope(error_type, message).model_dump(), ensure_ascii=False)

    # The endpoint label of pensieve_requests_total; None: not counted (probes, /metrics).
    endpoint: str | None = None

    def on_finish(self) -> None:
        if self.endpoint is not None:
            self.engine.metrics.requests.inc(endpoint=self.endpoint, status=str(self.get_status()))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if classify(value) is not None or isinstance(value, tornado.web.HTTPError):
            log.info("%s %s -> %s", self.request.method, self.request.path, value)
        else:
            log.error(
                "unhandled error in %s %s (request-id %s)",
                self.request.method,
                self.request.path,
                getattr(self, "request_id", "-"),
                exc_info=(typ, value, tb),
            )

    def parse_body(self, model: type[M]) -> M:
        if self._body_refused:
            raise limits.body_too_large(self._body_size, self._body_limit)
        self.request.body = b"".join(self._chunks or ())
        if self.engine.config.logging.log_prompts:
            # Opt-in debug aid; otherwise no prompt text ever reaches the log.
            log.info(
                "request body (logging.log_prompts, request-id %s): %s",
                self.request_id,
                self.request.body[:100_000].decode("utf-8", "replace"),
            )
        data = limits.decode_json(self.request.body)
        if not isinstance(data, dict):
            raise InvalidRequestError("request body must be a JSON object")
        limits.check_request_shape(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            error = InvalidRequestError(validation_message(exc))
            error.param = _field_path(tuple(exc.errors()[0]["loc"])) if exc.errors() else None
            raise error from None


class RootHandler(BaseHandler):
    """Clients (Claude Code among them) probe the root before their first request."""

    def get(self) -> None:
        self.write_json({"name": "pensieve", "version": __version__, "state": self.engine.state})

    def head(self) -> None:
        self.set_status(200)
        self.finish()


class HealthHandler(BaseHandler):
    def _key_required(self) -> bool:
        server = self.engine.config.server
        return bool(server.api_key or server.api_key_file)

    def get(self) -> None:
        status = self.engine.status(models=False)
        model = status.model
        ready = status.state == "ready"
        self.write_json(
            {
                "status": "ok" if ready else status.state,
                "error": status.error,
                "model": model.name if model else None,
                # /health needs no key; with a key configured, file paths are not for strangers.
                "model_path": None if self._key_required() or not model else model.path,
                "context_size": model.context_size if model else None,
                "version": __version__,
                "in_flight": status.in_flight,
            },
            status=200 if ready else 503,
        )


def _created(path: str | None) -> int:
    try:
        return int(os.stat(path).st_mtime) if path else 0
    except OSError:
        return 0


def _created_at(path: str | None) -> str:
    return datetime.fromtimestamp(_created(path), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ModelsHandler(BaseHandler):
    def _info(self, model_id: str) -> ModelInfo:
        route = self.upstreams.route_for(model_id)
        if route is not None:
            sent = route.config.model or model_id
            return ModelInfo(
                id=model_id,
                display_name=f"{sent} (upstream)",
                created_at=_created_at(None),
                created=_created(None),
            )
        model = self.engine.status(models=False).model
        return ModelInfo(
            id=model_id,
            display_name=(model.name if model else "") or model_id,
            created_at=_created_at(model.path if model else None),
            created=_created(model.path if model else None),
        )

    def get(self, model_id: str | None = None) -> None:
        if model_id is not None:
            if self.upstreams.route_for(model_id) is None:
                self.engine.check_model(model_id)  # 503 when nothing could serve it
            self.write_json(self._info(model_id))
            return
        default = self.engine.default_model_name  # listed also while idle-unloaded
        ids = [default] if default else []
        ids += [p for p in self.engine.config.model.aliases if p not in ids]
        ids += [r.pattern for r in self.upstreams.routes() if r.pattern not in ids]
        data = [self._info(i) for i in ids]
        self.write_json(
            ModelList(
                data=data,
                has_more=False,
                first_id=data[0].id if data else None,
                last_id=data[-1].id if data else None,
            )
        )


class MetricsHandler(BaseHandler):
    """GET /metrics: Prometheus's text format, behind the same checks as the API."""

    def get(self) -> None:
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.finish(self.engine.metrics.registry.render())


class CountTokensHandler(BaseHandler):
    endpoint = "count_tokens"

    async def post(self) -> None:
        body = self.parse_body(CountTokensRequest)
        route = self.upstreams.route_for(body.model)
        if route is not None:
            await forward.count_tokens(
                self, self.upstreams, self.engine, route, body, self.request_id
            )
            return
        what = f"POST /v1/messages/count_tokens model={body.model}"
        request = to_generation_request(body)
        count = await self.engine.count_tokens(body.model, request, Work(self.request_id, what))
        self.write_json(CountTokensResponse(input_tokens=count))


class StreamEncoder(Protocol):
    def feed(self, event: Event) -> bytes:
        """The bytes to send for `event` (maybe none); a `Failed` event raises its error."""
        ...


class GenerationHandler(BaseHandler):
    """What every generating endpoint shares, whatever its dialect: one engine session per
    request, run as a task that a closed connection cancels, and SSE streaming whose errors
    travel in-band once the headers are sent."""

    _task: asyncio.Task[None] | None = None

    def on_connection_close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def generate(
        self,
        model_name: str,
        request: GenerationRequest,
        what: str,
        run: Callable[[GenerationSession], Coroutine[Any, Any, None]],
        *,
        stream: bool,
    ) -> None:
        """Admit `request`, then `run` the session until it ends or the client goes away. A
        streamed request waiting for its model to load is kept alive meanwhile."""
        try:
            async with (
                streaming.errors_in_band(self, self.request_id, self.stream_error),
                self.engine.session(
                    model_name,
                    request,
                    Work(self.request_id, what),
                    on_wait=self._keepalive if stream else None,
                ) as session,
            ):
                self._task = asyncio.ensure_future(run(session))
                await self._watch_hangup()
        except tornado.iostream.StreamClosedError:
            log.info("client went away while its model loaded (request-id %s)", self.request_id)

    async def _keepalive(self) -> None:
        """While a streamed request waits for its model to load: open the stream and keep it
        alive with SSE comments (both dialects' clients skip them)."""
        await streaming.send_comment(self, LOADING_COMMENT)

    async def _watch_hangup(self) -> None:
        """Run `_task` to its end, cancelling it as soon as the client hangs up."""
        assert self._task is not None
        stream = self.request.connection.stream  # type: ignore[union-attr]
        watcher = asyncio.ensure_future(cancel_on_hangup(stream, self._task))
        try:
            await self._task
        except asyncio.CancelledError:
            log.info("client went away; generation cancelled (request-id %s)", self.request_id)
        finally:
            watcher.cancel()

    async def stream_events(self, session: GenerationSession, encoder: StreamEncoder) -> None:
        """Stream the session's events as `encoder` puts them; an error before anything was
        sent (a timeout in the queue) is a plain HTTP error, after it an SSE event."""

        async def encoded() -> AsyncGenerator[bytes, None]:
            async with contextlib.aclosing(session.events()) as events:
                async for event in events:
                    yield encoder.feed(event)

        await streaming.pipe(self, encoded(), self.request_id, self.stream_error)

    def stream_error(self, status: int, error_type: str, message: str, exc: Exception) -> bytes:
        """The SSE bytes that carry an error in this dialect's stream."""
        raise NotImplementedError


class MessagesHandler(GenerationHandler):
    """POST /v1/messages, streaming or not. A closed connection cancels the generation."""

    endpoint = "messages"

    async def post(self) -> None:
        body = self.parse_body(MessagesRequest)
        route = self.upstreams.route_for(body.model)
        if route is not None:
            # Upstream routes come first: such a name never needs a local model.
            self._task = asyncio.ensure_future(
                forward.messages(self, self.upstreams, self.engine, route, body, self.request_id)
            )
            await self._watch_hangup()
            return
        request = messages_request(body)
        what = (
            f"POST /v1/messages model={body.model} stream={str(bool(body.stream)).lower()} "
            f"max_tokens={body.max_tokens}"
        )

        async def run(session: GenerationSession) -> None:
            if body.stream:
                encoder = AnthropicStream(body.model, session.input_tokens)
                await self.stream_events(session, encoder)
            else:
                prompt_tokens = session.input_tokens
                self.write_json(await whole_message(body.model, prompt_tokens, session.events()))

        await self.generate(body.model, request, what, run, stream=bool(body.stream))

    def stream_error(self, status: int, error_type: str, message: str, exc: Exception) -> bytes:
        return AnthropicStream.error(error_type, message)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()  # a foreign Host or Origin hears 403, not whether a path exists
        raise NotFoundError(f"not found: {self.request.method} {self.request.path}")
