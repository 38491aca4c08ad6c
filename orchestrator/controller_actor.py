"""The detached Ray actor that runs the `Controller`'s loop and answers the fleet's questions.

Only `orchestrator.controller_client.ControllerClient` calls it through Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from orchestrator.autoscaler import ray_resource_requester
from orchestrator.config import FleetConfig, parse_config
from orchestrator.controller import Controller
from orchestrator.durable_state import DurableState, GcsKeyValue
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
from orchestrator.idempotency import IdempotencyStore
from orchestrator.kube_sync import KubernetesSync
from orchestrator.metrics import MetricsRegistry, Observation
from orchestrator.node_manager import NodeSource, ray_node_source
from orchestrator.placement_manager import workload_override
from orchestrator.placement_status import PlacementReport
from orchestrator.power_status import BudgetStatus, PowerCapStatus, PowerStatus
from orchestrator.replica_manager import Launcher, ray_attacher, ray_launcher, ray_replica_discovery
from orchestrator.request_log import FinishedRequest
from orchestrator.router_manager import RouterLauncher, ray_router_launcher
from orchestrator.store_manager import KVStoreStatus, ray_store_launcher
from policies.fleet_view import FleetView

log = logging.getLogger(__name__)


class ControllerActor:
    """`launcher`, `router_launcher` and `node_source` default to Ray's; other ones let the
    same actor logic run in-process over fake replicas (the admin API's tests do)."""

    def __init__(self, config_data: dict[str, Any], *, launcher: Launcher | None = None,
                 router_launcher: RouterLauncher | None = None, node_source: NodeSource | None = None,
                 durable: DurableState | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = parse_config(config_data)
        namespace = self.config.namespace
        self.metrics = MetricsRegistry()
        self.metrics_error: str | None = None
        self.controller = Controller(
            self.config,
            launcher=launcher or ray_launcher(namespace),
            router_launcher=router_launcher or ray_router_launcher(namespace),
            node_source=node_source or ray_node_source,
            metrics=self.metrics,
            durable=durable or DurableState(GcsKeyValue(namespace), on_error=self._durable_write_failed),
            attacher=ray_attacher(namespace) if launcher is None else None,
            discover=ray_replica_discovery(namespace) if launcher is None else list,
            autoscaler=ray_resource_requester() if launcher is None else None,
            store_launcher=ray_store_launcher(namespace) if launcher is None else None,
            kube_sync=KubernetesSync.from_environment if launcher is None else None,
        )
        self.idempotency = IdempotencyStore(self.config.admin.idempotency_ttl_s, time.time)
        self._loop: asyncio.Task | None = None
        self._ready = asyncio.Event()
        port = self.config.controller.metrics_port
        if port:
            try:
                self.metrics.serve(port)
            except OSError as e:  # the fleet still serves; the operator sees why metrics are missing
                self.metrics_error = f"cannot serve metrics on port {port}: {e}"
                log.error(self.metrics_error)
        if launcher is None:
            # On Ray, a restarted controller is rebuilt from this constructor alone and nobody
            # calls start() again, so the loop starts here (Ray runs an async actor's
            # constructor inside its event loop).
            self._loop = asyncio.get_running_loop().create_task(self._run())

    @staticmethod
    def _durable_write_failed(error: Exception) -> None:
        log.warning("could not write the controller's durable state to the GCS: %s", error)

    def deploy_digest(self) -> str:
        """The fingerprint of the config this controller was deployed with (FleetConfig.digest)."""
        return self.controller.deploy_digest

    async def start(self) -> None:
        """Start the reconcile loop (idempotent)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every pool has its desired READY replicas and routers hold a view."""
        await self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def fleet_view(self) -> FleetView | None:
        return self.controller.view

    def status(self) -> FleetStatus:
        return self.controller.status()

    def in_flight(self) -> tuple[InFlightRequest, ...]:
        return self.controller.in_flight()

    def kv_stores(self) -> tuple[KVStoreStatus, ...]:
        return self.controller.kv_stores()

    def current_config(self) -> FleetConfig:
        """The config as it runs now, runtime changes included (`self.config` is the one it started with)."""
        return self.controller.config

    # Operator actions. `key` is the client's Idempotency-Key: a retry replays the first answer.

    def drain_replica(self, replica_id: str, replace: bool, key: str | None) -> ReplicaStatus:
        return self.idempotency.run(key, f"drain {replica_id} replace={replace}",
                                    lambda: self.controller.drain_replica(replica_id, replace))

    def cordon_node(self, node_id: str, drain: bool, key: str | None) -> NodeStatus:
        return self.idempotency.run(key, f"cordon {node_id} drain={drain}",
                                    lambda: self.controller.cordon_node(node_id, drain))

    def uncordon_node(self, node_id: str, key: str | None) -> NodeStatus:
        return self.idempotency.run(key, f"uncordon {node_id}", lambda: self.controller.uncordon_node(node_id))

    def scale_pool(self, pool: str, replicas: int, key: str | None) -> PoolStatus:
        return self.idempotency.run(key, f"scale {pool} {replicas}",
                                    lambda: self.controller.scale_pool(pool, replicas))

    def migrate_request(self, request_id: str, target: str | None, key: str | None) -> MigrationView:
        return self.idempotency.run(key, f"migrate {request_id} to {target}",
                                    lambda: self.controller.migrate_request(request_id, target))

    def migrations(self) -> tuple[MigrationView, ...]:
        return self.controller.recent_migrations()

    def migration_plan(self) -> MigrationPlanView:
        return self.controller.migration_plan

    def faults(self) -> tuple[FaultView, ...]:
        return self.controller.recent_faults()

    async def inject_fault(self, kind: str, target: str, key: str | None) -> str:
        return await self.idempotency.run_async(key, f"inject {kind} {target}",
                                                lambda: self.controller.inject_fault(kind, target))

    def update_settings(self, patch: dict[str, Any], key: str | None) -> FleetConfig:
        return self.idempotency.run(key, f"settings {sorted(patch.items())!r}",
                                    lambda: self.controller.update_settings(patch))

    def power(self) -> PowerStatus:
        return self.controller.power.status()

    def power_budget(self) -> tuple[BudgetStatus, ...]:
        return self.controller.power.budget_status()

    def set_power_budget(self, kind: str, name: str, watts: float, key: str | None) -> BudgetStatus:
        return self.idempotency.run(key, f"power budget {kind}:{name} {watts:g}",
                                    lambda: self.controller.power.set_budget(kind, name, watts))

    def set_power_cap(self, replica_id: str, watts: float | None, key: str | None) -> PowerCapStatus:
        """Pin a replica's GPUs to `watts` each; None unpins."""
        return self.idempotency.run(key, f"power cap {replica_id} {watts}",
                                    lambda: self.controller.power.pin(replica_id, watts))

    async def placement_plan(self, rate_scale: float, rates: tuple[tuple[str, int, int, float], ...]
                             ) -> PlacementReport:
        """A dry run: the plan for the observed workload (or a what-if one: `rates` of
        (model, prompt tokens, output tokens, req/s), all times `rate_scale`)."""
        return await self.controller.placement.dry_run(workload_override(rate_scale, rates))

    async def apply_placement(self, rate_scale: float, key: str | None) -> PlacementReport:
        """Move the fleet to the plan now (dwell and hysteresis skipped)."""
        return await self.idempotency.run_async(
            key, f"placement apply rate_scale={rate_scale:g}",
            lambda: self.controller.placement.apply(workload_override(rate_scale)))

    def router_ids(self) -> list[str]:
        return list(self.controller.routers.agent_ids)

    def record_metrics(self, observations: Iterable[Observation]) -> int:
        return self.metrics.apply(observations)

    def record_requests(self, records: Iterable[FinishedRequest]) -> None:
        """Finished requests an ingress shipped, for placement's workload window."""
        self.controller.placement.record(records)

    async def shutdown_fleet(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        await self.controller.replicas.stop_all()
        for handle in self.controller.routers.handles.values():
            handle.kill()

    async def _run(self) -> None:
        # the tick honours the power period too (the power manager acts at most once per its own)
        period = min(self.config.controller.control_period_s, self.config.power.control_period_s)
        while True:
            await self.controller.step()
            if self.controller.replicas.ready() and self.controller.view is not None:
                self._ready.set()
            await asyncio.sleep(period)
