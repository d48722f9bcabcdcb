"""The Prometheus text: counters, cumulative histogram buckets, gauges read at render time."""

from __future__ import annotations

from service_helpers import metric

from blip2.server.metrics import Histogram, Metrics


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    histogram = Histogram("h", "help", (1, 5, 10))
    values = [0.5, 1, 3, 7, 12, 100]
    for value in values:
        histogram.observe(value, task="t")
    text = "\n".join(histogram.samples())
    for bound in (1, 5, 10):
        assert metric(text, "h_bucket", le=str(bound), task="t") == sum(v <= bound for v in values)
    assert metric(text, "h_bucket", le="+Inf", task="t") == len(values)
    assert metric(text, "h_sum", task="t") == sum(values)
    assert metric(text, "h_count", task="t") == len(values) == histogram.count(task="t")


def test_render_has_help_type_and_escaped_labels():
    metrics = Metrics()
    metrics.requests.inc(route='/a"b\\', status="200")
    metrics.requests.inc(route='/a"b\\', status="200")
    depth = [3]
    metrics.queue_depth.track(lambda: depth[0], model="m")
    depth[0] = 5
    text = metrics.render()
    assert "# TYPE blip2_requests_total counter" in text and "# TYPE blip2_batch_size histogram" in text
    assert 'blip2_requests_total{route="/a\\"b\\\\",status="200"} 2' in text.splitlines()
    assert metric(text, "blip2_queue_depth", model="m") == 5
    assert text.endswith("\n")
