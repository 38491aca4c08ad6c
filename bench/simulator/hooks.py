"""The control-loop hooks: where migration, placement, power and recovery plug in.

Every control tick the simulator does what the live `Controller.step()` does (poll
every replica's stats into the controller's `FleetState`, keep pools at their desired
size, publish a new `FleetView` to the router agents), then calls each installed hook
in order with a `Tick` (the view just published and the records behind it) and the
`Actions` it may take. Timeline events (faults, power events, operator actions) land
first in the simulator and are then handed to every hook's `on_event`.

A hook is a thin adapter: build the policy's frozen input from the tick, call the pure
policy in `policies/`, carry its decision out with `actions`. Adding a policy is one
class here (or in its own module) and one line in `HOOKS`, for example:

    class MigrationHook:
        observes_requests = True  # the policy reads each replica's requests
        def __init__(self, settings, fleet): self.policy = MigrationPolicy(**settings)
        def on_tick(self, tick, actions):
            for move in self.policy.decide(tick.view, tick.requests(), tick.now).moves:
                actions.migrate(move.request_id, move.to_replica)
        def on_event(self, event, tick, actions): pass

    HOOKS["migration"] = MigrationHook

and a scenario then lists `hooks: [{name: migration, settings: {...}}]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from actors.engines.base import RequestStatus
from orchestrator.config import FleetConfig
from orchestrator.fleet_state import FleetState
from policies.fleet_view import FleetView


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

    def migrate(self, request_id: str, to_replica: str) -> bool:
        """Move a running or waiting request to a READY replica; False if it cannot
        (request ended, destination full or not ready) and nothing moved."""

    def set_replicas(self, pool: str, replicas: int) -> None:
        """A pool's desired size; the fleet launches or drains replicas next tick.
        Raises ValueError outside the pool's [min_replicas, max_replicas]."""

    def drain(self, replica_id: str) -> None:
        """Stop sending a replica new requests; it stops once empty."""


class ControlHook(Protocol):
    observes_requests: bool  # polls then carry EngineStats.requests (costs O(requests) per tick)

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        """Decide and act at one control tick."""

    def on_event(self, event: Any, tick: Tick, actions: Actions) -> None:
        """React to a timeline event (`bench.simulator.scenario.TimelineEvent`) just applied."""


# name -> factory(settings, fleet config). Scenarios name hooks from here.
HookFactory = Callable[[Mapping[str, Any], FleetConfig], ControlHook]
HOOKS: dict[str, HookFactory] = {}
