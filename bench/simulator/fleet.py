"""`SimFleet`: the GPU pools in virtual time, on the controller's own records.

Replicas live in an `orchestrator.fleet_state.FleetState`, moved through the same
`ReplicaRecord` transitions the live `ReplicaManager` makes, and each is built from the
`ReplicaSpec` the live controller would give it (`orchestrator.replica_manager.spec_for`
and `actors.engines.make_engine`). `reconcile` is the manager's update without Ray:
keep each pool at its desired size (a new replica is READY `start_s` after launch),
drain the victims it picks (`ReplicaManager._scale_in_victims`), stop drained ones
once their last poll shows them empty.

Nodes are `gpus_per_node` GPUs of one pool; a replica takes `gpus_per_replica` of one
node (at least one), replacements land where there is room, else on a new node. A dead
node never comes back. Cost and energy are counted per replica from launch to end:
`gpus x price_per_gpu_hour`, and per GPU what its steps drew under its power setting
(`policies.power_model`, recorded by `bench.simulator.power`), `idle_watts` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.engines import make_engine
from actors.engines.base import RequestSnapshot
from actors.engines.sim_core import Progress, SimScheduler
from actors.power import ActionOutcome, PowerState
from actors.replica_spec import ReplicaSpec
from bench.simulator.events import EventLoop, Priority
from bench.simulator.power import PowerKind, ReplicaPowerTimer
from bench.simulator.replica import SimulatedReplica
from orchestrator.config import FleetConfig, PoolConfig
from orchestrator.fleet_state import FleetState, ReplicaRecord
from orchestrator.replica_manager import ReplicaManager, spec_for
from orchestrator.view_builder import build_view
from policies.fleet_view import FleetView, ReplicaState
from policies.gpu_catalog import GPU_CATALOG
from policies.power_snapshot import PowerAction


@dataclass
class SimNode:
    node_id: str
    pool: str
    gpus: int
    used: int = 0
    alive: bool = True


@dataclass(frozen=True)
class PoolUsage:
    """What one pool cost over a run."""

    pool: str
    gpu_type: str
    gpu_hours: float
    cost_usd: float
    energy_j: float
    busy_fraction: float  # of its GPU time spent stepping


class SimFleet:
    def __init__(self, config: FleetConfig, loop: EventLoop,
                 on_progress: Callable[[SimulatedReplica, Progress], None], *,
                 start_s: float, gpus_per_node: int, unique_prompts: bool = False):
        self.config = config
        self.loop = loop
        # no two requests share a block name and nobody reads cached hashes (`SimScheduler.use_virtual_time`)
        self.unique_prompts = unique_prompts
        self.start_s = start_s
        self.gpus_per_node = gpus_per_node
        self.state = FleetState(retention_s=float("inf"))
        self.replicas: dict[str, SimulatedReplica] = {}  # every replica ever, ended ones too
        self.desired = {p.name: p.replicas for p in config.pools}
        self.nodes: dict[str, SimNode] = {}
        self.node_of: dict[str, str] = {}
        self._on_progress = on_progress
        self._launched = {p.name: 0 for p in config.pools}
        self._nodes_made = {p.name: 0 for p in config.pools}
        self._kinds: dict[tuple, PowerKind] = {}
        self._slo_classes = tuple(c.to_policy() for c in config.slo_classes)
        self._gpus = {p.name: p.gpus_per_replica for p in config.pools}

    def start(self) -> None:
        """Every pool's initial replicas, READY now (the run starts with a warm fleet)."""
        for pool in self.config.pools:
            for _ in range(pool.replicas):
                self._launch(pool, ready=True)

    # observe and reconcile (one control tick) ------------------------------------------

    def observe(self, cached_hashes: bool, with_requests: bool) -> None:
        """Poll every serving replica's stats into its record, as the controller does."""
        now = self.loop.now
        for record in self.state.live():
            if record.serving:
                record.observe(self.replicas[record.replica_id].stats(cached_hashes, with_requests), now)

    def reconcile(self) -> None:
        for pool in self.config.pools:
            self._scale(pool)
        for record in [r for r in self.state.live() if r.state is ReplicaState.DRAINING]:
            if record.stats is not None and record.stats.running + record.stats.waiting == 0:
                self._end(record, dead=False, reason="drained")

    def view(self, version: int) -> FleetView:
        return build_view(self.state, version, self.loop.now, self._slo_classes, self._gpus)

    def _scale(self, pool: PoolConfig) -> None:
        active = [r for r in self.state.in_pool(pool.name) if r.state is not ReplicaState.DRAINING]
        missing = self.desired[pool.name] - len(active)
        for _ in range(max(0, missing)):
            self._launch(pool, ready=False)
        if missing < 0:
            for record in ReplicaManager._scale_in_victims(active, -missing):
                if record.state is ReplicaState.STARTING:
                    self._end(record, dead=False, reason="scaled in before ready")
                else:
                    record.mark_draining()

    # act ---------------------------------------------------------------------------------

    def set_desired(self, pool: str, replicas: int) -> None:
        cfg = self.config.pool(pool)
        if cfg is None:
            raise KeyError(f"no pool named {pool!r}")
        if not cfg.min_replicas <= replicas <= cfg.max_replicas:
            raise ValueError(f"pool {pool}: {replicas} replicas is outside "
                             f"[{cfg.min_replicas}, {cfg.max_replicas}]")
        self.desired[pool] = replicas

    def drain(self, replica_id: str) -> None:
        self._record(replica_id).mark_draining()

    def kill_replica(self, replica_id: str, reason: str) -> tuple[RequestSnapshot, ...]:
        """The replica dies now; returns the requests it held, as the ingress finds them."""
        return self._end(self._record(replica_id), dead=True, reason=reason)

    def kill_node(self, node_id: str) -> dict[str, tuple[RequestSnapshot, ...]]:
        """The node dies now with every replica on it; their held requests by replica."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            raise KeyError(f"no live node named {node_id!r} (nodes: {sorted(self.nodes)})")
        on_node = [rid for rid, nid in self.node_of.items()
                   if nid == node_id and self.replicas[rid].alive]
        lost = {rid: self.kill_replica(rid, f"node {node_id} died") for rid in on_node}
        node.alive = False
        return lost

    def apply_power(self, replica_id: str, action: PowerAction) -> ActionOutcome:
        """A power action on a live replica's GPUs now; its record then carries the new
        setting, which the next published view's speeds follow."""
        replica = self.replicas[self._record(replica_id).replica_id]
        outcome = replica.apply_power(action)
        replica.record.power_setting = replica.power.setting
        return outcome

    def draw_w(self) -> float:
        """What every live replica's GPUs drew over the last control period, watts."""
        total = 0.0
        for record in self.state.live():
            replica = self.replicas[record.replica_id]
            replica.sync()
            total += self._gpus_of(record.pool) * replica.power.draw_w()
        return total

    def usage(self) -> tuple[PoolUsage, ...]:
        """Cost and energy per pool, from each replica's launch to its end (or now)."""
        rows = []
        for pool in self.config.pools:
            gpu = GPU_CATALOG[pool.gpu_type]
            gpus = max(1, pool.gpus_per_replica)
            life = busy = busy_j = 0.0
            for replica in self.replicas.values():
                if replica.record.pool == pool.name:
                    life += (replica.ended_at if replica.ended_at is not None else self.loop.now) - replica.created_at
                    busy += replica.busy_s
                    busy_j += replica.timer.busy_j
            energy = gpus * (busy_j + (life - busy) * gpu.idle_watts)
            rows.append(PoolUsage(pool.name, pool.gpu_type, gpus * life / 3600,
                                  gpus * life / 3600 * pool.price_per_hour, energy,
                                  busy / life if life > 0 else 0.0))
        return tuple(rows)

    # lifecycle ---------------------------------------------------------------------------

    def _launch(self, pool: PoolConfig, ready: bool) -> SimulatedReplica:
        replica_id = f"{pool.name}-{self._launched[pool.name]}"
        self._launched[pool.name] += 1
        spec = spec_for(self.config, pool, replica_id)
        record = ReplicaRecord(spec=spec, created_at=self.loop.now)
        self.state.add(record)
        core, timer = self._core(spec)
        replica = SimulatedReplica(record, core, self.loop, self._on_progress, timer)
        self.replicas[replica_id] = replica
        node = self._place(pool, replica_id)
        if ready:
            record.mark_ready(node, self.loop.now)
        else:
            self.loop.after(self.start_s, lambda: self._ready(record, node), Priority.CONTROL)
        return replica

    def _ready(self, record: ReplicaRecord, node_id: str) -> None:
        if record.state is ReplicaState.STARTING:
            record.mark_ready(node_id, self.loop.now)

    def _end(self, record: ReplicaRecord, dead: bool, reason: str) -> tuple[RequestSnapshot, ...]:
        snapshots = self.replicas[record.replica_id].end()
        if dead:
            record.mark_dead(self.loop.now, reason)
        else:
            record.mark_stopped(self.loop.now, reason)
        node = self.nodes[self.node_of[record.replica_id]]
        node.used -= self._gpus_of(record.pool)
        return snapshots

    def _core(self, spec: ReplicaSpec) -> tuple[SimScheduler, ReplicaPowerTimer]:
        """The scheduler a live replica of `spec` runs, switched to virtual time, stepping
        under its own GPUs' power state (its draw read as the average over the control
        period up to the simulation's present)."""
        engine = make_engine(spec)
        core, model = engine.core, engine.power.model
        key = (spec.gpu_type, spec.arch, spec.max_model_len)
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = PowerKind(model, spec.max_model_len)
        state = PowerState(model, clock=lambda: self.loop.now, window_s=self.config.controller.control_period_s)
        timer = ReplicaPowerTimer(kind, state, lambda: core.clock_s)
        core.use_virtual_time(timer, self.unique_prompts)
        return core, timer

    def _place(self, pool: PoolConfig, replica_id: str) -> str:
        need = self._gpus_of(pool.name)
        node = next((n for n in self.nodes.values() if n.pool == pool.name and n.alive
                     and n.gpus - n.used >= need), None)
        if node is None:
            node_id = f"{pool.name}-node-{self._nodes_made[pool.name]}"
            self._nodes_made[pool.name] += 1
            node = self.nodes[node_id] = SimNode(node_id, pool.name, max(self.gpus_per_node, need))
        node.used += need
        self.node_of[replica_id] = node.node_id
        return node.node_id

    def _gpus_of(self, pool: str) -> int:
        return max(1, self._gpus[pool])

    def _record(self, replica_id: str) -> ReplicaRecord:
        record = self.state.get(replica_id)
        if record is None or record.state.terminal:
            raise KeyError(f"no live replica named {replica_id!r}")
        return record

    @property
    def timers(self) -> tuple[PowerKind, ...]:
        """One per replica kind; `model_calls` counts their performance-model evaluations."""
        return tuple(self._kinds.values())
