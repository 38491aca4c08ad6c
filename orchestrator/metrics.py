"""Every `flotilla_*` metric, defined once: name, kind, help text, labels, buckets.

The README's metrics table is generated from `METRICS` (`python -m orchestrator.metrics
--markdown`), and a test fails when it is stale. Dashboards may query only these
(plus Ray's own).

Where metrics are recorded and served: the controller owns one registry and serves it
on `controller.metrics_port`. Processes on the data path (the ingress) do not serve
their own; they buffer `Observation`s and ship them to the controller about once a
second (never a call per request), so Prometheus scrapes one target per fleet.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from orchestrator.periodic_flush import PeriodicFlush

disable_created_metrics()  # `*_created` series double the output and no dashboard reads them

Kind = Literal["counter", "gauge", "histogram"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TICK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

_REPLICA = ("replica", "pool", "gpu_type", "model")
_KVSTORE = ("store", "node")
_KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


METRICS: tuple[MetricSpec, ...] = (
    # requests, recorded by the ingress
    MetricSpec("flotilla_requests_total", "counter",
               "Requests that ended, by outcome (completed, client_aborted, rejected, invalid, failed).",
               ("model", "slo_class", "outcome")),
    MetricSpec("flotilla_requests_slo_met_total", "counter",
               "Completed requests that met both their SLO class's TTFT and TPOT targets.",
               ("model", "slo_class")),
    MetricSpec("flotilla_requests_in_flight", "gauge", "Accepted requests not yet ended.", ("model",)),
    MetricSpec("flotilla_ttft_seconds", "histogram", "Time to first token, seconds, as the client saw it.",
               ("model", "slo_class"), _LATENCY_BUCKETS),
    MetricSpec("flotilla_tpot_seconds", "histogram",
               "Mean time per output token after the first, seconds, per request.",
               ("model", "slo_class"), _TOKEN_BUCKETS),
    MetricSpec("flotilla_e2e_seconds", "histogram", "Request latency from arrival to last token, seconds.",
               ("model", "slo_class"), _LATENCY_BUCKETS),
    MetricSpec("flotilla_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", ("model",)),
    MetricSpec("flotilla_output_tokens_total", "counter", "Output tokens sent to clients.", ("model",)),
    # replicas, recorded by the controller from their reports
    MetricSpec("flotilla_replicas", "gauge", "Replicas by pool, GPU type and state.", ("pool", "gpu_type", "state")),
    MetricSpec("flotilla_replica_running_requests", "gauge", "Requests decoding on a replica.", _REPLICA),
    MetricSpec("flotilla_replica_queue_length", "gauge", "Requests waiting on a replica.", _REPLICA),
    MetricSpec("flotilla_replica_kv_usage_ratio", "gauge", "Fraction of a replica's KV blocks in use.", _REPLICA),
    MetricSpec("flotilla_replica_tokens_per_second", "gauge", "Output tokens per second of a replica.", _REPLICA),
    MetricSpec("flotilla_replica_batch_size", "gauge", "Sequences in a replica's last step.", _REPLICA),
    # control plane
    MetricSpec("flotilla_controller_tick_seconds", "histogram", "Duration of each manager's update in a tick.",
               ("manager",), _TICK_BUCKETS),
    MetricSpec("flotilla_controller_errors_total", "counter", "Manager updates that raised.", ("manager",)),
    MetricSpec("flotilla_fleet_view_version", "gauge", "Version of the fleet view last published to routers."),
    # migration
    MetricSpec("flotilla_migrations_total", "counter",
               "Migrations that ended, by why they started (manual, drain, balance, ...) and outcome "
               "(done, or the abort reason).", ("reason", "outcome")),
    MetricSpec("flotilla_migrations_in_flight", "gauge", "Migrations started and not yet switched or aborted."),
    MetricSpec("flotilla_migration_bytes_total", "counter", "KV bytes of the requests moved by migrations."),
    MetricSpec("flotilla_migration_downtime_seconds", "histogram",
               "The stall a migrated request's client saw: last token from the source to first from the target.",
               ("model",), _TOKEN_BUCKETS),
    # faults and recovery
    MetricSpec("flotilla_faults_total", "counter", "Faults detected, by component and cause.", ("component", "cause")),
    MetricSpec("flotilla_fault_recovery_seconds", "histogram",
               "From a fault's detection to its replacement being ready (a new replica, a restarted part).",
               ("component",), _LATENCY_BUCKETS),
    MetricSpec("flotilla_replica_restarts_total", "counter", "Replicas started to replace failed ones.", ("pool",)),
    MetricSpec("flotilla_recovered_requests_total", "counter",
               "Requests whose replica failed under them: resumed elsewhere, or failed after their retries.",
               ("outcome",)),
    MetricSpec("flotilla_recovery_seconds", "histogram",
               "The stall a resumed request's client saw: last token before the failure to first token after.",
               ("model",), _LATENCY_BUCKETS),
    MetricSpec("flotilla_pool_restarts_held_back", "gauge",
               "1 while a pool's replacements wait on backoff or an open circuit breaker.", ("pool",)),
    MetricSpec("flotilla_admin_mutations_total", "counter",
               "Mutating admin API calls, by route, caller role and HTTP status.", ("route", "role", "outcome")),
    # power, recorded by the controller's power manager every power control period
    MetricSpec("flotilla_gpu_power_watts", "gauge", "A replica GPU's average draw, watts, as last read.",
               ("replica", "gpu", "gpu_type", "node")),
    MetricSpec("flotilla_gpu_power_cap_watts", "gauge",
               "The power limit a replica GPU runs under, watts (its default limit when uncapped).",
               ("replica", "gpu", "gpu_type", "node")),
    MetricSpec("flotilla_power_budget_watts", "gauge",
               "A power budget, watts, by scope (cluster, row:<name>, node:<id>).", ("scope",)),
    MetricSpec("flotilla_power_capping_events_total", "counter",
               "Times a power budget's capping level rose (lock: clocks locked; cap: power limits).", ("level",)),
    # placement (the GPU mix), recorded by the controller's placement manager
    MetricSpec("flotilla_fleet_cost_per_hour", "gauge",
               "$/h of the GPUs the fleet's live replicas hold (starting, ready, draining), at the pools' prices."),
    MetricSpec("flotilla_planned_replicas", "gauge",
               "Replicas per GPU type in the latest periodic placement plan.", ("gpu_type",)),
    MetricSpec("flotilla_plan_changes_total", "counter",
               "Moves of the fleet to a new GPU mix, by trigger (cost, capacity, operator).", ("trigger",)),
    # KV-cache stores, recorded by the controller from their reports
    MetricSpec("flotilla_kvstore_capacity_bytes", "gauge", "A KV store's capacity, bytes, by tier (memory, disk).",
               _KVSTORE + ("tier",)),
    MetricSpec("flotilla_kvstore_used_bytes", "gauge", "Bytes of KV blocks a store holds, by tier (memory, disk).",
               _KVSTORE + ("tier",)),
    MetricSpec("flotilla_kvstore_blocks", "gauge", "KV blocks a store holds, by tier (memory, disk).",
               _KVSTORE + ("tier",)),
    MetricSpec("flotilla_kvstore_hits_total", "counter", "KV blocks a store served to a lookup.", _KVSTORE),
    MetricSpec("flotilla_kvstore_misses_total", "counter", "KV blocks asked of a store that it did not hold.",
               _KVSTORE),
    MetricSpec("flotilla_kvstore_evictions_total", "counter",
               "KV blocks a store evicted from memory (to its disk tier, or dropped).", _KVSTORE),
    MetricSpec("flotilla_kvstore_corrupt_blocks_total", "counter",
               "KV blocks dropped because a reader found them corrupt or lost (then recomputed).", _KVSTORE),
    MetricSpec("flotilla_kvstore_load_bytes_total", "counter", "KV bytes replicas loaded from a store and verified.",
               _KVSTORE),
    MetricSpec("flotilla_kvstore_save_bytes_total", "counter", "KV bytes replicas saved to a store.", _KVSTORE),
    MetricSpec("flotilla_kvstore_load_seconds", "histogram",
               "One load from a store as the replica saw it: lookup, transfer and verification, seconds.",
               _KVSTORE, _KV_BUCKETS),
    MetricSpec("flotilla_kvstore_save_seconds", "histogram",
               "One save to a store: the writer's copy into shared memory plus the store's indexing, seconds.",
               _KVSTORE, _KV_BUCKETS),
    MetricSpec("flotilla_kvstore_restarts_total", "counter", "KV stores started to replace dead ones.", ("node",)),
)

METRICS_BY_NAME = {m.name: m for m in METRICS}
_OPS = {"counter": ("inc",), "gauge": ("inc", "dec", "set"), "histogram": ("observe",)}


@dataclass(frozen=True)
class Observation:
    """One metric update, shipped from a data-path process to the controller.

    `op` is "inc" (counters, gauges), "dec" (gauges), "set" (gauges) or "observe"
    (histograms); `labels` are in the spec's label order.
    """

    name: str
    labels: tuple[str, ...]
    value: float
    op: Literal["inc", "dec", "set", "observe"] = "inc"


class MetricsRegistry:
    """The prometheus-client objects for `METRICS`, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._metrics = {spec.name: _make(spec, self.registry) for spec in METRICS}

    def __getitem__(self, name: str):
        return self._metrics[name]

    def apply(self, observations: Iterable[Observation]) -> int:
        """Apply shipped observations; unknown names or label counts are skipped, counted."""
        rejected = 0
        for o in observations:
            spec = METRICS_BY_NAME.get(o.name)
            if spec is None or len(o.labels) != len(spec.labels) or o.op not in _OPS[spec.kind]:
                rejected += 1
                continue
            metric = self._metrics[o.name]
            target = metric.labels(*o.labels) if spec.labels else metric
            getattr(target, o.op)(o.value)
        return rejected

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve `/metrics` on `port` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


