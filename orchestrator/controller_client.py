"""`ControllerClient`: the only code that calls the controller actor through Ray."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config import FleetConfig
from orchestrator.controller_actor import ControllerActor
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
from orchestrator.metrics import Observation
from orchestrator.placement_status import PlacementReport
from orchestrator.power_status import BudgetStatus, PowerCapStatus, PowerStatus
from orchestrator.request_log import FinishedRequest
from orchestrator.store_manager import KVStoreStatus
from policies.fleet_view import FleetView

log = logging.getLogger(__name__)

CONTROLLER_NAME = "controller"


class ControllerUnavailable(RuntimeError):
    pass


class ControllerClient:
    def __init__(self, handle: Any):
        self._handle = handle

    @classmethod
    def get_or_create(cls, config: FleetConfig, replace_timeout_s: float = 60.0) -> ControllerClient:
        """Attach to the fleet's controller, creating it (detached, on the head node) if absent.

        A controller deployed with another config (a `serve deploy` or `helm upgrade` that
        changed it) is replaced: the new one takes back the live replicas and the cluster's
        state from the durable store, and applies the new config (see `Controller._restore`).
        """
        wanted = config.digest()
        deadline = time.monotonic() + replace_timeout_s
        while True:
            handle = cls._create(config)
            try:
                deployed = ray.get(handle.deploy_digest.remote(), timeout=30)
            except (GetTimeoutError, RayActorError):
                deployed = None  # the one being replaced, dying: look again
            if deployed == wanted:
                return cls(handle)
            if time.monotonic() > deadline:
                raise ControllerUnavailable(f"the controller deployed with config {deployed} did not make way "
                                            f"for config {wanted} within {replace_timeout_s:.0f}s")
            if deployed is not None:
                log.info("the controller runs config %s; replacing it with %s", deployed, wanted)
                ray.kill(handle, no_restart=True)
            time.sleep(0.5)

    @staticmethod
    def _create(config: FleetConfig):
        return ray.remote(ControllerActor).options(
            name=CONTROLLER_NAME,
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(_head_node_id(), soft=True),
        ).remote(config.model_dump(mode="json"))

    @classmethod
    def lookup(cls, namespace: str) -> ControllerClient:
        try:
            return cls(ray.get_actor(CONTROLLER_NAME, namespace=namespace))
        except ValueError:
            raise ControllerUnavailable(f"no controller in namespace {namespace!r}") from None

    async def start(self, timeout_s: float = 30.0) -> None:
        await self._call(self._handle.start.remote(), timeout_s)

    def start_soon(self) -> None:
        """Start the reconcile loop without waiting (for synchronous constructors)."""
        self._handle.start.remote()

    async def wait_ready(self, timeout_s: float) -> bool:
        return await self._call(self._handle.wait_ready.remote(timeout_s), timeout_s + 30.0)

    async def fleet_view(self, timeout_s: float = 5.0) -> FleetView | None:
        return await self._call(self._handle.fleet_view.remote(), timeout_s)

    async def status(self, timeout_s: float = 5.0) -> FleetStatus:
        return await self._call(self._handle.status.remote(), timeout_s)

    async def in_flight(self, timeout_s: float = 5.0) -> tuple[InFlightRequest, ...]:
        return await self._call(self._handle.in_flight.remote(), timeout_s)

    async def kv_stores(self, timeout_s: float = 5.0) -> tuple[KVStoreStatus, ...]:
        return await self._call(self._handle.kv_stores.remote(), timeout_s)

    async def config(self, timeout_s: float = 5.0) -> FleetConfig:
        return await self._call(self._handle.current_config.remote(), timeout_s)

    async def drain_replica(self, replica_id: str, replace: bool, key: str | None = None) -> ReplicaStatus:
        return await self._call(self._handle.drain_replica.remote(replica_id, replace, key), 10.0)

    async def cordon_node(self, node_id: str, drain: bool, key: str | None = None) -> NodeStatus:
        return await self._call(self._handle.cordon_node.remote(node_id, drain, key), 10.0)

    async def uncordon_node(self, node_id: str, key: str | None = None) -> NodeStatus:
        return await self._call(self._handle.uncordon_node.remote(node_id, key), 10.0)

    async def scale_pool(self, pool: str, replicas: int, key: str | None = None) -> PoolStatus:
        return await self._call(self._handle.scale_pool.remote(pool, replicas, key), 10.0)

    async def migrate_request(self, request_id: str, target: str | None, key: str | None = None) -> MigrationView:
        return await self._call(self._handle.migrate_request.remote(request_id, target, key), 10.0)

    async def migrations(self, timeout_s: float = 5.0) -> tuple[MigrationView, ...]:
        return await self._call(self._handle.migrations.remote(), timeout_s)

    async def migration_plan(self, timeout_s: float = 5.0) -> MigrationPlanView:
        return await self._call(self._handle.migration_plan.remote(), timeout_s)

    async def faults(self, timeout_s: float = 5.0) -> tuple[FaultView, ...]:
        return await self._call(self._handle.faults.remote(), timeout_s)

    async def inject_fault(self, kind: str, target: str, key: str | None = None) -> str:
        return await self._call(self._handle.inject_fault.remote(kind, target, key), 15.0)

    async def update_settings(self, patch: dict[str, Any], key: str | None = None) -> FleetConfig:
        return await self._call(self._handle.update_settings.remote(patch, key), 10.0)

    async def power(self, timeout_s: float = 5.0) -> PowerStatus:
        return await self._call(self._handle.power.remote(), timeout_s)

    async def power_budget(self, timeout_s: float = 5.0) -> tuple[BudgetStatus, ...]:
        return await self._call(self._handle.power_budget.remote(), timeout_s)

    async def set_power_budget(self, kind: str, name: str, watts: float, key: str | None = None) -> BudgetStatus:
        return await self._call(self._handle.set_power_budget.remote(kind, name, watts, key), 10.0)

    async def set_power_cap(self, replica_id: str, watts: float | None, key: str | None = None) -> PowerCapStatus:
        return await self._call(self._handle.set_power_cap.remote(replica_id, watts, key), 10.0)

    async def placement_plan(self, rate_scale: float = 1.0, rates: tuple[tuple[str, int, int, float], ...] = (),
                             timeout_s: float = 60.0) -> PlacementReport:
        """A dry run of the placement (the solver may take up to `placement.solver_time_limit_s`)."""
        return await self._call(self._handle.placement_plan.remote(rate_scale, tuple(rates)), timeout_s)

    async def apply_placement(self, rate_scale: float = 1.0, key: str | None = None) -> PlacementReport:
        return await self._call(self._handle.apply_placement.remote(rate_scale, key), 60.0)

    async def router_ids(self, timeout_s: float = 5.0) -> list[str]:
        return await self._call(self._handle.router_ids.remote(), timeout_s)

    async def shutdown_fleet(self, timeout_s: float = 60.0) -> None:
        await self._call(self._handle.shutdown_fleet.remote(), timeout_s)

    def send_metrics(self, observations: Iterable[Observation]) -> None:
        """Fire and forget: losing one batch of observations costs accuracy, not availability."""
        self._handle.record_metrics.remote(tuple(observations))

    def send_requests(self, records: Iterable[FinishedRequest]) -> None:
        """Fire and forget, like the metrics: a lost batch costs the plan accuracy, not availability."""
        self._handle.record_requests.remote(tuple(records))

    def kill(self) -> None:
        try:
            ray.kill(self._handle, no_restart=True)
        except (RayActorError, ValueError):
            pass  # already gone

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except (TimeoutError, GetTimeoutError):
            raise ControllerUnavailable(f"controller gave no answer within {timeout_s:g}s") from None
        except RayActorError as e:
            raise ControllerUnavailable(str(e).splitlines()[0]) from None


def _head_node_id() -> str:
    head = next((n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    return head["NodeID"] if head else ray.get_runtime_context().get_node_id()
