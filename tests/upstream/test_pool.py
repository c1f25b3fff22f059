"""Route choice, URL choice and back-off, and routes that follow hot reloads."""

from __future__ import annotations

import asyncio
import time

import pytest

from pensieve.config import Config, parse_config
from pensieved.errors import UpstreamError, UpstreamOverloadedError
from pensieved.upstream.pool import Upstreams


def _config(upstreams: dict[str, object]) -> Config:
    return parse_config({"model": {"upstreams": upstreams}})


class _Holder:
    def __init__(self, config: Config) -> None:
        self.config = config


def test_first_matching_pattern_wins_and_others_stay_local() -> None:
    holder = _Holder(
        _config(
            {
                "claude-opus-4-1*": {"urls": ["http://a:1"]},
                "claude-opus-*": {"urls": ["http://b:1"]},
            }
        )
    )
    upstreams = Upstreams(lambda: holder.config)
    route = upstreams.route_for("claude-opus-4-1-20250805")
    assert route is not None and route.pattern == "claude-opus-4-1*"
    other = upstreams.route_for("claude-opus-4-5")
    assert other is not None and other.pattern == "claude-opus-*"
    assert upstreams.route_for("claude-haiku-4-5") is None
    assert route.target_model("x") == "x"


def test_least_outstanding_then_back_off() -> None:
    holder = _Holder(_config({"m-*": {"urls": ["http://a:1", "http://b:1"], "backoff_ms": 60000}}))
    route = Upstreams(lambda: holder.config).route_for("m-1")
    assert route is not None
    a, b = route.endpoints
    a.outstanding = 2
    assert route.pick(set()) is b
    b.outstanding = 3
    assert route.pick(set()) is a
    a.record_error("unreachable", "refused", backoff_s=60)
    assert a.state(time.monotonic()) == "backing_off"
    assert route.pick(set()) is b  # a backs off, though b is busier
    assert route.pick({"http://b:1"}) is a  # nothing else left: a is tried anyway
    assert route.pick({"http://a:1", "http://b:1"}) is None


def test_reload_rebuilds_routes_keeps_url_health_and_in_flight_routes() -> None:
    holder = _Holder(_config({"m-*": {"urls": ["http://a:1"]}}))
    upstreams = Upstreams(lambda: holder.config)
    before = upstreams.route_for("m-1")
    assert before is not None
    before.endpoints[0].record_error("unreachable", "refused", backoff_s=30)
    holder.config = _config({"m-*": {"urls": ["http://a:1", "http://c:1"], "timeout_ms": 5000}})
    after = upstreams.route_for("m-1")
    assert after is not None and after is not before
    assert [e.url for e in after.endpoints] == ["http://a:1", "http://c:1"]
    assert after.endpoints[0] is before.endpoints[0]  # the URL's health survived
    assert after.load is before.load  # so does the route's count of requests in flight
    assert before.config.timeout_ms == 600_000  # a request holding the old route keeps it
    assert upstreams.route_for("m-1") is after  # rebuilt only when the config changes


def test_route_limit_refuses_with_529() -> None:
    holder = _Holder(_config({"m-*": {"urls": ["http://a:1"], "max_concurrent_requests": 1}}))
    upstreams = Upstreams(lambda: holder.config)
    route = upstreams.route_for("m-1")
    assert route is not None
    route.load.in_flight = 1

    async def go() -> None:
        async with upstreams.call(route, "/v1/messages", {}, {}):
            pass

    with pytest.raises(UpstreamOverloadedError, match="max_concurrent_requests"):
        asyncio.run(go())
    assert route.load.refused == 1


def test_unreadable_key_file_names_the_key(tmp_path: object) -> None:
    holder = _Holder(_config({"m-*": {"urls": ["http://a:1"], "api_key_file": "/nonexistent/k"}}))
    upstreams = Upstreams(lambda: holder.config)
    route = upstreams.route_for("m-1")
    assert route is not None

    async def go() -> None:
        async with upstreams.call(route, "/v1/messages", {}, {}):
            pass

    with pytest.raises(UpstreamError, match=r"model\.upstreams\.m-\*\.api_key_file"):
        asyncio.run(go())
    assert route.load.in_flight == 0


def test_metrics_rows_for_the_lead_to_render() -> None:
    holder = _Holder(_config({"m-*": {"urls": ["http://a:1"]}}))
    upstreams = Upstreams(lambda: holder.config)
    route = upstreams.route_for("m-1")
    assert route is not None
    endpoint = route.endpoints[0]
    endpoint.requests = 3
    endpoint.record_latency(0.25)
    endpoint.record_error("http_500", "failed", backoff_s=10)
    rows = {
        (name, tuple(sorted(labels.items()))): value for name, labels, value in upstreams.metrics()
    }
    labels = (("route", "m-*"), ("url", "http://a:1"))
    assert rows[("pensieve_upstream_requests_total", labels)] == 3
    assert rows[("pensieve_upstream_up", labels)] == 0
    assert rows[("pensieve_upstream_latency_ms", labels)] == 250
    assert rows[("pensieve_upstream_errors_total", (("kind", "http_500"), *labels))] == 1
