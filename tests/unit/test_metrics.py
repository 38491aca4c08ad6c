"""The metrics registry: one definition per metric, shipped observations applied exactly."""

from __future__ import annotations

from prometheus_client import generate_latest

from orchestrator.metrics import METRICS, MetricsRegistry, Observation, ObservationBuffer, markdown_table


def test_every_metric_is_flotilla_prefixed_documented_and_unique():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    assert all(n.startswith("flotilla_") and m.help for n, m in zip(names, METRICS))
    assert all(m.name.endswith("_total") for m in METRICS if m.kind == "counter")
    assert all(m.buckets for m in METRICS if m.kind == "histogram")


def test_shipped_observations_land_in_the_exposition():
    registry = MetricsRegistry()
    rejected = registry.apply([
        Observation("flotilla_requests_total", ("m", "interactive", "completed"), 2),
        Observation("flotilla_ttft_seconds", ("m", "interactive"), 0.3, "observe"),
        Observation("flotilla_requests_in_flight", ("m",), 3, "inc"),
        Observation("flotilla_requests_in_flight", ("m",), 1, "dec"),
        Observation("flotilla_nope", (), 1),  # unknown metric
        Observation("flotilla_requests_total", ("m",), 1),  # wrong label count
        Observation("flotilla_requests_total", ("m", "i", "x"), 5, "set"),  # counters cannot be set
    ])
    text = generate_latest(registry.registry).decode()
    assert rejected == 3
    assert 'flotilla_requests_total{model="m",outcome="completed",slo_class="interactive"} 2.0' in text
    assert 'flotilla_ttft_seconds_bucket{le="0.5",model="m",slo_class="interactive"} 1.0' in text
    assert 'flotilla_requests_in_flight{model="m"} 2.0' in text
    assert "_created" not in text


def test_the_buffer_sums_increments_and_keeps_samples():
    batches = []
    buffer = ObservationBuffer(batches.append, max_samples=2)
    for _ in range(100):
        buffer.inc("flotilla_requests_total", ("m", "i", "completed"))
    for value in (0.1, 0.2, 0.3):
        buffer.observe("flotilla_ttft_seconds", ("m", "i"), value)
    assert buffer.flush() == 3
    [batch] = batches
    assert Observation("flotilla_requests_total", ("m", "i", "completed"), 100.0, "inc") in batch
    assert [o.value for o in batch if o.op == "observe"] == [0.2, 0.3] and buffer.dropped == 1
    assert buffer.flush() == 0 and len(batches) == 1  # nothing new: nothing sent


def test_the_markdown_table_lists_every_metric():
    table = markdown_table()
    assert all(f"`{m.name}`" in table for m in METRICS)
