"""Keeps the fleet under its power budgets while it runs more GPUs than the budgets could
feed at full power (after POLCA; the policy is `policies.power.decide`).

One control period: read every serving replica's GPU power (in parallel, each call
bounded by the period), build one `ReplicaPower` per replica (`orchestrator.power_inputs`),
decide, apply the actions through the replicas (each replica's in order, replicas in
parallel), then record what was applied and export it. A replica whose read fails keeps
its last reading, which the policy stops trusting after `stale_after_s` (no news is not
headroom). A failed action leaves the recorded setting as it was, so the next period's
diff asks for it again.

The period. `update()` runs in the controller's tick (after the replica manager's poll,
whose requests set priorities, and before the fleet view is published, whose speeds
follow the caps) and acts at most once per `power.control_period_s`; the controller
actor ticks at the shorter of its own and the power period. One loop keeps decisions
ordered with the records they read, and a controller stepped by hand (unit tests, the
simulator) controls power the same way. The price: a tick stalled by a slow stats poll
(bounded by `controller.stats_timeout_s`) delays a power period by as much.

Operator overrides (budgets, pinned caps) are kept in the controller's durable store
under their own key, so a restarted controller keeps defending the budget it was given.
Units: watts, MHz, seconds (the controller's clock).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from actors.power import ActionOutcome, PowerCapabilities, PowerReading
from orchestrator.config import FleetConfig
from orchestrator.durable_state import KeyValue
from orchestrator.errors import Conflict, Invalid, NotFound
from orchestrator.fleet_state import FleetState, ReplicaRecord
from orchestrator.metrics import MetricsRegistry
from orchestrator.power_inputs import after, group_setting, priority_of, replica_power, row_of
from orchestrator.power_status import BudgetStatus, GpuPowerStatus, PowerCapStatus, PowerStatus
from policies.power import (
    PowerAction,
    PowerBudget,
    PowerControlState,
    PowerDecision,
    PowerSnapshot,
    ReplicaPower,
    budget_problem,
    decide,
    limit_problem,
)
from policies.power_model import UNCAPPED, GpuSetting

log = logging.getLogger(__name__)

_EPS = 1e-9
STORE_KEY = "power"  # the operator's budgets and pins, in the controller's durable store


class PowerHandle(Protocol):
    """What the manager needs of a replica; `ReplicaClient` in production, a fake in tests."""

    async def power(self, timeout_s: float) -> tuple[PowerReading, ...]: ...
    async def power_capabilities(self, timeout_s: float = 5.0) -> PowerCapabilities: ...
    async def apply_power(self, action: PowerAction, timeout_s: float) -> ActionOutcome: ...


@dataclass
class _Gpus:
    """What the manager knows of one replica's GPUs between periods."""

    readings: tuple[PowerReading, ...] = ()  # the last good read; () before one
    capabilities: PowerCapabilities | None = None
    setting: GpuSetting = UNCAPPED  # applied now, as last read or set since
    no_power: bool = False  # it answered with no GPUs to read (an engine on the CPU)
    error: str = ""  # why the last read failed ("" when it did not)


