"""What the admin API needs from the control plane.

In production that is the controller actor through `ControllerClient` (which has
exactly these methods); `LocalBackend` serves the same calls from a `ControllerActor`
object in this process, for tests that exercise the API against a real controller
driven with fake replicas.
"""

from __future__ import annotations

from typing import Any, Protocol

from orchestrator.config import FleetConfig
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
from orchestrator.placement_status import PlacementReport
from orchestrator.power_status import BudgetStatus, PowerCapStatus, PowerStatus
from orchestrator.store_manager import KVStoreStatus


class AdminBackend(Protocol):
    async def status(self) -> FleetStatus: ...
    async def in_flight(self) -> tuple[InFlightRequest, ...]: ...
    async def kv_stores(self) -> tuple[KVStoreStatus, ...]: ...
    async def config(self) -> FleetConfig: ...
    async def drain_replica(self, replica_id: str, replace: bool, key: str | None = None) -> ReplicaStatus: ...
    async def cordon_node(self, node_id: str, drain: bool, key: str | None = None) -> NodeStatus: ...
    async def uncordon_node(self, node_id: str, key: str | None = None) -> NodeStatus: ...
    async def scale_pool(self, pool: str, replicas: int, key: str | None = None) -> PoolStatus: ...
    async def migrate_request(self, request_id: str, target: str | None, key: str | None = None) -> MigrationView: ...
    async def migrations(self) -> tuple[MigrationView, ...]: ...
    async def migration_plan(self) -> MigrationPlanView: ...
    async def faults(self) -> tuple[FaultView, ...]: ...
    async def inject_fault(self, kind: str, target: str, key: str | None = None) -> str: ...
    async def update_settings(self, patch: dict[str, Any], key: str | None = None) -> FleetConfig: ...
    async def power(self) -> PowerStatus: ...
    async def power_budget(self) -> tuple[BudgetStatus, ...]: ...
    async def set_power_budget(self, kind: str, name: str, watts: float, key: str | None = None) -> BudgetStatus: ...
    async def set_power_cap(self, replica_id: str, watts: float | None, key: str | None = None) -> PowerCapStatus: ...
    async def placement_plan(self, rate_scale: float = 1.0,
                             rates: tuple[tuple[str, int, int, float], ...] = ()) -> PlacementReport: ...
    async def apply_placement(self, rate_scale: float = 1.0, key: str | None = None) -> PlacementReport: ...


class LocalBackend:
    """The admin calls on a `ControllerActor` object living in this process."""

    def __init__(self, actor: Any):
        self.actor = actor

    async def status(self) -> FleetStatus:
        return self.actor.status()

    async def in_flight(self) -> tuple[InFlightRequest, ...]:
        return self.actor.in_flight()

    async def kv_stores(self) -> tuple[KVStoreStatus, ...]:
        return self.actor.kv_stores()

    async def config(self) -> FleetConfig:
        return self.actor.current_config()

    async def drain_replica(self, replica_id: str, replace: bool, key: str | None = None) -> ReplicaStatus:
        return self.actor.drain_replica(replica_id, replace, key)

    async def cordon_node(self, node_id: str, drain: bool, key: str | None = None) -> NodeStatus:
        return self.actor.cordon_node(node_id, drain, key)

    async def uncordon_node(self, node_id: str, key: str | None = None) -> NodeStatus:
        return self.actor.uncordon_node(node_id, key)

    async def scale_pool(self, pool: str, replicas: int, key: str | None = None) -> PoolStatus:
        return self.actor.scale_pool(pool, replicas, key)

    async def migrate_request(self, request_id: str, target: str | None, key: str | None = None) -> MigrationView:
        return self.actor.migrate_request(request_id, target, key)

    async def migrations(self) -> tuple[MigrationView, ...]:
        return self.actor.migrations()

    async def migration_plan(self) -> MigrationPlanView:
        return self.actor.migration_plan()

    async def faults(self) -> tuple[FaultView, ...]:
        return self.actor.faults()

    async def inject_fault(self, kind: str, target: str, key: str | None = None) -> str:
        return await self.actor.inject_fault(kind, target, key)

    async def update_settings(self, patch: dict[str, Any], key: str | None = None) -> FleetConfig:
        return self.actor.update_settings(patch, key)

    async def power(self) -> PowerStatus:
        return self.actor.power()

    async def power_budget(self) -> tuple[BudgetStatus, ...]:
        return self.actor.power_budget()

    async def set_power_budget(self, kind: str, name: str, watts: float, key: str | None = None) -> BudgetStatus:
        return self.actor.set_power_budget(kind, name, watts, key)

    async def set_power_cap(self, replica_id: str, watts: float | None, key: str | None = None) -> PowerCapStatus:
        return self.actor.set_power_cap(replica_id, watts, key)

    async def placement_plan(self, rate_scale: float = 1.0,
                             rates: tuple[tuple[str, int, int, float], ...] = ()) -> PlacementReport:
        return await self.actor.placement_plan(rate_scale, rates)

    async def apply_placement(self, rate_scale: float = 1.0, key: str | None = None) -> PlacementReport:
        return await self.actor.apply_placement(rate_scale, key)
