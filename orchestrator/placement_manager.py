"""Keeps the fleet on the cheapest GPU mix that serves its workload within the SLO (after Mélange).

Each controller tick (`update`), when `placement.enabled`:
- every `placement.replan_period_s` a re-plan runs in the background (the solver in a
  worker thread, never on the loop): the workload window → capacities → the cheapest
  mix → the running mix judged against it → keep or change, with hysteresis and dwell
  (`orchestrator.placement_planner`); the bundles of the replicas the fleet will run go
  to the autoscaler (`orchestrator.autoscaler`) whenever they change;
- a change is carried out in order (`orchestrator.placement_transition`): raise the
  desired replicas of the pools that grow, wait until the models' replicas are READY,
  then drain the replicas to remove (`ReplicaManager.drain(replace=False)`: their
  requests move off or finish; none is dropped). No re-plan starts while one is under way.
With placement disabled the manager still keeps the workload window and exports the
fleet's cost, and operators may plan (`dry_run`) and `apply` by hand.

Finished requests arrive from the ingresses in batches (`record`). The simulator runs
the same manager in virtual time (`bench.placement_live`): `advance` and `replan_now` on
its control ticks, over its own fleet (`PoolSizes`). Units: seconds (wall clock), $/h,
requests per second.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from orchestrator.autoscaler import Bundles, ResourceRequester
from orchestrator.config import FleetConfig
from orchestrator.errors import Conflict, Invalid, NotFound
from orchestrator.fleet_state import FleetState, ReplicaRecord
from orchestrator.metrics import MetricsRegistry
from orchestrator.placement_planner import (
    OBSERVED,
    FleetPicture,
    PlacementPlanner,
    PlanOutcome,
    WorkloadOverride,
    window_picture,
)
from orchestrator.placement_status import PlacementReport, placement_report
from orchestrator.placement_transition import PlacementTransition, TransitionState
from orchestrator.request_log import FinishedRequest
from orchestrator.workload_window import WorkloadWindow
from policies.fleet_view import ReplicaState
from policies.gpu_catalog import GPU_CATALOG
from policies.packing import CurrentReplica, NodeSnapshot

log = logging.getLogger(__name__)

ZONE_LABELS = ("topology.kubernetes.io/zone", "ray.io/availability-zone")  # a node's failure domain


def workload_override(rate_scale: float = 1.0,
                      rates: Iterable[tuple[str, int, int, float]] = ()) -> WorkloadOverride:
    """A what-if workload from an operator's call; Invalid naming what is wrong with it."""
    try:
        return WorkloadOverride(float(rate_scale), tuple((str(m), int(p), int(o), float(r)) for m, p, o, r in rates))
    except (TypeError, ValueError) as e:
        raise Invalid(f"what-if workload: {e}", code="bad_workload") from None


class PoolSizes(Protocol):
    """What the manager changes: `ReplicaManager` live, the simulator's fleet in virtual time."""

    desired: dict[str, int]  # pool -> desired replicas

    def set_desired(self, pool: str, replicas: int) -> None: ...
    def drain(self, replica_id: str, replace: bool) -> object: ...


