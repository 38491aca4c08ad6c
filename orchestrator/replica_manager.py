"""Keeps each pool at its desired number of replicas and watches their health.

One `update()` per controller tick: poll every started replica's stats (in parallel,
bounded by `stats_timeout_s`), then start or drain replicas until each pool matches
its target, then stop drained replicas once they are empty. Starting a replica is a
background task, so a slow model load never stalls the tick.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Protocol

from actors.engines.base import EngineStats
from actors.replica import ReplicaInfo
from actors.replica_client import ReplicaClient, ReplicaPlacement, ReplicaUnavailable
from actors.replica_spec import ReplicaSpec, replica_actor_name
from orchestrator.config import FleetConfig, PoolConfig
from orchestrator.errors import Conflict, Invalid, NotFound
from orchestrator.fault_log import FaultLog
from orchestrator.fleet_state import FleetState, ReplicaRecord
from orchestrator.replica_health import Health, judge
from policies.fleet_view import ReplicaState
from policies.restart_backoff import PoolRestarts, after_failure, launch_gate

log = logging.getLogger(__name__)


class ReplicaHandle(Protocol):
    """What the manager needs of a replica; `ReplicaClient` in production, a fake in tests."""

    replica_id: str

    async def start(self, timeout_s: float) -> ReplicaInfo: ...
    async def stats(self, timeout_s: float) -> EngineStats: ...
    async def shutdown(self, timeout_s: float = 30.0) -> None: ...
    def kill(self) -> None: ...


Launcher = Callable[[ReplicaSpec, ReplicaPlacement], ReplicaHandle]
Attacher = Callable[[str], ReplicaHandle]  # a replica id -> a handle on its live actor, or ReplicaUnavailable


def ray_launcher(namespace: str) -> Launcher:
    return lambda spec, placement: ReplicaClient.create(spec, namespace, placement)


def ray_attacher(namespace: str) -> Attacher:
    return lambda replica_id: ReplicaClient.lookup(replica_id, namespace)


def ray_replica_discovery(namespace: str) -> Callable[[], list[str]]:
    """Ids of the replica actors alive in the fleet's namespace, whoever started them."""

    def discover() -> list[str]:
        import ray

        prefix = replica_actor_name("")
        return [a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == namespace and a["name"].startswith(prefix)]

    return discover


def pool_of(replica_id: str) -> str:
    """Replica ids are `<pool>-<8 hex digits>` (see `ReplicaManager._launch`)."""
    return replica_id.rsplit("-", 1)[0]


def placement_for(pool: PoolConfig, avoid_nodes: tuple[str, ...] = ()) -> ReplicaPlacement:
    """GPU pools land on their GPU type through Ray's `accelerator_type:<TYPE>` resource;
    cordoned nodes are kept out with a label selector on Ray's `ray.io/node-id` label."""
    env = tuple(sorted(pool.env.items()))
    selector = (("ray.io/node-id", f"!in({','.join(avoid_nodes)})"),) if avoid_nodes else ()
    if pool.gpus_per_replica == 0:
        return ReplicaPlacement(num_cpus=1.0, env=env, label_selector=selector)
    return ReplicaPlacement(
        num_cpus=0.0,
        num_gpus=float(pool.gpus_per_replica),
        resources=((f"accelerator_type:{pool.gpu_type}", 0.001),),
        env=env,
        label_selector=selector,
    )


def spec_for(config: FleetConfig, pool: PoolConfig, replica_id: str) -> ReplicaSpec:
    model = config.model(pool.model)
    assert model is not None, "FleetConfig validation guarantees every pool's model exists"
    return ReplicaSpec(
        replica_id=replica_id,
        pool=pool.name,
        model=model.name,
        gpu_type=pool.gpu_type,
        engine=pool.engine,
        arch=model.transformer_spec(),
        tokenizer=model.tokenizer_spec,
        model_path=str(model.resolved_path) if model.path else None,
        max_model_len=model.max_model_len,
        block_size=model.block_size,
        max_queue=pool.max_queue,
        engine_args=dict(pool.engine_args),
        power_backend=config.power.backend,
    )