class ObservationBuffer(PeriodicFlush):
    """Collects a data-path process's observations and ships them in batches.

    Increments to the same series are summed before shipping, so a batch stays small
    however many requests there were; histogram observations travel one by one, up to
    `max_samples` per batch (beyond that the oldest are dropped and counted).
    """

    def __init__(self, send: Callable[[tuple[Observation, ...]], None], interval_s: float = 1.0,
                 max_samples: int = 50_000):
        super().__init__()
        self.send = send
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.dropped = 0
        self._sums: dict[tuple[str, tuple[str, ...], str], float] = defaultdict(float)
        self._samples: list[Observation] = []

    def inc(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        self._sums[(name, labels, "inc")] += value

    def dec(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        self._sums[(name, labels, "dec")] += value

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        if len(self._samples) >= self.max_samples:
            self._samples.pop(0)
            self.dropped += 1
        self._samples.append(Observation(name, labels, value, "observe"))

    def flush(self) -> int:
        batch = tuple(Observation(n, labels, v, op) for (n, labels, op), v in self._sums.items()) + tuple(
            self._samples)
        self._sums.clear()
        self._samples = []
        if batch:
            self.send(batch)
        return len(batch)


def _make(spec: MetricSpec, registry: CollectorRegistry):
    # prometheus-client appends `_total` to counters itself
    name = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
    if spec.kind == "counter":
        return Counter(name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(name, spec.help, spec.labels, registry=registry)
    return Histogram(name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


def markdown_table() -> str:
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{m.name}` | {m.kind} | {', '.join(f'`{label}`' for label in m.labels) or '—'} | {m.help} |"
             for m in METRICS]
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


def readme_with_table(readme: str) -> str:
    """`readme` with the text between the metrics markers replaced by the current table."""
    head, _, rest = readme.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    if not rest:
        raise ValueError(f"README has no {README_BEGIN} ... {README_END} markers")
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Flotilla's metrics")
    parser.add_argument("--update-readme", metavar="PATH", help="rewrite the table in this README")
    args = parser.parse_args(argv)
    if args.update_readme:
        with open(args.update_readme) as f:
            text = readme_with_table(f.read())
        with open(args.update_readme, "w") as f:
            f.write(text)
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
