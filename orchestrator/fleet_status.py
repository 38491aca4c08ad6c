"""What the controller reports of the fleet: the one snapshot that the admin API, the CLI,
the tests and the dashboards' numbers all read. Frozen; units in the field comments."""

from __future__ import annotations

from dataclasses import dataclass

from actors.engines.base import RequestStatus


@dataclass(frozen=True)
class PoolStatus:
    name: str
    gpu_type: str
    model: str
    engine: str
    desired: int
    min_replicas: int
    max_replicas: int
    ready: int
    price_per_hour: float  # $/h of the pool's ready replicas' GPUs
    held_back: str = ""  # why missing replicas are not being started (backoff, open circuit)


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    gpu_type: str | None
    gpus: int
    alive: bool
    cordoned: bool
    is_head: bool
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    pool: str
    gpu_type: str
    model: str
    engine: str
    state: str
    node_id: str
    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks in use
    tokens_per_s: float
    created_at: float  # wall-clock seconds
    end_reason: str


@dataclass(frozen=True)
class InFlightRequest:
    replica_id: str
    request: RequestStatus


@dataclass(frozen=True)
class FleetStatus:
    view_version: int
    pools: tuple[PoolStatus, ...]
    nodes: tuple[NodeStatus, ...]
    replicas: tuple[ReplicaStatus, ...]
    router_failures: tuple[str, ...]

    @property
    def cost_per_hour(self) -> float:
        return sum(p.price_per_hour for p in self.pools)


@dataclass(frozen=True)
class MigrationView:
    """A migration in flight or recently ended, with its stages' timings (wall-clock seconds)."""

    migration_id: str
    request_id: str
    source: str
    target: str
    reason: str
    state: str
    queued: bool
    est_bytes: int
    created_at: float
    precopy_rounds: tuple[tuple[int, int, float], ...]  # (context tokens, tokens already there, seconds)
    switched_at: float | None
    ended_at: float | None
    abort_reason: str | None
    detail: str


@dataclass(frozen=True)
class MigrationPlanView:
    """The migration policy's latest plan: when it was made, the moves it wanted and how many
    started, and why wanted moves were not made (a drain held up, protected headroom still
    short, queued requests that fit nowhere, a bound that refused a copy)."""

    planned_at: float | None  # wall-clock seconds; None before the controller's first plan
    moves_planned: int
    moves_started: int  # the rest were skipped: the fleet changed under the view (see the log)
    notes: tuple[str, ...]


@dataclass(frozen=True)
class FaultView:
    fault_id: str
    component: str
    target: str
    cause: str
    detail: str
    detected_at: float  # wall-clock seconds
    affected_requests: tuple[str, ...]
    recovered_at: float | None
    recovery_s: float | None  # detection to replacement ready
    replaced_by: str | None
