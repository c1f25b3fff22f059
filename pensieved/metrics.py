"""Counters, gauges and histograms, written out in Prometheus's text format for `GET /metrics`.

Written here rather than taken from `prometheus_client`: pensieved needs three instrument
kinds, one registry per daemon and one output format, about two hundred lines, while the
library would be one more runtime package in every install (and the Homebrew formula) for a
page few users scrape. The tests read the output with prometheus_client's own parser.

Adding a metric: `registry.counter(...)`, `registry.histogram(...)`, or `registry.gauge(name,
help, read)` where `read()` returns the current samples when the page is scraped (for values
that live elsewhere, such as slots in use). Names are prefixed `pensieve_` by the caller.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence

Labels = tuple[tuple[str, str], ...]
Sample = tuple[dict[str, str], float]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# Seconds, from a fast cache hit to a minutes-long model load or prompt.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Tokens per second, from a 70B model on a CPU to a small one on a GPU.
RATE_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple((name, str(labels[name])) for name in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A count that only goes up; the name ends in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help_text, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name} only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def header(self) -> list[str]:
        # The metric family is named without the suffix, its sample with it.
        family = self.name.removesuffix("_total")
        return [f"# HELP {family} {_escape(self.help)}", f"# TYPE {family} counter"]

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels_text(k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into fixed buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = TIME_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        # Per label set: counts per bucket (not cumulative), sum, count.
        self._values: dict[Labels, tuple[list[int], float, int]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total, n = self._values.get(key) or ([0] * len(self.buckets), 0.0, 0)
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
                    break
            self._values[key] = (counts, total + value, n + 1)

    def count(self, **labels: str) -> int:
        with self._lock:
            found = self._values.get(self._key(labels))
        return found[2] if found else 0

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s, n)) for k, (c, s, n) in self._values.items())
        out = []
        for key, (counts, total, n) in items:
            running = 0
            for bound, bucket in zip(self.buckets, counts, strict=True):
                running += bucket
                le = ("le", repr(float(bound)))
                out.append(f"{self.name}_bucket{_labels_text((*key, le))} {running}")
            out.append(f"{self.name}_bucket{_labels_text((*key, ('le', '+Inf')))} {n}")
            out.append(f"{self.name}_sum{_labels_text(key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels_text(key)} {n}")
        return out


class Gauge(_Metric):
    """A value read when the page is scraped, from wherever it lives."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], Iterable[Sample]],
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self._read = read

    def lines(self) -> list[str]:
        samples = [(self._key(labels), value) for labels, value in self._read()]
        return [f"{self.name}{_labels_text(k)} {_number(v)}" for k, v in sorted(samples)]


class Registry:
    """The metrics of one daemon, in the order they were registered."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labelnames)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = TIME_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help_text, labelnames, buckets)
        self._add(metric)
        return metric

    def gauge(
        self,
        name: str,
        help_text: str,
        read: Callable[[], Iterable[Sample]],
        labelnames: Sequence[str] = (),
    ) -> Gauge:
        metric = Gauge(name, help_text, read, labelnames)
        self._add(metric)
        return metric

    def render(self) -> str:
        """The whole page in Prometheus's text exposition format (version 0.0.4)."""
        out: list[str] = []
        for metric in self._metrics.values():
            try:
                lines = metric.lines()
            except Exception:  # a broken reader must not take the whole page down
                continue
            out += metric.header()
            out += lines
        return "\n".join(out) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineMetrics:
    """What the engine measures: requests, tokens, timings, model loads and unloads."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.requests = r.counter(
            "pensieve_requests_total",
            "API requests answered, by endpoint and HTTP status.",
            ("endpoint", "status"),
        )
        self.prompt_tokens = r.counter(
            "pensieve_prompt_tokens_total", "Prompt tokens of finished requests.", ("model",)
        )
        self.cached_tokens = r.counter(
            "pensieve_cache_read_tokens_total",
            "Prompt tokens reused from a KV cache instead of evaluated.",
            ("model",),
        )
        self.output_tokens = r.counter(
            "pensieve_output_tokens_total", "Tokens generated.", ("model",)
        )
        self.prompt_rate = r.histogram(
            "pensieve_prompt_eval_tokens_per_second",
            "Prompt evaluation rate of a request (new, uncached tokens only).",
            ("model",),
            RATE_BUCKETS,
        )
        self.decode_rate = r.histogram(
            "pensieve_decode_tokens_per_second",
            "Generation rate of a request, after its first token.",
            ("model",),
            RATE_BUCKETS,
        )
        self.ttft = r.histogram(
            "pensieve_time_to_first_token_seconds",
            "From admission (model load and queue included) to the first generated output.",
            ("model",),
        )
        self.queued = r.histogram(
            "pensieve_queue_seconds",
            "From admission to a KV slot (model load included).",
            ("model",),
        )
        self.loads = r.counter("pensieve_model_loads_total", "Models loaded.", ("model",))
        self.load_seconds = r.histogram(
            "pensieve_model_load_seconds",
            "Time to load a model and restore its KV caches.",
            ("model",),
        )
        self.unloads = r.counter(
            "pensieve_model_unloads_total",
            "Models unloaded, by reason: idle, room (for another model), request, reload, stop.",
            ("model", "reason"),
        )
        self.unload_seconds = r.histogram(
            "pensieve_model_unload_seconds",
            "Time to save a model's KV caches and free it.",
            ("model",),
        )
        self.grammar_seconds = r.histogram(
            "pensieve_grammar_seconds",
            "Time to build and compile a request's tool grammar (near zero when cached).",
            ("model",),
        )
