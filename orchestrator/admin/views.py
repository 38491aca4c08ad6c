"""Read models of the admin API built from the controller's `FleetStatus`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from orchestrator.config import FleetConfig
from orchestrator.fleet_status import FleetStatus, InFlightRequest, PoolStatus


@dataclass(frozen=True)
class ModelSummary:
    name: str
    pools: tuple[str, ...]
    engines: tuple[str, ...]
    ready_replicas: int


@dataclass(frozen=True)
class FleetSummary:
    view_version: int
    cost_per_hour: float  # $/h of the GPUs of ready replicas
    replicas_by_state: dict[str, int]
    nodes: int
    nodes_cordoned: int
    requests_in_flight: int
    pools: tuple[PoolStatus, ...]
    models: tuple[ModelSummary, ...]
    router_failures: tuple[str, ...]


@dataclass(frozen=True)
class RequestView:
    request_id: str
    replica_id: str
    priority: int
    slo_class: str
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    running: bool
    age_s: float  # seconds since the replica took it

    @classmethod
    def of(cls, r: InFlightRequest, now: float) -> RequestView:
        q = r.request
        return cls(q.request_id, r.replica_id, q.priority, q.slo_class, q.prompt_tokens, q.output_tokens,
                   q.max_tokens, q.running, max(0.0, now - q.arrived_at))


def summarize(status: FleetStatus, in_flight: tuple[InFlightRequest, ...]) -> FleetSummary:
    live = [r for r in status.replicas if r.state not in ("stopped", "dead")]
    models = {}
    for p in status.pools:
        m = models.setdefault(p.model, {"pools": [], "engines": set(), "ready": 0})
        m["pools"].append(p.name)
        m["engines"].add(p.engine)
        m["ready"] += p.ready
    return FleetSummary(
        view_version=status.view_version,
        cost_per_hour=status.cost_per_hour,
        replicas_by_state=dict(Counter(r.state for r in live)),
        nodes=sum(n.alive for n in status.nodes),
        nodes_cordoned=sum(n.cordoned for n in status.nodes if n.alive),
        requests_in_flight=len(in_flight),
        pools=status.pools,
        models=tuple(ModelSummary(name, tuple(m["pools"]), tuple(sorted(m["engines"])), m["ready"])
                     for name, m in models.items()),
        router_failures=status.router_failures,
    )


def redacted(config: FleetConfig) -> dict[str, Any]:
    """The config as JSON, with admin tokens and API keys masked."""
    data = config.model_dump(mode="json")
    for token in data["admin"]["tokens"]:
        token["token"] = "***"
    data["server"]["api_keys"] = ["***" for _ in data["server"]["api_keys"]]
    return data