class ReplicaManager:
    def __init__(self, config: FleetConfig, state: FleetState, launcher: Launcher, clock: Callable[[], float],
                 attacher: Attacher | None = None, faults: FaultLog | None = None):
        self.config = config
        self.state = state
        self.launcher = launcher
        self.attacher = attacher
        self.clock = clock
        self.faults = faults
        self.desired: dict[str, int] = {p.name: p.replicas for p in config.pools}
        self.handles: dict[str, ReplicaHandle] = {}
        self.restarts: dict[str, PoolRestarts] = {p.name: PoolRestarts() for p in config.pools}
        self.held_back: dict[str, str] = {}  # pool -> why its missing replicas are not started now
        self._starting: dict[str, asyncio.Task] = {}

    async def update(self) -> None:
        now = self.clock()
        await self._poll(now)
        for pool in self.config.pools:
            self._scale(pool, now)
        await self._finish_drains(now)
        for replica_id in self.state.forget_ended(now):
            self.handles.pop(replica_id, None)

    def adopt(self, replica_id: str) -> ReplicaRecord | None:
        """Take back a replica a former controller started (its start is idempotent); None if its pool is gone."""
        pool = self.config.pool(pool_of(replica_id))
        if pool is None or self.state.get(replica_id) is not None or self.attacher is None:
            return None
        record = ReplicaRecord(spec=spec_for(self.config, pool, replica_id), created_at=self.clock())
        self.state.add(record)
        try:
            self.handles[replica_id] = self.attacher(replica_id)
        except ReplicaUnavailable as e:
            reason = f"gone while the controller was away: {e}"
            record.mark_dead(self.clock(), reason)
            if self.faults is not None:  # nobody saw it die, but it did: the fault log must say so
                self.faults.report("replica", replica_id, "died", reason)
            return record
        self._starting[replica_id] = asyncio.get_running_loop().create_task(self._start(record, adopted=True))
        return record

    def set_desired(self, pool: str, replicas: int) -> None:
        cfg = self.config.pool(pool)
        if cfg is None:
            raise NotFound(f"no pool named {pool!r}")
        if not cfg.min_replicas <= replicas <= cfg.max_replicas:
            raise Invalid(f"pool {pool}: {replicas} replicas is outside [{cfg.min_replicas}, {cfg.max_replicas}]",
                          code="out_of_bounds")
        self.desired[pool] = replicas

    def drain(self, replica_id: str, replace: bool) -> ReplicaRecord:
        """Stop sending it requests and stop it once empty; `replace` keeps its pool's size."""
        record = self.state.get(replica_id)
        if record is None or record.state.terminal:
            raise NotFound(f"no live replica {replica_id!r}")
        if record.state not in (ReplicaState.READY, ReplicaState.UNHEALTHY):
            raise Conflict(f"replica {replica_id} is {record.state.value}, not ready",
                           code=f"replica_{record.state.value}")
        if not replace:
            self.set_desired(record.pool, self.desired[record.pool] - 1)
        record.mark_draining()
        return record

    def ready(self) -> bool:
        """Every pool has its desired number of READY replicas."""
        return all(
            sum(r.state is ReplicaState.READY for r in self.state.in_pool(pool)) >= n
            for pool, n in self.desired.items()
        )

    async def stop_all(self) -> None:
        for task in self._starting.values():
            task.cancel()
        for record in list(self.state.live()):
            handle = self.handles.get(record.replica_id)
            if handle is not None:
                handle.kill()
            record.mark_stopped(self.clock(), "fleet shut down")

    # observe --------------------------------------------------------------------------

    async def _poll(self, now: float) -> None:
        records = [r for r in self.state.live() if r.serving]
        results = await asyncio.gather(*(self._poll_one(r) for r in records), return_exceptions=True)
        for record, result in zip(records, results):
            verdict = judge(record, result, now, self.config.recovery)
            if verdict.health is Health.RECOVERED:
                record.mark_recovered()
            elif verdict.health is Health.UNHEALTHY:
                log.warning("replica %s unhealthy: %s", record.replica_id, verdict.detail)
                record.mark_unhealthy(now)
            elif verdict.health is Health.DEAD:
                self.declare_dead(record, now, verdict.detail, cause=verdict.cause)

    async def _poll_one(self, record: ReplicaRecord) -> EngineStats:
        return await self.handles[record.replica_id].stats(self.config.controller.stats_timeout_s)

    def declare_dead(self, record: ReplicaRecord, now: float, reason: str, cause: str = "died") -> None:
        """Record the death (killing the actor, so its clients' streams break and resume elsewhere).

        `cause` "node_died" is the node's fault, reported by the node manager, and does
        not count against the pool's restart budget.
        """
        log.warning("replica %s dead (%s): %s", record.replica_id, cause, reason)
        affected = tuple(r.request_id for r in record.stats.requests) if record.stats else ()
        record.mark_dead(now, reason)
        handle = self.handles.get(record.replica_id)
        if handle is not None:
            handle.kill()
        if cause != "node_died":
            self.restarts[record.pool] = after_failure(self.restarts[record.pool], now, self.config.recovery.backoff())
            if self.faults is not None:
                self.faults.report("replica", record.replica_id, cause, reason, affected)

    # act ------------------------------------------------------------------------------

    def _scale(self, pool: PoolConfig, now: float) -> None:
        active = [r for r in self.state.in_pool(pool.name) if r.state is not ReplicaState.DRAINING]
        missing = self.desired[pool.name] - len(active)
        gate = launch_gate(self.restarts[pool.name], now)
        if missing > 0 and not gate.allowed:
            self.held_back[pool.name] = f"{gate.reason}; next try in {gate.retry_at - now:.0f}s"
            missing = 0
        else:
            self.held_back.pop(pool.name, None)
        for _ in range(max(0, missing)):
            self._launch(pool, now)
        if missing < 0:
            for record in self._scale_in_victims(active, -missing):
                self._retire(record, now)

    def _launch(self, pool: PoolConfig, now: float) -> None:
        replica_id = f"{pool.name}-{uuid.uuid4().hex[:8]}"
        spec = spec_for(self.config, pool, replica_id)
        record = ReplicaRecord(spec=spec, created_at=now)
        self.state.add(record)
        self.handles[replica_id] = self.launcher(spec, placement_for(pool, self.state.cordoned_nodes()))
        self._starting[replica_id] = asyncio.get_running_loop().create_task(self._start(record))

    async def _start(self, record: ReplicaRecord, adopted: bool = False) -> None:
        """Start a replica (re-adopted: attach to it again); once ready, it mends a fault of its pool."""
        handle = self.handles[record.replica_id]
        try:
            info = await handle.start(self.config.controller.replica_start_timeout_s)
        except Exception as e:  # noqa: BLE001 — any failure to start is this replica's death
            if record.state is ReplicaState.STARTING:
                self.declare_dead(record, self.clock(), f"failed to start: {e}", cause="failed_to_start")
        else:
            if record.state is ReplicaState.STARTING:
                record.mark_ready(info.node_id, self.clock())
                log.info("replica %s ready on node %s (%.1fs)", record.replica_id, info.node_id[:8], info.load_s)
                self._mend_a_fault(record, started_before=info.started_at if adopted else None)
        finally:
            self._starting.pop(record.replica_id, None)

    def _mend_a_fault(self, replacement: ReplicaRecord, started_before: float | None = None) -> None:
        """A new replica in a pool mends that pool's oldest open replica fault. A re-adopted one
        (`started_before`: when its engine started) mends only a fault detected before that: it was
        the fault's replacement, seen ready by the restarted controller; else it replaces nothing."""
        if self.faults is None:
            return
        open_faults = [f for f in self.faults.open_for_pool(replacement.pool)
                       if started_before is None or f.detected_at <= started_before]
        if open_faults:
            self.faults.recovered("replica", open_faults[0].target, replaced_by=replacement.replica_id)
            self.faults.metrics["flotilla_replica_restarts_total"].labels(replacement.pool).inc()

    @staticmethod
    def _scale_in_victims(active: list[ReplicaRecord], n: int) -> list[ReplicaRecord]:
        # starting replicas hold no requests; then the least loaded
        def load(r: ReplicaRecord) -> tuple[int, int, str]:
            busy = (r.stats.running + r.stats.waiting) if r.stats else 0
            return (r.state is not ReplicaState.STARTING, busy, r.replica_id)

        return sorted(active, key=load)[:n]

    def _retire(self, record: ReplicaRecord, now: float) -> None:
        if record.state is ReplicaState.STARTING:
            task = self._starting.pop(record.replica_id, None)
            if task:
                task.cancel()
            self.handles[record.replica_id].kill()
            record.mark_stopped(now, "scaled in before ready")
        else:
            record.mark_draining()

    async def _finish_drains(self, now: float) -> None:
        for record in [r for r in self.state.live() if r.state is ReplicaState.DRAINING]:
            if record.stats is not None and record.stats.running + record.stats.waiting == 0:
                handle = self.handles[record.replica_id]
                try:
                    await handle.shutdown(timeout_s=10.0)
                except ReplicaUnavailable:
                    pass  # it is going away either way
                handle.kill()
                record.mark_stopped(now, "drained")
