"""The /metrics page: Prometheus's text format, read back with prometheus_client's parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pensieved.metrics import EngineMetrics, Registry


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_parse_with_their_labels_and_values() -> None:
    registry = Registry()
    requests = registry.counter("pensieve_x_total", "Things.", ("status",))
    requests.inc(status="200")
    requests.inc(2, status="200")
    requests.inc(status='5"0\\0\n')  # escaped, not a broken page
    got = samples(registry.render())
    assert got[("pensieve_x_total", (("status", "200"),))] == 3
    assert got[("pensieve_x_total", (("status", '5"0\\0\n'),))] == 1
    assert families(registry.render())["pensieve_x"].type == "counter"  # type: ignore[attr-defined]


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    latency = registry.histogram("pensieve_t_seconds", "Time.", ("model",), buckets=(0.1, 1, 10))
    for value in (0.05, 0.5, 0.7, 5, 50):
        latency.observe(value, model="m")
    got = samples(registry.render())
    bucket = "pensieve_t_seconds_bucket"
    assert got[(bucket, (("le", "0.1"), ("model", "m")))] == 1
    assert got[(bucket, (("le", "1.0"), ("model", "m")))] == 3
    assert got[(bucket, (("le", "10.0"), ("model", "m")))] == 4
    assert got[(bucket, (("le", "+Inf"), ("model", "m")))] == 5
    assert got[("pensieve_t_seconds_count", (("model", "m"),))] == 5
    assert math.isclose(got[("pensieve_t_seconds_sum", (("model", "m"),))], 56.25)
    assert latency.count(model="m") == 5


def test_gauges_are_read_at_scrape_time_and_a_broken_one_is_left_out() -> None:
    registry = Registry()
    value = {"n": 1.0}
    registry.gauge("pensieve_g", "A gauge.", lambda: [({"model": "a"}, value["n"])], ("model",))
    registry.gauge("pensieve_broken", "Fails.", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    assert samples(registry.render())[("pensieve_g", (("model", "a"),))] == 1
    value["n"] = 7
    text = registry.render()
    assert samples(text)[("pensieve_g", (("model", "a"),))] == 7
    assert "pensieve_broken" not in text


def test_bad_names_labels_and_uses_are_refused() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match="_total"):
        registry.counter("pensieve_requests", "No suffix.")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.counter("pensieve-x_total", "Dash.")
    with pytest.raises(ValueError, match="label"):
        registry.histogram("pensieve_h", "Reserved label.", ("le",))
    counter = registry.counter("pensieve_c_total", "C.", ("a",))
    with pytest.raises(ValueError, match="labels"):
        counter.inc(b="1")
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1, a="1")
    with pytest.raises(ValueError, match="twice"):
        registry.counter("pensieve_c_total", "Again.")


def test_the_engine_metrics_page_parses_before_and_after_use() -> None:
    metrics = EngineMetrics()
    assert families(metrics.registry.render())  # empty instruments still parse
    metrics.requests.inc(endpoint="messages", status="200")
    metrics.ttft.observe(0.3, model="m")
    metrics.unloads.inc(model="m", reason="idle")
    names = set(families(metrics.registry.render()))
    assert {"pensieve_requests", "pensieve_time_to_first_token_seconds"} <= names
    assert {"pensieve_model_unloads", "pensieve_grammar_seconds"} <= names
