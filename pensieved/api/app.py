"""The Tornado application: routes and server settings for the HTTP API."""

from __future__ import annotations

import tornado.web

from pensieved.api.handlers import (
    CountTokensHandler,
    HealthHandler,
    MessagesHandler,
    MetricsHandler,
    ModelsHandler,
    NotFoundHandler,
    RootHandler,
)
from pensieved.api.openai.handlers import ChatCompletionsHandler
from pensieved.engine.interface import ServingEngine
from pensieved.upstream.pool import Upstreams


def make_app(engine: ServingEngine, upstreams: Upstreams | None = None) -> tornado.web.Application:
    # One Upstreams for every handler: URL health and route load are shared state.
    args = {"engine": engine, "upstreams": upstreams or Upstreams(lambda: engine.config)}
    return tornado.web.Application(
        [
            (r"/", RootHandler, args),
            (r"/health", HealthHandler, args),
            (r"/v1/messages", MessagesHandler, args),
            (r"/v1/messages/count_tokens", CountTokensHandler, args),
            (r"/v1/models", ModelsHandler, args),
            (r"/v1/models/([^/]+)", ModelsHandler, args),
            (r"/v1/chat/completions", ChatCompletionsHandler, args),
            (r"/metrics", MetricsHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_no_access_log,
    )


def _no_access_log(handler: tornado.web.RequestHandler) -> None:
    # Access lines go through pensieved.access at debug level: they are noise at info.
    import logging

    request = handler.request
    logging.getLogger("pensieved.access").debug(
        "%d %s %s %.1fms",
        handler.get_status(),
        request.method,
        request.uri,
        1000.0 * request.request_time(),
    )
