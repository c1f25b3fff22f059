"""Requests for a model name that a `model.upstreams` route serves: Messages, count_tokens
and Chat Completions.

By the time these run, the handler has done everything a local request gets: Host, Origin
and key checks, size and shape limits, validation. Protocol `anthropic` forwards the request
with the local normalization applied and streams the upstream's bytes back as they come;
protocol `openai` goes through the engine's request and event types, so its reply is encoded
by the same code as a local model's. A Chat Completions request goes to the upstream's own
`/v1/chat/completions` whatever the route's protocol (vLLM, llama-server, Ollama and pensieved
serve both dialects), passed through as the client sent it but for the model name. The
client's own key is never forwarded: the route's key (if any) is added by `pensieved.upstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import tornado.iostream
import tornado.web

from pensieved.api.convert import BILLING_HEADER_PREFIX, messages_request, to_generation_request
from pensieved.api.sse import AnthropicStream, whole_message
from pensieved.api.streaming import ErrorEvent, errors_in_band, pipe, send_comment
from pensieved.engine.interface import ServingEngine, Work
from pensieved.engine.types import Event
from pensieved.errors import ModelUnavailableError, UpstreamRejectedError
from pensieved.upstream import openai
from pensieved.upstream.pool import Reply, Route, Upstreams
from pensieved.wire.anthropic import CountTokensRequest, MessagesRequest

log = logging.getLogger("pensieved.api")

# Request headers passed on to an anthropic-protocol upstream (never x-api-key/authorization).
_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
# An upstream that answers count_tokens with these has no such endpoint: estimate instead.
_NO_COUNT_ENDPOINT = frozenset({404, 405, 501})
# Rough size of a token in characters, for an estimate without any tokenizer.
_CHARS_PER_TOKEN = 4
# Sent while a stream waits for the upstream's reply, as a local stream does while its prompt
# is evaluated, so clients and proxies keep waiting.
UPSTREAM_WAITING = b": waiting for the upstream\n\n"


def _anthropic_error(status: int, error_type: str, message: str, exc: Exception) -> bytes:
    return AnthropicStream.error(error_type, message)


def normalized_body(raw: bytes, model: str) -> dict[str, Any]:
    """The request as an anthropic-protocol upstream gets it: what the local path drops is
    dropped (Claude Code's per-session billing header in `system`), the model name is the
    route's."""
    data: dict[str, Any] = json.loads(raw)
    system = data.get("system")
    if isinstance(system, list):
        data["system"] = [
            block
            for block in system
            if not (
                isinstance(block, dict)
                and isinstance(block.get("text"), str)
                and block["text"].startswith(BILLING_HEADER_PREFIX)
            )
        ]
        if not data["system"]:
            del data["system"]
    data["model"] = model
    return data


def _headers(handler: tornado.web.RequestHandler) -> dict[str, str]:
    headers = {"anthropic-version": "2023-06-01"}
    for name in _FORWARDED_HEADERS:
        value = handler.request.headers.get(name)
        if value:
            headers[name] = value
    return headers


class _Pinger:
    """Writes SSE comments every `ping_s` until stopped (the upstream has replied)."""

    def __init__(self, handler: tornado.web.RequestHandler, ping_s: float) -> None:
        self._task = asyncio.ensure_future(self._run(handler, ping_s))

    @staticmethod
    async def _run(handler: tornado.web.RequestHandler, ping_s: float) -> None:
        while True:
            await asyncio.sleep(ping_s)
            await send_comment(handler, UPSTREAM_WAITING)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, tornado.iostream.StreamClosedError):
            await self._task


@contextlib.asynccontextmanager
async def _kept_alive(
    handler: tornado.web.RequestHandler,
    stream: bool,
    ping_s: float,
    request_id: str,
    error_event: ErrorEvent = _anthropic_error,
) -> AsyncIterator[_Pinger | None]:
    """A streamed request's wait for its upstream is kept alive with comments; an upstream
    error after one was sent travels as an SSE `error` event (the status is gone)."""
    pinger = _Pinger(handler, ping_s) if stream else None
    try:
        async with errors_in_band(handler, request_id, error_event):
            yield pinger
    finally:
        if pinger is not None:
            await pinger.stop()


async def messages(
    handler: tornado.web.RequestHandler,
    upstreams: Upstreams,
    engine: ServingEngine,
    route: Route,
    body: MessagesRequest,
    request_id: str,
) -> None:
    """Serve one Messages request through `route`; runs as the handler's cancellable task."""
    what = (
        f"POST /v1/messages model={body.model} stream={str(bool(body.stream)).lower()} "
        f"max_tokens={body.max_tokens} upstream={route.pattern}"
    )
    engine.activity.begin(request_id, what, f"waiting for upstream route {route.pattern!r}")
    ping_s = engine.config.server.keepalive_ping_s
    try:
        async with _kept_alive(handler, bool(body.stream), ping_s, request_id) as pinger:
            if route.config.protocol == "anthropic":
                payload = normalized_body(handler.request.body, route.target_model(body.model))
                await _passthrough(
                    handler,
                    upstreams.call(route, "/v1/messages", payload, _headers(handler)),
                    bool(body.stream),
                    request_id,
                    pinger,
                    _anthropic_error,
                )
            else:
                await _openai(handler, upstreams, route, body, request_id, pinger)
    finally:
        engine.activity.end(request_id)


