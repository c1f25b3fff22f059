"""Upstream routes: which route serves a model name, which of its URLs takes a request.

The routes follow the config in force (`model.upstreams`, hot-reloaded): they are rebuilt
when it changes, and a request holds the route it started on to its end, so a reload never
moves a stream in flight. A URL's health (outstanding requests, back-off, latency, errors)
belongs to the URL and survives reloads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.httputil import HTTPHeaders

from pensieve.config import Config, ConfigError, UpstreamConfig, upstream_key
from pensieved.errors import PensieveError, UpstreamError, UpstreamOverloadedError
from pensieved.metrics import Registry
from pensieved.upstream import failures
from pensieved.upstream.transport import Call, new_call
from pensieved.waiting import Changes

log = logging.getLogger("pensieved.upstream")

# Weight of the newest sample in a URL's latency average.
_LATENCY_WEIGHT = 0.3


# GET /metrics' upstream figures: name -> (help, labels); `Upstreams.metrics` yields the rows.
_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pensieve_upstream_requests_total": ("Requests sent to an upstream URL.", ("route", "url")),
    "pensieve_upstream_outstanding": ("Requests in flight to an upstream URL.", ("route", "url")),
    "pensieve_upstream_up": (
        "1 while an upstream URL takes requests, 0 while it is backed off.",
        ("route", "url"),
    ),
    "pensieve_upstream_latency_ms": (
        "Time to an upstream URL's response headers (a moving average), in ms.",
        ("route", "url"),
    ),
    "pensieve_upstream_errors_total": (
        "Failed requests to an upstream URL, by kind.",
        ("route", "url", "kind"),
    ),
    "pensieve_upstream_refused_total": (
        "Requests a route refused as overloaded (its max_concurrent_requests).",
        ("route",),
    ),
}


@dataclass
class Endpoint:
    """One upstream URL and what Pensieve has seen of it."""

    url: str
    outstanding: int = 0
    requests: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_at: float | None = None
    down_until: float = 0.0  # time.monotonic(); skipped until then
    latency_ms: float | None = None  # average time to the reply's headers
    last_ok_at: float | None = None

    def state(self, now: float) -> str:
        if self.down_until > now:
            return "backing_off"
        if self.last_error_at is not None and (
            self.last_ok_at is None or self.last_ok_at < self.last_error_at
        ):
            return "failing"
        return "up" if self.last_ok_at is not None else "unknown"

    def record_latency(self, seconds: float) -> None:
        ms = seconds * 1000
        old = self.latency_ms
        self.latency_ms = ms if old is None else old + _LATENCY_WEIGHT * (ms - old)
        self.last_ok_at = time.time()

    def record_error(self, kind: str, message: str, backoff_s: float) -> None:
        self.errors += 1
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        self.last_error, self.last_error_at = message, time.time()
        if backoff_s > 0:
            self.down_until = time.monotonic() + backoff_s


@dataclass
class _Load:
    """A route's requests in flight, carried over when a reload rebuilds the route."""

    in_flight: int = 0
    requests: int = 0
    refused: int = 0


@dataclass
class Route:
    pattern: str
    config: UpstreamConfig
    endpoints: list[Endpoint]
    load: _Load

    def target_model(self, requested: str) -> str:
        return self.config.model or requested

    def pick(self, tried: set[str]) -> Endpoint | None:
        """The URL with the fewest requests outstanding among those not backing off (all
        backing off: the one back soonest, rather than no answer at all)."""
        candidates = [e for e in self.endpoints if e.url not in tried]
        if not candidates:
            return None
        now = time.monotonic()
        healthy = [e for e in candidates if e.down_until <= now]
        if not healthy:
            return min(candidates, key=lambda e: e.down_until)
        return min(healthy, key=lambda e: (e.outstanding, e.requests))