class PowerManager:
    def __init__(self, config: FleetConfig, state: FleetState, handle: Callable[[str], PowerHandle | None],
                 metrics: MetricsRegistry, clock: Callable[[], float], store: KeyValue | None = None):
        self.config = config
        self.state = state
        self.handle = handle  # a replica id -> its handle, None once it is gone
        self.metrics = metrics
        self.clock = clock
        self.store = store
        self.budget_overrides: dict[tuple[str, str], float] = {}  # (kind, name) -> watts, the operator's
        self.pins: dict[str, float] = {}  # replica id -> the operator's power limit per GPU
        self.decision: PowerDecision | None = None
        self.decided_at: float | None = None
        self.failures: tuple[str, ...] = ()
        self.capping_events = 0
        self._memory = PowerControlState()
        self._gpus: dict[str, _Gpus] = {}
        self._inputs: dict[str, ReplicaPower] = {}  # as the last decision saw them
        self._restored = store is None
        self._exported: dict[str, list[tuple[str, ...]]] = {}  # replica id -> labels of its GPU series
        self._scopes: set[str] = set()  # budget scopes with a gauge series

    @property
    def period_s(self) -> float:
        return self.config.power.control_period_s

    async def update(self) -> None:
        """One control period, when one is due."""
        now = self.clock()
        self._restore()
        if self.decided_at is not None and now - self.decided_at < self.period_s - _EPS:
            return
        records = [r for r in self.state.live() if r.serving and self.handle(r.replica_id) is not None]
        await asyncio.gather(*(self._read(r) for r in records))
        self._forget_ended({r.replica_id for r in records})
        self._inputs = {p.replica_id: p for r in records if (p := self._input(r)) is not None}
        decision = decide(PowerSnapshot(now, tuple(self._inputs.values()), self.budgets(),
                                        self.config.power.policy_params(), self._memory))
        self.failures = await self._act(decision)
        for record in records:
            record.power_setting = self._gpus[record.replica_id].setting
        self._record(decision, now)
        self._export(records)

    # observe -----------------------------------------------------------------------------

    async def _read(self, record: ReplicaRecord) -> None:
        handle, seen = self.handle(record.replica_id), self._gpus.setdefault(record.replica_id, _Gpus())
        try:
            if seen.capabilities is None:
                seen.capabilities = await handle.power_capabilities(self.period_s)
            readings = await handle.power(self.period_s)
        except Exception as e:  # noqa: BLE001 — any failed read is missing telemetry, and the policy says what that costs
            seen.error = str(e) or type(e).__name__
            return
        seen.error, seen.no_power = "", not readings
        if readings:
            seen.readings, seen.setting = tuple(readings), group_setting(readings)

    def _input(self, record: ReplicaRecord) -> ReplicaPower | None:
        seen = self._gpus[record.replica_id]
        pool = self.config.pool(record.pool)
        gpus = pool.gpus_per_replica if pool is not None else 0
        if seen.no_power or (not seen.readings and gpus == 0):
            return None  # no GPU power here to read or cap
        return replica_power(record, seen.readings, seen.capabilities, setting=seen.setting, gpus=gpus,
                             priority=priority_of(record, self.config),
                             row=row_of(self.state, record.node_id, self.config.power.row_label),
                             pinned_limit_w=self.pins.get(record.replica_id))

    def _forget_ended(self, serving: set[str]) -> None:
        for replica_id in self._gpus.keys() - serving:
            if self.state.get(replica_id) is None or self.state.get(replica_id).state.terminal:
                del self._gpus[replica_id]
        ended = [r for r in self.pins if self.state.get(r) is None or self.state.get(r).state.terminal]
        for replica_id in ended:
            del self.pins[replica_id]
        if ended:
            self._save()

    # act ---------------------------------------------------------------------------------

    async def _act(self, decision: PowerDecision) -> tuple[str, ...]:
        by_replica: dict[str, list[PowerAction]] = {}
        for action in decision.actions:
            by_replica.setdefault(action.replica_id, []).append(action)
        results = await asyncio.gather(*(self._apply(rid, actions) for rid, actions in by_replica.items()))
        return tuple(f for failed in results for f in failed)

    async def _apply(self, replica_id: str, actions: list[PowerAction]) -> list[str]:
        """A replica's actions in order (limits first); the first failure stops the rest."""
        seen, handle = self._gpus[replica_id], self.handle(replica_id)
        for action in actions:
            try:
                outcome = await handle.apply_power(action, self.period_s)
            except Exception as e:  # noqa: BLE001 — unreachable now: retried next period
                outcome = ActionOutcome(action, False, str(e) or type(e).__name__, restored=False)
            if not outcome.ok:
                log.warning("power: %s %s on %s failed: %s", action.op.value, action.value, replica_id,
                            outcome.error)
                return [f"{replica_id}: {action.op.value} {'' if action.value is None else f'{action.value:g} '}"
                        f"failed: {outcome.error}"]
            seen.setting = after(seen.setting, action)
        return []

    def _record(self, decision: PowerDecision, now: float) -> None:
        before = {s.key: (s.level, s.depth) for s in self.decision.scopes} if self.decision else {}
        for scope in decision.scopes:
            if (scope.level, scope.depth) > before.get(scope.key, (0, 0)):
                self.capping_events += 1
                self.metrics["flotilla_power_capping_events_total"].labels(scope.level.name.lower()).inc()
        said = set(self.decision.reasons) if self.decision else set()
        for reason in decision.reasons:
            if reason not in said:  # standing conditions are said once, not every period
                log.info("power: %s", reason)
        self.decision, self._memory, self.decided_at = decision, decision.state, now

    def _export(self, records: list[ReplicaRecord]) -> None:
        m, exported = self.metrics, {}
        for record in records:
            seen = self._gpus[record.replica_id]
            cap = seen.setting.power_limit_w
            series = exported[record.replica_id] = []
            for r in seen.readings:
                labels = (record.replica_id, str(r.gpu), record.spec.gpu_type, record.node_id)
                m["flotilla_gpu_power_watts"].labels(*labels).set(r.draw_w)
                m["flotilla_gpu_power_cap_watts"].labels(*labels).set(r.default_limit_w if cap is None else cap)
                series.append(labels)
        for replica_id in self._exported.keys() - exported.keys():  # ended: drop their series
            for labels in self._exported[replica_id]:
                m["flotilla_gpu_power_watts"].remove(*labels)
                m["flotilla_gpu_power_cap_watts"].remove(*labels)
        self._exported = exported
        scopes = {b.key: b.watts for b in self.budgets()}
        for key, watts in scopes.items():
            m["flotilla_power_budget_watts"].labels(key).set(watts)
        for key in self._scopes - scopes.keys():
            m["flotilla_power_budget_watts"].remove(key)
        self._scopes = set(scopes)

    # budgets and pins (operator actions) --------------------------------------------------

    def budgets(self) -> tuple[PowerBudget, ...]:
        """The configured budgets with the operator's overrides on top."""
        self._restore()
        merged = {(b.kind, b.name): b.watts for b in self.config.power.budgets()} | self.budget_overrides
        return tuple(PowerBudget(kind, name, watts) for (kind, name), watts in sorted(
            merged.items(), key=lambda kv: (("cluster", "row", "node").index(kv[0][0]), kv[0][1])))

    def set_budget(self, kind: str, name: str, watts: float) -> BudgetStatus:
        """Set one budget (it takes effect at the next period). Invalid for a malformed
        scope; NotFound for an unknown node; Conflict naming why the budget cannot feed
        the GPUs deployed under it now (below their idle draw, or their peak beyond the
        budget times `power.oversubscription`): the same watts may fit a smaller fleet."""
        self._restore()
        try:
            budget = PowerBudget(kind, name, watts)
        except ValueError as e:
            raise Invalid(str(e), code="invalid_budget") from None
        if (kind == "cluster") != (name == ""):
            raise Invalid("a cluster budget has no name; a row or node budget needs one", code="invalid_budget")
        if kind == "node" and name not in self.state.nodes:
            raise NotFound(f"no node {name!r}")
        problem = budget_problem(watts, self._gpu_types(budget), scope=budget.key,
                                 oversubscription=self.config.power.oversubscription)
        if problem is not None:
            raise Conflict(problem, code="power_budget_refused")
        self.budget_overrides[(kind, name)] = float(watts)
        self._save()
        log.info("power: the operator set the %s budget to %g W", budget.key, watts)
        return next(b for b in self.budget_status() if b.scope == budget.key)

    def pin(self, replica_id: str, watts: float | None) -> PowerCapStatus:
        """Pin a replica's GPUs to `watts` each (None: unpin, the policy decides again);
        lands within one period. Invalid names the GPU's supported range."""
        self._restore()
        record = self.state.get(replica_id)
        if record is None or record.state.terminal:
            raise NotFound(f"no live replica {replica_id!r}")
        hw = self._replica_hw(record)
        if watts is not None:
            problem = limit_problem(watts, hw.limit_range_w, record.spec.gpu_type)
            if problem is not None:
                raise Invalid(problem, code="power_cap_out_of_range")
            self.pins[replica_id] = float(watts)
        elif self.pins.pop(replica_id, None) is None:
            return self._cap_status(record, hw)
        self._save()
        log.info("power: the operator %s %s", "unpinned" if watts is None else f"pinned {watts:g} W on", replica_id)
        return self._cap_status(record, hw)

    def _replica_hw(self, record: ReplicaRecord) -> ReplicaPower:
        seen = self._gpus.get(record.replica_id, _Gpus())
        pool = self.config.pool(record.pool)
        return replica_power(record, seen.readings, seen.capabilities, setting=seen.setting,
                             gpus=pool.gpus_per_replica if pool else 1, priority=0, row="", pinned_limit_w=None)

    def _cap_status(self, record: ReplicaRecord, hw: ReplicaPower) -> PowerCapStatus:
        return PowerCapStatus(record.replica_id, self.pins.get(record.replica_id), hw.power_limit_w,
                              hw.limit_range_w)

    def _gpu_types(self, budget: PowerBudget) -> list[str]:
        """One entry per GPU of the live replicas under `budget`."""
        types = []
        for record in self.state.live():
            hw, pool = self._inputs.get(record.replica_id), self.config.pool(record.pool)
            gpus = hw.gpus if hw else (pool.gpus_per_replica if pool else 0)
            row = row_of(self.state, record.node_id, self.config.power.row_label)
            covered = (budget.kind == "cluster" or (budget.kind == "row" and row == budget.name)
                       or (budget.kind == "node" and record.node_id == budget.name))
            if covered:
                types += [record.spec.gpu_type] * gpus
        return types

    def _restore(self) -> None:
        """Take back the operator's overrides a former controller kept (once)."""
        if self._restored:
            return
        self._restored = True
        try:
            raw = self.store.get(STORE_KEY)
            saved = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 — unreadable: the config's budgets, loudly
            log.exception("power: could not read the operator's budgets and pins; using the config's")
            return
        self.budget_overrides = {(k, n): float(w) for k, n, w in saved.get("budgets", [])}
        self.pins = {r: float(w) for r, w in saved.get("pins", {}).items()}

    def _save(self) -> None:
        if self.store is None:
            return
        data = {"budgets": [[k, n, w] for (k, n), w in sorted(self.budget_overrides.items())], "pins": self.pins}
        try:
            self.store.put(STORE_KEY, json.dumps(data, sort_keys=True).encode())
        except Exception:  # noqa: BLE001 — the override holds in memory; a restart would lose it
            log.exception("power: could not save the operator's budgets and pins")

    # report --------------------------------------------------------------------------------

    def budget_status(self) -> tuple[BudgetStatus, ...]:
        scopes = {s.key: s for s in self.decision.scopes} if self.decision else {}
        rows = []
        for b in self.budgets():
            s = scopes.get(b.key)
            source = "operator" if (b.kind, b.name) in self.budget_overrides else "config"
            rows.append(BudgetStatus(
                b.key, b.kind, b.name, b.watts, source, s.draw_w if s else None,
                b.watts - s.draw_w if s else None, s.level.name.lower() if s else "normal",
                s.depth if s else 0, s.floor_w if s else None, s.stale if s else ()))
        return tuple(rows)

    def status(self) -> PowerStatus:
        gpus = []
        for replica_id, seen in sorted(self._gpus.items()):
            record, hw = self.state.get(replica_id), self._inputs.get(replica_id)
            if record is None or hw is None:
                continue
            caps = seen.capabilities
            for r in seen.readings:
                limit = r.default_limit_w if seen.setting.power_limit_w is None else seen.setting.power_limit_w
                gpus.append(GpuPowerStatus(
                    replica_id, r.gpu, record.spec.gpu_type, record.node_id, hw.row, r.draw_w, limit,
                    r.default_limit_w, limit - r.draw_w, r.sm_clock_mhz, seen.setting.locked_clock_mhz,
                    r.observed_at, hw.priority, self.pins.get(replica_id), hw.controllable,
                    caps.reason if caps else ""))
        level = self.decision.level.name.lower() if self.decision else "normal"
        return PowerStatus(level, self.config.power.backend, self.config.power.oversubscription, self.period_s,
                           self.decided_at, self.capping_events, self.budget_status(), tuple(gpus),
                           self.decision.reasons if self.decision else (), self.failures)