async def chat_completions(
    handler: tornado.web.RequestHandler,
    upstreams: Upstreams,
    engine: ServingEngine,
    route: Route,
    model: str,
    stream: bool,
    request_id: str,
    error_event: ErrorEvent,
) -> None:
    """Serve one Chat Completions request through `route`: the client's body with the route's
    model name, to the upstream's `/v1/chat/completions`, and its reply back untouched."""
    what = (
        f"POST /v1/chat/completions model={model} stream={str(stream).lower()} "
        f"upstream={route.pattern}"
    )
    engine.activity.begin(request_id, what, f"waiting for upstream route {route.pattern!r}")
    ping_s = engine.config.server.keepalive_ping_s
    payload: dict[str, Any] = json.loads(handler.request.body)
    payload["model"] = route.target_model(model)
    try:
        async with _kept_alive(handler, stream, ping_s, request_id, error_event) as pinger:
            call = upstreams.call(route, "/v1/chat/completions", payload, {})
            await _passthrough(handler, call, stream, request_id, pinger, error_event)
    finally:
        engine.activity.end(request_id)


async def _passthrough(
    handler: tornado.web.RequestHandler,
    call: contextlib.AbstractAsyncContextManager[Reply],
    stream: bool,
    request_id: str,
    pinger: _Pinger | None,
    error_event: ErrorEvent,
) -> None:
    """The upstream's reply, whole or streamed, sent on as it arrives."""
    async with call as reply:
        if pinger is not None:
            await pinger.stop()
        if not stream:
            data = await reply.read()
            handler.set_header("Content-Type", "application/json")
            handler.finish(data)
            return
        await pipe(handler, reply.chunks(), request_id, error_event)


async def _events(events: Iterable[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event


async def _openai(
    handler: tornado.web.RequestHandler,
    upstreams: Upstreams,
    route: Route,
    body: MessagesRequest,
    request_id: str,
    pinger: _Pinger | None,
) -> None:
    request = messages_request(body)
    stream = bool(body.stream)
    payload = openai.chat_request(request, route.target_model(body.model), stream=stream)
    async with upstreams.call(route, "/v1/chat/completions", payload, {}) as reply:
        if pinger is not None:
            await pinger.stop()
        if not stream:
            events = openai.reply_events(await reply.read(), thinking=request.thinking)
            message = await whole_message(body.model, 0, _events(events))
            handler.set_header("Content-Type", "application/json")
            handler.finish(json.dumps(message.model_dump(mode="json"), ensure_ascii=False))
            return
        encoder = AnthropicStream(body.model, 0)

        async def encoded() -> AsyncGenerator[bytes, None]:
            async for event in openai.stream_events(reply.chunks(), thinking=request.thinking):
                yield encoder.feed(event)

        await pipe(handler, encoded(), request_id, _anthropic_error)


async def count_tokens(
    handler: tornado.web.RequestHandler,
    upstreams: Upstreams,
    engine: ServingEngine,
    route: Route,
    body: CountTokensRequest,
    request_id: str,
) -> None:
    """Ask an anthropic-protocol upstream; otherwise (or when it has no count_tokens) answer
    an estimate, marked as one in the body (`estimate`) and a `pensieve-estimate` header."""
    if route.config.protocol == "anthropic":
        payload = normalized_body(handler.request.body, route.target_model(body.model))
        try:
            async with upstreams.call(
                route, "/v1/messages/count_tokens", payload, _headers(handler)
            ) as reply:
                data = await reply.read()
            handler.set_header("Content-Type", "application/json")
            handler.finish(data)
            return
        except UpstreamRejectedError as exc:
            if exc.status not in _NO_COUNT_ENDPOINT:
                raise
    count, how = await _estimate(engine, body, request_id)
    handler.set_header("pensieve-estimate", how)
    handler.finish(json.dumps({"input_tokens": count, "estimate": True}))


async def _estimate(
    engine: ServingEngine, body: CountTokensRequest, request_id: str
) -> tuple[int, str]:
    """The local model's count of the same prompt (its tokenizer, not the upstream's), or
    without a local model a character count divided by four."""
    request = to_generation_request(body)
    try:
        count = await engine.count_tokens(
            body.model, request, Work(request_id, "count_tokens estimate")
        )
        return count, "counted with the local model's tokenizer"
    except ModelUnavailableError:
        chars = sum(len(m.content) for m in request.messages)
        chars += sum(len(json.dumps(t.parameters)) + len(t.description) for t in request.tools)
        return max(1, chars // _CHARS_PER_TOKEN), f"characters / {_CHARS_PER_TOKEN}"
