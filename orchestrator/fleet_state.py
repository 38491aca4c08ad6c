"""The controller's record of the fleet: replicas and their lifecycle.

The controller owns this state; everything else sees frozen snapshots of it
(`policies.fleet_view`). Each state change is one method that checks where the
replica starts from, so an impossible transition fails loudly instead of corrupting
the record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from actors.engines.base import EngineStats
from actors.replica_spec import ReplicaSpec
from policies.fleet_view import ReplicaState
from policies.power_model import UNCAPPED, GpuSetting


class InvalidTransition(RuntimeError):
    pass


@dataclass
class ReplicaRecord:
    """One replica as the controller knows it. Times are wall-clock seconds."""

    spec: ReplicaSpec
    created_at: float
    state: ReplicaState = ReplicaState.STARTING
    node_id: str = ""
    ready_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    stats: EngineStats | None = None
    last_seen: float | None = None
    missed_polls: int = 0
    progress_mark: int = -1  # output tokens it had emitted when progress was last seen
    progress_at: float = 0.0  # when that was (or when it last had nothing to do)
    unhealthy_since: float | None = None
    power_setting: GpuSetting = UNCAPPED  # what its GPUs run under, as the power manager last applied

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    @property
    def pool(self) -> str:
        return self.spec.pool

    @property
    def serving(self) -> bool:
        """Holds requests the fleet must keep track of."""
        return self.state in (ReplicaState.READY, ReplicaState.DRAINING, ReplicaState.UNHEALTHY)

    def _move(self, to: ReplicaState, *allowed_from: ReplicaState) -> None:
        if self.state not in allowed_from:
            raise InvalidTransition(f"replica {self.replica_id}: {self.state.value} -> {to.value} not allowed")
        self.state = to

    def mark_ready(self, node_id: str, now: float) -> None:
        self._move(ReplicaState.READY, ReplicaState.STARTING)
        self.node_id, self.ready_at, self.last_seen, self.progress_at = node_id, now, now, now

    def mark_draining(self) -> None:
        self._move(ReplicaState.DRAINING, ReplicaState.READY, ReplicaState.UNHEALTHY)

    def mark_unhealthy(self, now: float) -> None:
        self._move(ReplicaState.UNHEALTHY, ReplicaState.READY)
        self.unhealthy_since = now

    def mark_recovered(self) -> None:
        self._move(ReplicaState.READY, ReplicaState.UNHEALTHY)
        self.unhealthy_since = None

    def mark_stopped(self, now: float, reason: str) -> None:
        self._move(ReplicaState.STOPPED, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING,
                   ReplicaState.UNHEALTHY)
        self.ended_at, self.end_reason = now, reason

    def mark_dead(self, now: float, reason: str) -> None:
        self._move(ReplicaState.DEAD, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING,
                   ReplicaState.UNHEALTHY)
        self.ended_at, self.end_reason = now, reason

    def observe(self, stats: EngineStats, now: float) -> None:
        self.stats, self.last_seen, self.missed_polls = stats, now, 0


@dataclass(frozen=True)
class NodeObservation:
    """One Ray node as the cluster reports it."""

    node_id: str
    address: str
    alive: bool
    resources: tuple[tuple[str, float], ...]  # total resources, e.g. ("GPU", 8.0), ("accelerator_type:H100", 1.0)
    is_head: bool = False
    labels: tuple[tuple[str, str], ...] = ()  # Ray node labels, e.g. ("flotilla.io/power-row", "r1")

    @property
    def gpu_type(self) -> str | None:
        prefix = "accelerator_type:"
        return next((k.removeprefix(prefix) for k, _ in self.resources if k.startswith(prefix)), None)

    @property
    def gpus(self) -> int:
        return int(dict(self.resources).get("GPU", 0))


@dataclass
class NodeRecord:
    """A node as last observed."""

    observed: NodeObservation
    first_seen: float
    died_at: float | None = None

    @property
    def node_id(self) -> str:
        return self.observed.node_id

    @property
    def alive(self) -> bool:
        return self.observed.alive


@dataclass
class FleetState:
    """All replicas, live and recently ended (kept `retention_s` for the record), and all nodes."""

    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    cordoned: set[str] = field(default_factory=set)  # node ids no new replica may land on
    retention_s: float = 600.0

    def cordoned_nodes(self) -> tuple[str, ...]:
        return tuple(sorted(self.cordoned))

    def observe_nodes(self, observed: list[NodeObservation], now: float) -> list[str]:
        """Merge a cluster report; returns ids of nodes that died since the last one."""
        died = []
        for obs in observed:
            record = self.nodes.get(obs.node_id)
            if record is None:
                record = self.nodes[obs.node_id] = NodeRecord(obs, first_seen=now)
            elif record.alive and not obs.alive:
                died.append(obs.node_id)
            if not obs.alive and record.died_at is None:
                record.died_at = now
            record.observed = obs
        return died

    def add(self, record: ReplicaRecord) -> None:
        if record.replica_id in self.replicas:
            raise ValueError(f"replica {record.replica_id} already exists")
        self.replicas[record.replica_id] = record

    def get(self, replica_id: str) -> ReplicaRecord | None:
        return self.replicas.get(replica_id)

    def live(self) -> Iterator[ReplicaRecord]:
        return (r for r in self.replicas.values() if not r.state.terminal)

    def in_pool(self, pool: str) -> list[ReplicaRecord]:
        return [r for r in self.live() if r.pool == pool]

    def forget_ended(self, now: float) -> list[str]:
        """Drop ended replicas older than the retention window; returns their ids."""
        gone = [r.replica_id for r in self.replicas.values()
                if r.ended_at is not None and now - r.ended_at > self.retention_s]
        for replica_id in gone:
            del self.replicas[replica_id]
        return gone
