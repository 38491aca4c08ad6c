"""The power hook: the live controller's power loop (`orchestrator.power_manager`) in
virtual time, over the simulated replicas' GPUs.

At most once per `power.control_period_s` (it runs on control ticks) it reads every
serving replica's GPUs, builds the policy's snapshot exactly as the live manager does
(`orchestrator.power_inputs`: draw summed over a replica's GPUs, priority from the SLO
classes of the requests it holds, the setting read back from the GPUs), decides with
`policies.power.decide` and applies the actions through the replicas. A failed action
shows in the next period's readings, and the diff asks for it again.

Settings override the fleet's `power` section (`{cluster_budget_w: 9100}`). Timeline
power events change the cluster budget (`budget_watts`) or pin a pool's GPUs to a cap
(`pool`, `cap_watts`) from then on, as an operator's `PUT` would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.simulator.hooks import HOOKS, Actions, Tick
from orchestrator.config import FleetConfig, PowerConfig
from orchestrator.fleet_state import ReplicaRecord
from orchestrator.power_inputs import group_setting, priority_of, replica_power, row_of
from policies.power import PowerBudget, PowerControlState, PowerDecision, PowerSnapshot, ReplicaPower, decide

_EPS = 1e-9


class PowerHook:
    observes_requests = True  # priorities come from the SLO classes of the requests held

    def __init__(self, settings: Mapping[str, Any], config: FleetConfig):
        power = PowerConfig.model_validate(config.power.model_dump() | dict(settings))
        self.config = config.model_copy(update={"power": power})
        self.params = power.policy_params()
        self.budgets = {(b.kind, b.name): b.watts for b in power.budgets()}
        self.pool_caps: dict[str, float] = {}  # pool -> watts per GPU, pinned by power events
        self.decision: PowerDecision | None = None
        self.decided_at: float | None = None
        self.escalations: list[tuple[float, str, str]] = []  # (time, budget scope, level) each time one rose
        self._memory = PowerControlState()

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        if self.decided_at is not None and tick.now - self.decided_at < self.params.control_period_s - _EPS:
            return
        inputs = tuple(self._input(r, tick, actions) for r in tick.state.live() if r.serving)
        budgets = tuple(PowerBudget(kind, name, watts) for (kind, name), watts in sorted(self.budgets.items()))
        decision = decide(PowerSnapshot(tick.now, inputs, budgets, self.params, self._memory))
        for action in decision.actions:
            actions.apply_power(action)
        self._record(decision, tick.now)

    def on_event(self, event: Any, tick: Tick, actions: Actions) -> None:
        power = event.power
        if power is None:
            return
        if power.budget_watts is not None:
            self.budgets[("cluster", "")] = power.budget_watts
        if power.pool is not None and power.cap_watts is not None:
            self.pool_caps[power.pool] = power.cap_watts
        self.decided_at = None  # act on it at the next tick

    def _input(self, record: ReplicaRecord, tick: Tick, actions: Actions) -> ReplicaPower:
        readings = actions.read_power(record.replica_id)
        pool = self.config.pool(record.pool)
        return replica_power(record, readings, None, setting=group_setting(readings),
                             gpus=pool.gpus_per_replica if pool else 1,
                             priority=priority_of(record, self.config),
                             row=row_of(tick.state, record.node_id, self.config.power.row_label),
                             pinned_limit_w=self.pool_caps.get(record.pool))

    def _record(self, decision: PowerDecision, now: float) -> None:
        before = {s.key: (s.level, s.depth) for s in self.decision.scopes} if self.decision else {}
        for scope in decision.scopes:
            if (scope.level, scope.depth) > before.get(scope.key, (0, 0)):
                self.escalations.append((now, scope.key, scope.level.name.lower()))
        self.decision, self._memory, self.decided_at = decision, decision.state, now


HOOKS["power"] = PowerHook