class PlacementManager:
    def __init__(self, config: FleetConfig, state: FleetState, replicas: PoolSizes, metrics: MetricsRegistry,
                 clock: Callable[[], float], requester: ResourceRequester | None = None, history: int = 20):
        self.config = config
        self.state = state
        self.replicas = replicas
        self.metrics = metrics
        self.clock = clock
        self.requester = requester  # None: no autoscaler to ask (fake replicas)
        self.window = WorkloadWindow([m.name for m in config.models], clock())
        self.planner = PlacementPlanner()
        self.latest: PlanOutcome | None = None  # the last periodic plan
        self.transition: PlacementTransition | None = None  # under way
        self.history: deque[PlacementTransition] = deque(maxlen=history)
        self.last_change_s: float | None = None
        self.replanning: asyncio.Task | None = None  # the periodic re-plan in flight
        self.error = ""  # why the last periodic re-plan failed ("" when it did not)
        self._replanned_at: float | None = None
        self._requested: Bundles | None = None

    def record(self, records: Iterable[FinishedRequest]) -> None:
        """Finished requests shipped by an ingress."""
        self.window.add(records, self.clock(), self.config.placement.window_s)

    async def update(self) -> None:
        now = self.clock()
        self.advance(now)
        if self.replan_due(now):
            self._replanned_at = now
            self.replanning = asyncio.get_running_loop().create_task(self._replan())
        self.metrics["flotilla_fleet_cost_per_hour"].set(self._running_cost())

    def advance(self, now: float) -> None:
        """Forget requests older than the window; carry a transition under way one step further."""
        self.window.prune(now, self.config.placement.window_s)
        if self.transition is not None:
            self._advance(now)

    def replan_due(self, now: float) -> bool:
        """Placement is on, nothing is moving or being planned, and a period has passed."""
        settings = self.config.placement
        return (settings.enabled and self.transition is None
                and (self.replanning is None or self.replanning.done())
                and (self._replanned_at is None or now - self._replanned_at >= settings.replan_period_s))

    def replan_now(self) -> PlanOutcome:
        """One periodic re-plan in the caller's thread (the simulator's virtual time; the
        controller runs the solver in a worker thread instead) and what it decides, carried out."""
        self._replanned_at = self.clock()
        outcome = self.planner.outcome(self.config, self.picture())
        self.adopt(outcome)
        return outcome

    # operator calls ---------------------------------------------------------------------

    async def dry_run(self, override: WorkloadOverride = OBSERVED) -> PlacementReport:
        """The plan for the observed (or a what-if) workload and what re-planning would do
        about it; nothing changes. Infeasible: Conflict naming the bucket or constraint;
        a rate for a model the fleet does not serve: NotFound."""
        outcome = await self._plan_now(override, force=False)
        return self._report(outcome, override)

    async def apply(self, override: WorkloadOverride = OBSERVED) -> PlacementReport:
        """Carry out the plan now, skipping dwell, hysteresis and payback."""
        self._refuse_while_moving()
        outcome = await self._plan_now(override, force=True)
        self._refuse_while_moving()
        if dict(self.replicas.desired) != dict(outcome.current):
            raise Conflict("the pools' sizes changed while planning; apply again", code="fleet_changed")
        self._request_nodes(outcome)
        if outcome.decision.action == "change":
            self._begin(outcome, "operator")
        return self._report(outcome, override)

    def picture(self) -> FleetPicture:
        """The fleet as the planner reads it, now."""
        now = self.clock()
        workloads, observed = window_picture(self.window, self.config, now)
        return FleetPicture(now, dict(self.replicas.desired), _current_replicas(self.state),
                            _node_snapshots(self.state), self.last_change_s, workloads, observed)

    async def _plan_now(self, override: WorkloadOverride, force: bool) -> PlanOutcome:
        unknown = sorted({m for m, *_ in override.rates} - {m.name for m in self.config.models})
        if unknown:
            raise NotFound(f"rate for unknown model(s) {unknown} (served: "
                           f"{', '.join(m.name for m in self.config.models)})", code="unknown_model")
        outcome = await asyncio.to_thread(self.planner.outcome, self.config, self.picture(), override, force)
        if not outcome.plan.feasible:
            raise Conflict("no feasible plan: " + "; ".join(outcome.plan.problems), code="placement_infeasible")
        return outcome

    def _refuse_while_moving(self) -> None:
        t = self.transition
        if t is not None:
            raise Conflict(f"placement transition {t.transition_id} is {t.state.value} since "
                           f"{self.clock() - t.started_at:.0f} s; apply once it ends", code="placement_in_progress")

    def _report(self, outcome: PlanOutcome, override: WorkloadOverride) -> PlacementReport:
        last = self.transition or (self.history[-1] if self.history else None)
        return placement_report(outcome, enabled=self.config.placement.enabled,
                                what_if=override != OBSERVED, transition=last)

    # re-planning ------------------------------------------------------------------------

    async def _replan(self) -> None:
        try:
            picture = self.picture()
            outcome = await asyncio.to_thread(self.planner.outcome, self.config, picture)
            self.adopt(outcome)
        except Exception as e:  # noqa: BLE001 — a failed plan leaves the fleet as it is; the next period retries
            log.exception("placement re-plan failed")
            self.error = f"{type(e).__name__}: {e}"
            self.metrics["flotilla_controller_errors_total"].labels("placement").inc()

    def adopt(self, outcome: PlanOutcome) -> None:
        """Take a periodic plan: export it, ask for its nodes and, on a change, start moving
        (unless the pools changed while it was planned: the next period re-plans)."""
        self.latest, self.error = outcome, ""
        if not outcome.plan.feasible:
            log.warning("placement: %s", outcome.decision.reason)
            return
        planned: dict[str, int] = {p.gpu_type: 0 for p in self.config.pools}
        for a in outcome.plan.allocations:
            planned[a.gpu_type] = planned.get(a.gpu_type, 0) + a.replicas
        for gpu_type, n in planned.items():
            self.metrics["flotilla_planned_replicas"].labels(gpu_type).set(n)
        if self.transition is not None or dict(self.replicas.desired) != dict(outcome.current):
            log.info("placement: the pools changed while planning; the next period re-plans")
            return
        self._request_nodes(outcome)
        if outcome.decision.action == "change":
            self._begin(outcome, "capacity" if outcome.decision.urgent else "cost")

    def _request_nodes(self, outcome: PlanOutcome) -> None:
        """Send the autoscaler the whole demand of the replicas the fleet will run, when it changed."""
        if self.requester is None or outcome.packing is None:
            return
        bundles = outcome.packing.resource_bundles()
        if bundles == self._requested:
            return
        try:
            self.requester(bundles)
            self._requested = bundles
        except Exception:  # noqa: BLE001 — the autoscaler is advisory; the replicas still ask Ray for their GPUs
            log.exception("could not send the autoscaler the placement's resource demand")

    # carrying a change out ----------------------------------------------------------------

    def _begin(self, outcome: PlanOutcome, trigger: str) -> None:
        now, decision = self.clock(), outcome.decision
        remove = outcome.packing.remove if outcome.packing is not None else ()
        t = PlacementTransition(uuid.uuid4().hex[:12], trigger, decision.reason, now, decision.transition,
                                dict(self.replicas.desired), decision.urgent, tuple(remove))
        for change in t.steps.scale_out:
            self.replicas.set_desired(change.pool, change.target)
        self.transition, self.last_change_s = t, now
        self.metrics["flotilla_plan_changes_total"].labels(trigger).inc()
        log.info("placement: %s transition %s: %s", trigger, t.transition_id, decision.reason)
        self._advance(now)

    def _advance(self, now: float) -> None:
        t = self.transition
        if t.state is TransitionState.SCALING_OUT:
            changed = self._changed_by_others(t)
            waiting = self._not_ready(t)
            if changed:
                self._end(t.abandon, now, changed)
                return
            if waiting and now - t.started_at > self.config.controller.replica_start_timeout_s:
                self._give_up(t, now, waiting)
                return
            if not waiting:
                t.mark_draining(now, self._drain(t))
        if t.state is TransitionState.DRAINING and all(self._gone(r) for r in t.drained):
            self._end(t.finish, now)

    def _end(self, mark, now: float, *why: str) -> None:
        mark(now, *why)
        self.history.append(self.transition)
        self.transition = None

    def _changed_by_others(self, t: PlacementTransition) -> str:
        """Why the transition no longer holds: a pool's size set by someone else ("" if none)."""
        expected = {c.pool: c.target for c in t.steps.scale_out} | {c.pool: c.current for c in t.steps.drain}
        for pool, n in expected.items():
            if self.replicas.desired.get(pool) != n:
                return f"pool {pool}'s desired replicas changed to {self.replicas.desired.get(pool)} meanwhile"
        return ""

    def _not_ready(self, t: PlacementTransition) -> list[str]:
        """Pools of the touched models (those that shrink apart) short of READY replicas."""
        models = {self.config.pool(p).model for p in t.pools}
        shrinking = {c.pool for c in t.steps.drain}
        short = []
        for pool in self.config.pools:
            if pool.model in models and pool.name not in shrinking:
                ready = sum(r.state is ReplicaState.READY for r in self.state.in_pool(pool.name))
                if ready < self.replicas.desired[pool.name]:
                    short.append(f"{pool.name} has {ready} of {self.replicas.desired[pool.name]} ready")
        return short

    def _give_up(self, t: PlacementTransition, now: float, waiting: list[str]) -> None:
        why = (f"new replicas not ready after {self.config.controller.replica_start_timeout_s:g} s: "
               + "; ".join(waiting))
        if not t.urgent:  # a change for cost is not worth holding half-made
            for change in t.steps.scale_out:
                self.replicas.set_desired(change.pool, change.current)
        log.warning("placement: transition %s abandoned: %s", t.transition_id, why)
        self._end(t.abandon, now, why)

    def _drain(self, t: PlacementTransition) -> list[str]:
        """Drain the replicas each shrinking pool gives up: the packing's choice first, then
        unhealthy ones, then the least loaded; starting ones are left to the pool's scale-in."""
        drained = []
        for change in t.steps.drain:
            n = change.current - change.target
            live = [r for r in self.state.in_pool(change.pool)
                    if r.state in (ReplicaState.READY, ReplicaState.UNHEALTHY)]
            victims = sorted(live, key=lambda r: (r.replica_id not in t.prefer_drain,
                                                  r.state is ReplicaState.READY, _load(r), r.replica_id))[:n]
            for record in victims:
                self.replicas.drain(record.replica_id, replace=False)
                drained.append(record.replica_id)
            if len(victims) < n:
                self.replicas.set_desired(change.pool, self.replicas.desired[change.pool] - (n - len(victims)))
        return drained

    def _gone(self, replica_id: str) -> bool:
        record = self.state.get(replica_id)
        return record is None or record.state.terminal

    # observation ------------------------------------------------------------------------

    def _running_cost(self) -> float:
        """$/h of the GPUs the live replicas hold."""
        cost = 0.0
        for r in self.state.live():
            pool = self.config.pool(r.pool)
            if pool is not None:
                cost += max(1, pool.gpus_per_replica) * pool.price_per_hour
        return cost


def _load(record: ReplicaRecord) -> int:
    return (record.stats.running + record.stats.waiting) if record.stats else 0


def _current_replicas(state: FleetState) -> tuple[CurrentReplica, ...]:
    return tuple(CurrentReplica(r.replica_id, r.pool, r.node_id) for r in state.live()
                 if r.state is ReplicaState.READY and r.node_id)


def _node_snapshots(state: FleetState) -> tuple[NodeSnapshot, ...]:
    """Alive, uncordoned nodes with GPUs of a catalog type."""
    nodes = []
    for n in sorted(state.nodes.values(), key=lambda n: n.node_id):
        o = n.observed
        if not o.alive or n.node_id in state.cordoned or o.gpus < 1 or o.gpu_type not in GPU_CATALOG:
            continue
        labels = dict(o.labels)
        zone = next((labels[k] for k in ZONE_LABELS if k in labels), "")
        nodes.append(NodeSnapshot(n.node_id, o.gpu_type, o.gpus, GPU_CATALOG[o.gpu_type].memory_bytes, zone))
    return tuple(nodes)