@dataclass
class Reply:
    """An upstream's 2xx reply whose body is still arriving."""

    route: Route
    endpoint: Endpoint
    call: Call

    @property
    def headers(self) -> HTTPHeaders:
        return self.call.headers

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; a connection lost or timed out mid-way raises."""
        async for chunk in self.call.chunks():
            yield chunk
        failure = self.call.failure
        if failure is not None:
            timeout_s = self.route.config.timeout_ms / 1000
            error = failures.from_failure(self.route.pattern, self.endpoint.url, failure, timeout_s)
            kind = "timeout" if failure.timed_out else "connection"
            self.endpoint.record_error(kind, str(error), 0)
            raise error

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


class Upstreams:
    """The routes of the config in force, and the calls made on them."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._built_from: dict[str, UpstreamConfig] | None = None
        self._routes: list[Route] = []
        self._endpoints: dict[str, Endpoint] = {}
        self._loads: dict[str, _Load] = {}
        self._ended = Changes()  # a call ended

    def routes(self) -> list[Route]:
        wanted = self._config().model.upstreams
        if wanted != self._built_from:
            self._rebuild(wanted)
        return self._routes

    def _rebuild(self, wanted: dict[str, UpstreamConfig]) -> None:
        routes = []
        for pattern, upstream in wanted.items():
            endpoints = [self._endpoints.setdefault(url, Endpoint(url)) for url in upstream.urls]
            load = self._loads.setdefault(pattern, _Load())
            routes.append(Route(pattern, upstream, endpoints, load))
        self._routes, self._built_from = routes, dict(wanted)

    def route_for(self, name: str) -> Route | None:
        """The route whose pattern matches `name` first (config order), if any."""
        for route in self.routes():
            if fnmatch.fnmatchcase(name, route.pattern):
                return route
        return None

    @property
    def in_flight(self) -> int:
        return sum(load.in_flight for load in self._loads.values())

    async def wait_calls(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the calls in flight to end; True if none is left."""
        return await self._ended.until(lambda: not self.in_flight, timeout)

    @contextlib.asynccontextmanager
    async def call(
        self, route: Route, path: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[Reply]:
        """A successful (2xx) reply, its body still to be read; errors raise mapped.

        The request goes to the least busy URL; one that cannot be connected to is backed off
        and the next URL tried (the upstream never saw the request, so nothing is sent
        twice). Leaving the block before the body ended (a client that hung up) aborts it.
        """
        config = route.config
        if route.load.in_flight >= config.max_concurrent_requests:
            route.load.refused += 1
            raise UpstreamOverloadedError(
                f"route {route.pattern!r} already has {route.load.in_flight} requests in flight "
                f"(its max_concurrent_requests); retry shortly"
            )
        body = json.dumps(payload, ensure_ascii=False).encode()
        all_headers = {"Content-Type": "application/json", **headers, **self._auth(route)}
        route.load.in_flight += 1
        route.load.requests += 1
        try:
            endpoint, call = await self._connect(route, path, body, all_headers)
            endpoint.outstanding += 1
            try:
                yield Reply(route, endpoint, call)
            finally:
                endpoint.outstanding -= 1
                call.abort()
        finally:
            route.load.in_flight -= 1
            self._ended.notify()

    def _auth(self, route: Route) -> dict[str, str]:
        try:
            key = upstream_key(route.pattern, route.config)
        except ConfigError as exc:
            raise UpstreamError(
                f"route {route.pattern!r} has no usable key: {exc.issues[0]}"
            ) from None
        if key is None:
            return {}
        # Anthropic-protocol servers read x-api-key, OpenAI-protocol ones a Bearer token.
        return {"x-api-key": key, "Authorization": f"Bearer {key}"}

    async def _connect(
        self, route: Route, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Endpoint, Call]:
        config = route.config
        backoff_s = config.backoff_ms / 1000
        tried: list[str] = []
        last: PensieveError | None = None
        while (endpoint := route.pick(set(tried))) is not None:
            tried.append(endpoint.url)
            call = new_call(
                endpoint.url + path,
                body,
                headers,
                timeout_s=config.timeout_ms / 1000,
                connect_timeout_s=config.connect_timeout_ms / 1000,
            )
            endpoint.requests += 1
            started = time.monotonic()
            endpoint.outstanding += 1
            try:
                await call.start()
            except BaseException:
                call.abort()
                raise
            finally:
                endpoint.outstanding -= 1
            if call.failure is not None:
                error = failures.from_failure(
                    route.pattern, endpoint.url, call.failure, config.timeout_ms / 1000
                )
                if not call.failure.connected:
                    endpoint.record_error("unreachable", str(error), backoff_s)
                    log.warning("%s; trying the route's next URL if it has one", error)
                    last = error
                    continue
                endpoint.record_error(
                    "timeout" if call.failure.timed_out else "connection", str(error), 0
                )
                raise error
            if call.status >= 300:
                reply = await call.read()
                error = failures.from_status(
                    route.pattern, endpoint.url, call.status, reply, call.headers.get("retry-after")
                )
                kind = (
                    "overloaded"
                    if isinstance(error, UpstreamOverloadedError)
                    else f"http_{call.status}"
                )
                endpoint.record_error(
                    kind, str(error), backoff_s if failures.backs_off(call.status) else 0
                )
                raise error
            endpoint.record_latency(time.monotonic() - started)
            return endpoint, call
        assert last is not None
        raise failures.unreachable(route.pattern, tried, last)

    # ---- introspection ---------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each route with its URLs' health, for `status` (pensieve.wire.UpstreamStatus)."""
        now_mono, out = time.monotonic(), []
        for route in self.routes():
            out.append(
                {
                    "pattern": route.pattern,
                    "protocol": route.config.protocol,
                    "model": route.config.model,
                    "max_concurrent_requests": route.config.max_concurrent_requests,
                    "in_flight": route.load.in_flight,
                    "requests": route.load.requests,
                    "refused": route.load.refused,
                    "urls": [
                        {
                            "url": e.url,
                            "state": e.state(now_mono),
                            "outstanding": e.outstanding,
                            "requests": e.requests,
                            "errors": e.errors,
                            "errors_by_kind": dict(e.errors_by_kind),
                            "last_error": e.last_error,
                            "last_error_at": e.last_error_at,
                            "latency_ms": e.latency_ms,
                            "backing_off_s": max(0.0, e.down_until - now_mono),
                        }
                        for e in route.endpoints
                    ],
                }
            )
        return out

    def register_metrics(self, registry: Registry) -> None:
        """Each upstream figure as a gauge of `registry` (GET /metrics), read at scrape time."""

        def reader(name: str) -> Callable[[], list[tuple[dict[str, str], float]]]:
            return lambda: [(labels, v) for n, labels, v in self.metrics() if n == name]

        for name, (help_text, labelnames) in _METRICS.items():
            registry.gauge(name, help_text, reader(name), labelnames)

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Per-URL counters and gauges as (name, labels, value), for `/metrics` to render."""
        rows: list[tuple[str, dict[str, str], float]] = []
        now_mono = time.monotonic()
        for route in self.routes():
            for e in route.endpoints:
                labels = {"route": route.pattern, "url": e.url}
                rows.append(("pensieve_upstream_requests_total", labels, e.requests))
                rows.append(("pensieve_upstream_outstanding", labels, e.outstanding))
                rows.append(("pensieve_upstream_up", labels, 0 if e.down_until > now_mono else 1))
                if e.latency_ms is not None:
                    rows.append(("pensieve_upstream_latency_ms", labels, e.latency_ms))
                for kind, count in e.errors_by_kind.items():
                    rows.append(("pensieve_upstream_errors_total", {**labels, "kind": kind}, count))
            rows.append(
                ("pensieve_upstream_refused_total", {"route": route.pattern}, route.load.refused)
            )
        return rows
