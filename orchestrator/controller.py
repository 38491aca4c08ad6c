"""The controller: a reconcile loop over the fleet (observe → decide → act).

`Controller` is plain Python driven one `step()` at a time, so unit tests run it with
fake actor handles and a fake clock; `orchestrator.controller_actor` runs it inside a
detached Ray actor. Each manager's update is isolated: one raising is logged, counted
and timed, and the others still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator.config import FleetConfig
from orchestrator.fleet_state import FleetState
from orchestrator.metrics import MetricsRegistry
from orchestrator.replica_manager import Launcher, ReplicaManager
from orchestrator.router_manager import RouterLauncher, RouterManager
from orchestrator.view_builder import build_view
from policies.fleet_view import FleetView, ReplicaState

log = logging.getLogger(__name__)

_REPLICA_GAUGES = (
    "flotilla_replica_running_requests",
    "flotilla_replica_queue_length",
    "flotilla_replica_kv_usage_ratio",
    "flotilla_replica_tokens_per_second",
    "flotilla_replica_batch_size",
)


@dataclass(frozen=True)
class PoolStatus:
    name: str
    gpu_type: str
    model: str
    engine: str
    desired: int
    ready: int
    price_per_hour: float  # $/h of the pool's ready replicas' GPUs


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    pool: str
    gpu_type: str
    model: str
    state: str
    node_id: str
    running: int
    waiting: int
    kv_usage: float
    tokens_per_s: float


@dataclass(frozen=True)
class FleetStatus:
    view_version: int
    pools: tuple[PoolStatus, ...]
    replicas: tuple[ReplicaStatus, ...]
    router_failures: tuple[str, ...]


class Controller:
    def __init__(
        self,
        config: FleetConfig,
        *,
        launcher: Launcher,
        router_launcher: RouterLauncher,
        clock: Callable[[], float] = time.time,
        metrics: MetricsRegistry | None = None,
    ):
        self.config = config
        self.clock = clock
        self.metrics = metrics or MetricsRegistry()
        self.state = FleetState()
        self.replicas = ReplicaManager(config, self.state, launcher, clock)
        self.routers = RouterManager(config, router_launcher)
        self.view: FleetView | None = None
        self._slo_classes = tuple(c.to_policy() for c in config.slo_classes)
        self._gpus = {p.name: p.gpus_per_replica for p in config.pools}
        self._exported: dict[str, tuple[str, ...]] = {}  # replica id -> labels of its gauge series
        self._managers: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("replicas", self.replicas.update),
            ("publish", self._publish),
            ("metrics", self._export_metrics),
        )

    async def step(self) -> None:
        """One reconcile tick."""
        for name, update in self._managers:
            began = time.perf_counter()
            try:
                await update()
            except Exception:
                log.exception("controller manager %s failed", name)
                self.metrics["flotilla_controller_errors_total"].labels(name).inc()
            finally:
                self.metrics["flotilla_controller_tick_seconds"].labels(name).observe(time.perf_counter() - began)

    async def _publish(self) -> None:
        version = self.view.version + 1 if self.view else 1
        self.view = build_view(self.state, version, self.clock(), self._slo_classes, self._gpus)
        await self.routers.publish(self.view)

    async def _export_metrics(self) -> None:
        m = self.metrics
        counts: dict[tuple[str, str, str], int] = {
            (p.name, p.gpu_type, s.value): 0 for p in self.config.pools for s in ReplicaState if not s.terminal
        }
        for r in self.state.live():
            counts[(r.pool, r.spec.gpu_type, r.state.value)] += 1
        for labels, n in counts.items():
            m["flotilla_replicas"].labels(*labels).set(n)
        exported: dict[str, tuple[str, ...]] = {}
        for r in self.state.live():
            if r.stats is None:
                continue
            labels = exported[r.replica_id] = (r.replica_id, r.pool, r.spec.gpu_type, r.spec.model)
            m["flotilla_replica_running_requests"].labels(*labels).set(r.stats.running)
            m["flotilla_replica_queue_length"].labels(*labels).set(r.stats.waiting)
            m["flotilla_replica_kv_usage_ratio"].labels(*labels).set(r.stats.kv_usage)
            m["flotilla_replica_tokens_per_second"].labels(*labels).set(r.stats.tokens_per_s)
            m["flotilla_replica_batch_size"].labels(*labels).set(r.stats.batch_size)
        for replica_id in self._exported.keys() - exported.keys():  # ended: drop their series
            for name in _REPLICA_GAUGES:
                m[name].remove(*self._exported[replica_id])
        self._exported = exported
        m["flotilla_fleet_view_version"].set(self.view.version if self.view else 0)

    def status(self) -> FleetStatus:
        pools = []
        for p in self.config.pools:
            members = self.state.in_pool(p.name)
            ready = sum(r.state is ReplicaState.READY for r in members)
            pools.append(PoolStatus(p.name, p.gpu_type, p.model, p.engine, self.replicas.desired[p.name], ready,
                                    ready * max(1, p.gpus_per_replica) * p.price_per_hour))
        replicas = tuple(
            ReplicaStatus(
                r.replica_id, r.pool, r.spec.gpu_type, r.spec.model, r.state.value, r.node_id,
                r.stats.running if r.stats else 0, r.stats.waiting if r.stats else 0,
                r.stats.kv_usage if r.stats else 0.0, r.stats.tokens_per_s if r.stats else 0.0,
            )
            for r in sorted(self.state.replicas.values(), key=lambda r: r.replica_id)
        )
        return FleetStatus(self.view.version if self.view else 0, tuple(pools), replicas,
                           tuple(f"{a}: {e}" for a, e in self.routers.failures.items()))
