"""The control-loop hooks: where migration, placement, power and recovery plug in.

Every control tick the simulator does what the live `Controller.step()` does (poll
every replica's stats into the controller's `FleetState`, keep pools at their desired
size, publish a new `FleetView` to the router agents), then calls each installed hook
in order with a `Tick` (the view just published and the records behind it) and the
`Actions` it may take. Timeline events (faults, power events, operator actions) land
first in the simulator and are then handed to every hook's `on_event`.

A hook is a thin adapter: build the policy's frozen input from the tick, call the pure
policy in `policies/`, carry its decision out with `actions`. Adding a policy is one
class in its own module, registered in `HOOKS` by name and imported in the package's
`__init__` (`bench.simulator.migration` and `bench.simulator.power_hook` are two, about
60 lines each); a scenario then lists `hooks: [{name: migration, settings: {...}}]`.
The shape of one:

    class MigrationHook:
        observes_requests = True  # polls carry each replica's requests (tick.requests())
        def __init__(self, settings, fleet_config): ...
        def on_tick(self, tick, actions):
            for decision in plan_migrations(tick.view, ...).decisions:
                actions.migrate(decision.request_id, decision.target)
        def on_event(self, event, tick, actions): ...

    HOOKS["migration"] = MigrationHook
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from actors.engines.base import RequestStatus
from actors.power import ActionOutcome, PowerReading
from orchestrator.config import FleetConfig
from orchestrator.fleet_state import FleetState
from policies.fleet_view import FleetView
from policies.power_snapshot import PowerAction


@dataclass(frozen=True)
class Tick:
    """What a hook sees at one control tick (virtual seconds). Read-only by contract."""

    now: float
    view: FleetView  # as just published to the router agents
    state: FleetState  # the controller's records: ReplicaRecord.stats is each replica's last poll
    config: FleetConfig

    def requests(self) -> Mapping[str, tuple[RequestStatus, ...]]:
        """Requests each serving replica holds, from its poll (`EngineStats.requests`);
        filled only when an installed hook `observes_requests`."""
        return {r.replica_id: r.stats.requests for r in self.state.live()
                if r.serving and r.stats is not None}


class Actions(Protocol):
    """What a hook can do to the simulated fleet. Each takes effect now."""

    def migrate(self, request_id: str, to_replica: str, copy_s: float | None = None) -> bool:
        """Move a running or waiting request to a READY replica; False if it cannot
        (request ended, destination full or not ready) and nothing moved. With `copy_s`,
        a running request's KV is copied for that long first (see `SimIngress.migrate`)."""

    def set_replicas(self, pool: str, replicas: int) -> None:
        """A pool's desired size; the fleet launches or drains replicas next tick.
        Raises ValueError outside the pool's [min_replicas, max_replicas]."""

    def drain(self, replica_id: str) -> None:
        """Stop sending a replica new requests; it stops once empty."""

    def read_power(self, replica_id: str) -> tuple[PowerReading, ...]:
        """A serving replica's GPUs now: draw over the last control period, limit, clocks."""

    def apply_power(self, action: PowerAction) -> ActionOutcome:
        """Carry out a power action on a live replica's GPUs; its steps slow from the next on."""


class ControlHook(Protocol):
    observes_requests: bool  # polls then carry EngineStats.requests (costs O(requests) per tick)

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        """Decide and act at one control tick."""

    def on_event(self, event: Any, tick: Tick, actions: Actions) -> None:
        """React to a timeline event (`bench.simulator.scenario.TimelineEvent`) just applied."""


# name -> factory(settings, fleet config). Scenarios name hooks from here.
HookFactory = Callable[[Mapping[str, Any], FleetConfig], ControlHook]
HOOKS: dict[str, HookFactory] = {}
