"""The controller: a reconcile loop over the fleet (observe → decide → act).

`Controller` is plain Python driven one `step()` at a time, so unit tests run it with
fake actor handles and a fake clock; `orchestrator.controller_actor` runs it inside a
detached Ray actor. Each manager's update is isolated: one raising is logged, counted
and timed, and the others still run. Operator actions (drain, cordon, scale, settings)
are methods that change the target; the next tick carries them out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from orchestrator.autoscaler import ResourceRequester
from orchestrator.config import FleetConfig
from orchestrator.durable_state import ControllerMemory, DurableState
from orchestrator.errors import Invalid, NotFound
from orchestrator.fault_log import FaultLog
from orchestrator.fleet_state import FleetState, NodeObservation, NodeRecord, ReplicaRecord
from orchestrator.fleet_status import (
    FaultView,
    FleetStatus,
    InFlightRequest,
    MigrationPlanView,
    MigrationView,
    NodeStatus,
    PoolStatus,
    ReplicaStatus,
)
from orchestrator.kube_sync import KubernetesSync
from orchestrator.metrics import MetricsRegistry
from orchestrator.migration_manager import MigrationManager
from orchestrator.migration_record import MigrationRecord
from orchestrator.node_manager import NodeManager, NodeSource
from orchestrator.placement_manager import PlacementManager
from orchestrator.power_manager import PowerManager
from orchestrator.replica_manager import Attacher, Launcher, ReplicaManager
from orchestrator.router_manager import RouterLauncher, RouterManager
from orchestrator.settings_patch import apply_patch, merge_patch
from orchestrator.store_manager import KVStoreStatus, StoreLauncher, StoreManager
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


class Controller:
    def __init__(
        self,
        config: FleetConfig,
        *,
        launcher: Launcher,
        router_launcher: RouterLauncher,
        node_source: NodeSource = list,
        clock: Callable[[], float] = time.time,
        metrics: MetricsRegistry | None = None,
        durable: DurableState | None = None,
        attacher: Attacher | None = None,
        discover: Callable[[], list[str]] = list,
        autoscaler: ResourceRequester | None = None,  # None: no cluster autoscaler to ask for nodes
        store_launcher: StoreLauncher | None = None,  # None: no KV-cache stores, whatever the config
        # in a pod of the chart: mirrors cordons and pool sizes onto Kubernetes (orchestrator.kube_sync)
        kube_sync: Callable[[FleetState, Callable[[], Mapping[str, int]]], KubernetesSync | None] | None = None,
    ):
        self.config = config
        self.clock = clock
        self.metrics = metrics or MetricsRegistry()
        self.state = FleetState()
        self.durable = durable
        self.discover = discover  # ids of replica actors alive in the cluster, whoever started them
        self.settings_patch: dict[str, Any] = {}  # every runtime change so far, merged
        self.deploy_digest = config.digest()  # of the config as deployed, before runtime changes
        self._rolling: set[str] = set()  # replicas of a pool the redeploy changed: drained once ready
        self._restored = False
        self._remembered: ControllerMemory | None = None
        self.faults = FaultLog(self.metrics, clock, store=durable.store if durable else None)
        self.stores = StoreManager(config, self.state, store_launcher, self.metrics, clock, self.faults)
        self.replicas = ReplicaManager(config, self.state, self.stores.replica_launcher(launcher), clock, attacher,
                                       self.faults)
        self.nodes = NodeManager(self.state, self.replicas, node_source, clock)
        self.routers = RouterManager(config, router_launcher, self.faults)
        self.migrations = MigrationManager(config, self.state, lambda rid: self.replicas.handles[rid],
                                           self.metrics, clock)
        self.power = PowerManager(config, self.state, self.replicas.handles.get, self.metrics, clock,
                                  durable.store if durable else None)
        self.placement = PlacementManager(config, self.state, self.replicas, self.metrics, clock, autoscaler)
        self.kube = kube_sync(self.state, lambda: dict(self.replicas.desired)) if kube_sync else None
        self.view: FleetView | None = None
        self.migration_plan = MigrationPlanView(None, 0, 0, ())
        self._exported: dict[str, tuple[str, ...]] = {}  # replica id -> labels of its gauge series
        self._managers: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("nodes", self.nodes.update),
            ("stores", self.stores.update),  # after the nodes (one store each), before publishing (the index)
            ("replicas", self.replicas.update),
            ("rollout", self._roll),  # replicas of pools a redeploy changed
            ("power", self.power.update),  # after the poll (priorities), before publishing (speeds)
            ("placement", self.placement.update),  # after the poll (readiness), before publishing (drains)
            ("publish", self._publish),
            ("migrations", self._migrate),
            ("metrics", self._export_metrics),
        )
        if self.kube is not None:
            self._managers += (("kubernetes", self.kube.update),)

    async def step(self) -> None:
        """One reconcile tick."""
        if not self._restored:
            self._restore()
        for name, update in self._managers:
            began = time.perf_counter()
            try:
                await update()
            except Exception:
                log.exception("controller manager %s failed", name)
                self.metrics["flotilla_controller_errors_total"].labels(name).inc()
            finally:
                self.metrics["flotilla_controller_tick_seconds"].labels(name).observe(time.perf_counter() - began)
        self._remember()

    # surviving a restart ---------------------------------------------------------------

    def _restore(self) -> None:
        """Take back a former controller's intent and live replicas (the first tick after a restart)."""
        self._restored = True
        try:
            memory = self.durable.load() if self.durable else None
        except Exception:  # noqa: BLE001 — an unreadable memory means starting fresh, loudly
            log.exception("could not read the controller's durable state; starting from the config")
            memory = None
        redeployed = memory is not None and memory.deploy_digest not in ("", self.deploy_digest)
        if memory is not None and not redeployed:
            self.faults.restore()
            self.faults.report("controller", "controller", "restarted",
                               f"re-adopting {len(memory.replicas)} replicas from the durable state")
            self.faults.recovered("controller", "controller")
            if memory.settings_patch:
                self._apply_settings(memory.settings_patch)
            for pool, n in memory.desired.items():
                cfg = self.config.pool(pool)
                if cfg is not None:
                    self.replicas.desired[pool] = min(max(n, cfg.min_replicas), cfg.max_replicas)
        if memory is not None:
            if redeployed:  # the new config decides sizes and settings; the cluster's state stays
                self.faults.restore()
                log.info("deployed with a changed config: pool sizes and settings from it, runtime changes dropped")
            self.state.cordoned.update(memory.cordoned)
            for node_id in memory.nodes:  # as the former controller last saw them: alive
                self.state.nodes[node_id] = NodeRecord(NodeObservation(node_id, "", True, ()), self.clock())
        known = set(memory.replicas) if memory else set()
        candidates = sorted(known | set(self.discover()))
        adopted = [r for r in candidates if self.replicas.adopt(r) is not None]
        if adopted:
            log.info("re-adopted %d replicas of a former controller: %s", len(adopted), ", ".join(adopted))
        if redeployed:
            self._retire_after_redeploy(memory, [r for r in candidates if r not in adopted])

    def _retire_after_redeploy(self, memory: ControllerMemory, unadopted: list[str]) -> None:
        """Stop the replicas of pools the new config removed; roll those of pools it changed
        (each is drained once ready, and its pool starts a replacement from the new config)."""
        for replica_id in unadopted if self.replicas.attacher is not None else ():
            if memory.replicas.get(replica_id) and self.config.pool(memory.replicas[replica_id]) is None:
                try:
                    self.replicas.attacher(replica_id).kill()
                    log.info("stopped replica %s: its pool is gone from the config", replica_id)
                except Exception as e:  # noqa: BLE001 — already gone is as good
                    log.info("replica %s of a removed pool: %s", replica_id, e)
        changed = {p.name for p in self.config.pools
                   if memory.pool_digests.get(p.name) not in (None, self.config.pool_digest(p.name))}
        self._rolling = {r.replica_id for r in self.state.live() if r.pool in changed}
        if self._rolling:
            log.info("rolling %d replicas of changed pools %s", len(self._rolling), ", ".join(sorted(changed)))

    async def _roll(self) -> None:
        """Drain, once ready, each replica a redeploy changed; its pool replaces it."""
        for replica_id in sorted(self._rolling):
            record = self.state.get(replica_id)
            if record is None or record.state.terminal:
                self._rolling.discard(replica_id)
            elif record.state is ReplicaState.READY:
                self.replicas.drain(replica_id, replace=True)
                self._rolling.discard(replica_id)

    def _persist(self) -> None:
        if self._restored:  # before its first tick, the memory is still the former controller's
            self._remember()

    def _remember(self) -> None:
        """Write the intent that must survive a restart, when it changed."""
        if self.durable is None:
            return
        memory = ControllerMemory(
            desired=dict(self.replicas.desired),
            cordoned=sorted(self.state.cordoned),
            settings_patch=self.settings_patch,
            replicas={r.replica_id: r.pool for r in self.state.live()},
            nodes=sorted(n.node_id for n in self.state.nodes.values() if n.alive),
            deploy_digest=self.deploy_digest,
            pool_digests={p.name: self.config.pool_digest(p.name) for p in self.config.pools},
        )
        if memory != self._remembered:
            self.durable.save(memory)
            self._remembered = memory

    # operator actions -----------------------------------------------------------------

    # Each action that changes the intent keeps it at once (`_persist`), not at the end of the
    # tick: a controller dying in between would come back without the operator's change.

    def drain_replica(self, replica_id: str, replace: bool = True) -> ReplicaStatus:
        record = self.replicas.drain(replica_id, replace)
        self._persist()
        return self._replica_status(record)

    def cordon_node(self, node_id: str, drain: bool = False) -> NodeStatus:
        node = self.nodes.cordon(node_id, drain)
        self._persist()
        return self._node_status(node)

    def uncordon_node(self, node_id: str) -> NodeStatus:
        node = self.nodes.uncordon(node_id)
        self._persist()
        return self._node_status(node)

    def scale_pool(self, pool: str, replicas: int) -> PoolStatus:
        self.replicas.set_desired(pool, replicas)
        self._persist()
        return next(p for p in self.status().pools if p.name == pool)

    def migrate_request(self, request_id: str, target: str | None = None) -> MigrationView:
        return _migration_view(self.migrations.start(request_id, target, reason="manual"))

    def recent_migrations(self) -> tuple[MigrationView, ...]:
        records = [*self.migrations.recent, *self.migrations.active.values()]
        return tuple(_migration_view(m) for m in sorted(records, key=lambda m: m.created_at))

    def recent_faults(self) -> tuple[FaultView, ...]:
        return tuple(FaultView(f.fault_id, f.component, f.target, f.cause, f.detail, f.detected_at,
                               f.affected_requests, f.recovered_at, f.recovery_s, f.replaced_by)
                     for f in self.faults.records)

    async def inject_fault(self, kind: str, target: str) -> str:
        """An operator's drill: break something on purpose; detection and recovery do the rest."""
        if kind in ("kill_replica", "hang_replica"):
            record = self.state.get(target)
            if record is None or not record.serving:
                raise NotFound(f"no serving replica {target!r}")
            handle = self.replicas.handles[target]
            if kind == "kill_replica":
                handle.kill()
                return f"killed replica {target}"
            await handle.pause()
            return f"replica {target} makes no progress from now on (its engine is paused)"
        if kind == "kill_router":
            if target not in self.routers.handles:
                raise NotFound(f"no router agent {target!r} (agents: {', '.join(self.routers.agent_ids)})")
            self.routers.handles[target].crash()
            return f"crashed router agent {target}; Ray restarts it"
        raise Invalid(f"unknown fault kind {kind!r}", code="unknown_fault")

    def update_settings(self, patch: Mapping[str, Any]) -> FleetConfig:
        """Apply a runtime settings patch (see `orchestrator.settings_patch`) and keep it."""
        config = self._apply_settings(patch)
        self._persist()
        return config

    def _apply_settings(self, patch: Mapping[str, Any]) -> FleetConfig:
        if not patch:
            return self.config
        self.config = apply_patch(self.config, patch)
        self.settings_patch = merge_patch(self.settings_patch, patch)
        self.replicas.config = self.migrations.config = self.placement.config = self.config
        self.routers.reconfigure(self.config)
        return self.config

    # observation ----------------------------------------------------------------------

    def kv_stores(self) -> tuple[KVStoreStatus, ...]:
        """Every node's KV-cache store, as of its last report."""
        return self.stores.status()

    def in_flight(self) -> tuple[InFlightRequest, ...]:
        """Every request the replicas hold, as of their last report."""
        return tuple(
            InFlightRequest(r.replica_id, request)
            for r in self.state.live() if r.stats is not None
            for request in r.stats.requests
        )

    def status(self) -> FleetStatus:
        pools = []
        for p in self.config.pools:
            ready = sum(r.state is ReplicaState.READY for r in self.state.in_pool(p.name))
            pools.append(PoolStatus(p.name, p.gpu_type, p.model, p.engine, self.replicas.desired[p.name],
                                    p.min_replicas, p.max_replicas, ready,
                                    ready * max(1, p.gpus_per_replica) * p.price_per_hour,
                                    self.replicas.held_back.get(p.name, "")))
        return FleetStatus(
            view_version=self.view.version if self.view else 0,
            pools=tuple(pools),
            nodes=tuple(self._node_status(n) for n in sorted(self.state.nodes.values(), key=lambda n: n.node_id)),
            replicas=tuple(self._replica_status(r) for r in sorted(self.state.replicas.values(),
                                                                   key=lambda r: r.replica_id)),
            router_failures=tuple(f"{a}: {e}" for a, e in self.routers.failures.items()),
        )

    def _replica_status(self, r: ReplicaRecord) -> ReplicaStatus:
        s = r.stats
        return ReplicaStatus(
            r.replica_id, r.pool, r.spec.gpu_type, r.spec.model, r.spec.engine, r.state.value, r.node_id,
            s.running if s else 0, s.waiting if s else 0, s.kv_usage if s else 0.0, s.tokens_per_s if s else 0.0,
            r.created_at, r.end_reason,
        )

    def _node_status(self, n: NodeRecord) -> NodeStatus:
        o = n.observed
        replicas = tuple(sorted(r.replica_id for r in self.state.live() if r.node_id == n.node_id))
        return NodeStatus(n.node_id, o.address, o.gpu_type, o.gpus, o.alive, n.node_id in self.state.cordoned,
                          o.is_head, replicas)

    # managers -------------------------------------------------------------------------

    async def _publish(self) -> None:
        version = self.view.version + 1 if self.view else 1
        slo_classes = tuple(c.to_policy() for c in self.config.slo_classes)
        gpus = {p.name: p.gpus_per_replica for p in self.config.pools}
        self.view = dataclasses.replace(build_view(self.state, version, self.clock(), slo_classes, gpus),
                                        stores=self.stores.snapshots(),
                                        store_hit_weight=self.config.kv_store.store_hit_weight)
        await self.routers.publish(self.view)

    async def _migrate(self) -> None:
        """Drain draining replicas, keep headroom, defragment and balance: the policy's plan, carried out."""
        if self.view is not None:
            plan = self.migrations.plan(self.view)
            started = self.migrations.carry_out(plan)
            self.migration_plan = MigrationPlanView(self.clock(), len(plan.decisions), started, plan.notes)

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
        m["flotilla_migrations_in_flight"].set(len(self.migrations.active))
        for pool in self.config.pools:
            m["flotilla_pool_restarts_held_back"].labels(pool.name).set(int(pool.name in self.replicas.held_back))


def _migration_view(m: MigrationRecord) -> MigrationView:
    return MigrationView(
        m.migration_id, m.request_id, m.source, m.target, m.reason, m.state.value, m.queued, m.est_bytes,
        m.created_at, tuple((r.context_tokens, r.reused_tokens, r.seconds) for r in m.rounds), m.switched_at,
        m.ended_at, m.abort_reason.value if m.abort_reason else None, m.detail,
    )
