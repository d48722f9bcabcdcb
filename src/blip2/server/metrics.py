"""Prometheus metrics in the text exposition format (version 0.0.4), without the prometheus_client
dependency: a few counters, histograms and gauges, each a family of labelled series, safe across threads
(the event loop records requests, the model worker threads record batches)."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(pairs: dict[str, str]) -> Labels:
    return tuple(sorted(pairs.items()))


def _format_labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = tuple(sorted(labels + extra))
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(_labels(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_format_labels(k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Histogram:
    """Observations counted into cumulative buckets per label set, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help = name, help
        self.bounds = tuple(buckets)
        self._series: dict[Labels, list[float]] = {}  # per label set: counts per bucket and +Inf, sum, count
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.bounds) + 3))
            series[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose bound >= value
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            return int(self._series.get(_labels(labels), [0.0])[-1])

    def samples(self) -> list[str]:
        lines = []
        with self._lock:
            for key, series in sorted(self._series.items()):
                cumulative = 0.0
                for bound, n in zip((*self.bounds, math.inf), series):
                    cumulative += n
                    le = _format_labels(key, (("le", _number(bound)),))
                    lines.append(f"{self.name}_bucket{le} {_number(cumulative)}")
                lines.append(f"{self.name}_sum{_format_labels(key)} {_number(series[-2])}")
                lines.append(f"{self.name}_count{_format_labels(key)} {_number(series[-1])}")
        return lines


class Gauge:
    """A value read when the metrics are rendered, from a callback per label set (queue depths)."""

    kind = "gauge"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._reads: dict[Labels, Callable[[], float]] = {}

    def track(self, read: Callable[[], float], **labels: str) -> None:
        self._reads[_labels(labels)] = read

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_format_labels(k)} {_number(read())}" for k, read in sorted(self._reads.items())
        ]


class Metrics:
    """The service's metrics; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        self.requests = Counter("blip2_requests_total", "HTTP requests answered, by route and status.")
        self.errors = Counter("blip2_errors_total", "Error responses, by route and error type.")
        self.latency = Histogram(
            "blip2_request_duration_seconds", "Time from request to response, by route.", LATENCY_BUCKETS
        )
        self.batch_size = Histogram(
            "blip2_batch_size", "Requests merged into one model call, by task.", BATCH_BUCKETS
        )
        self.model_calls = Counter("blip2_model_calls_total", "Calls of the task API, by task.")
        self.queue_depth = Gauge("blip2_queue_depth", "Requests waiting for a model worker, by model.")
        self.cache = Counter("blip2_image_cache_total", "Encoded-image cache lookups, by result (hit, miss).")
        self._all = (
            self.requests,
            self.errors,
            self.latency,
            self.batch_size,
            self.model_calls,
            self.queue_depth,
            self.cache,
        )

    def render(self) -> str:
        lines = []
        for metric in self._all:
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
            lines += metric.samples()
        return "\n".join(lines) + "\n"
