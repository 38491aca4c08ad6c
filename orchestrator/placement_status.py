"""What the placement manager reports: the one shape the admin API, the CLI and the tests read.

Frozen; $/h, watts, requests per second, seconds (wall clock) as the field comments say.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.placement_planner import PlanOutcome
from orchestrator.placement_transition import PlacementTransition
from policies.packing import Unplaced
from policies.replanning import PoolChange


@dataclass(frozen=True)
class WorkloadSummary:
    """One model's workload as planned for."""

    model: str
    total_rate: float  # req/s planned for (headroom and any scale applied)
    requests: int  # requests counted in the window (0 for a given what-if workload)
    window_s: float  # seconds the rates were measured over
    active_buckets: int
    held: bool  # no traffic: its pools keep their size


@dataclass(frozen=True)
class PoolPlan:
    pool: str
    gpu_type: str
    model: str
    current: int  # desired replicas now
    planned: int
    gpus: int  # planned GPUs
    cost_per_hour: float  # planned
    load: float  # replica-loads planned onto it
    utilisation: float  # load / planned replicas


@dataclass(frozen=True)
class BucketAssignment:
    """A share of one bucket's traffic, the pool it goes to and why."""

    model: str
    bucket: str  # e.g. "in[2048,4096) out[256,512)"
    rate: float  # the bucket's whole rate, req/s
    pool: str
    fraction: float
    load: float  # replica-loads it puts on the pool
    reason: str


@dataclass(frozen=True)
class BindingConstraint:
    kind: str  # capacity, max_replicas, available, min_replicas, power or cost
    subject: str  # the pool, or "fleet"
    detail: str


@dataclass(frozen=True)
class PoolMove:
    pool: str
    current: int
    target: int


@dataclass(frozen=True)
class Decision:
    """Whether the fleet moves to the plan, and the order: scale-outs, then drains."""

    action: str  # "keep" or "change"
    reason: str
    urgent: bool  # the running fleet lacks capacity for the workload
    current_cost_per_hour: float
    target_cost_per_hour: float
    saving_per_hour: float
    move_cost: float  # $ of the replicas started and drained
    scale_out: tuple[PoolMove, ...]
    drain: tuple[PoolMove, ...]


@dataclass(frozen=True)
class NodeNeed:
    """Nodes of one GPU type the plan needs beyond the live ones (asked of the autoscaler)."""

    gpu_type: str
    gpus_per_node: int
    count: int


@dataclass(frozen=True)
class NodePlan:
    """Where the planned replicas go on the nodes."""

    missing: tuple[NodeNeed, ...]
    idle: tuple[str, ...]  # live GPU nodes the plan leaves without a replica (to release)
    unplaced: tuple[Unplaced, ...]  # replicas no node (live or requestable) can take
    power_watts: float  # Σ TDP of the GPUs hosting a planned replica


@dataclass(frozen=True)
class TransitionStatus:
    transition_id: str
    trigger: str  # "cost", "capacity" or "operator"
    state: str  # scaling_out, draining, done, abandoned
    reason: str
    started_at: float
    scale_out: tuple[PoolMove, ...]
    drain: tuple[PoolMove, ...]
    drained: tuple[str, ...]  # replicas drained to carry it out
    ended_at: float | None
    detail: str  # why it was abandoned ("" otherwise)


@dataclass(frozen=True)
class PlacementReport:
    """A plan for the fleet, why, and what the re-planning would do about it."""

    enabled: bool  # the controller re-plans the fleet every placement.replan_period_s
    what_if: bool  # planned for a given or scaled workload, not the observed one
    planned_at: float
    status: str  # "optimal" or "feasible" (an infeasible plan is an error, not a report)
    form: str
    cost_per_hour: float  # the plan's
    current_cost_per_hour: float  # the desired replicas' now
    power_watts: float  # Σ TDP of the planned GPUs
    solve_time_s: float
    workloads: tuple[WorkloadSummary, ...]
    pools: tuple[PoolPlan, ...]
    assignments: tuple[BucketAssignment, ...]
    binding: tuple[BindingConstraint, ...]  # those of the pools of held models left out
    decision: Decision
    nodes: NodePlan | None  # None where no pool is packed onto GPU nodes
    transition: TransitionStatus | None  # in progress, else the last one


def _moves(changes: tuple[PoolChange, ...]) -> tuple[PoolMove, ...]:
    return tuple(PoolMove(c.pool, c.current, c.target) for c in changes)


def transition_status(t: PlacementTransition) -> TransitionStatus:
    return TransitionStatus(t.transition_id, t.trigger, t.state.value, t.reason, t.started_at,
                            _moves(t.steps.scale_out), _moves(t.steps.drain), tuple(t.drained), t.ended_at,
                            t.detail)


def placement_report(outcome: PlanOutcome, *, enabled: bool, what_if: bool,
                     transition: PlacementTransition | None) -> PlacementReport:
    """The report of a feasible outcome (the caller refuses an infeasible one)."""
    plan, decision = outcome.plan, outcome.decision
    pools = tuple(PoolPlan(a.pool, a.gpu_type, a.model, outcome.current.get(a.pool, 0), a.replicas, a.gpus,
                           a.cost_per_hour, a.load, a.utilisation) for a in plan.allocations)
    workloads = tuple(WorkloadSummary(w.model, w.total_rate, w.requests, w.window_s, sum(1 for _ in w.active()),
                                      w.model in outcome.held) for w in outcome.workloads)
    assignments = tuple(BucketAssignment(a.model, a.label, a.rate, a.pool, a.fraction, a.load, a.reason)
                        for a in sorted(plan.assignments, key=lambda a: (a.model, a.bucket, a.pool)))
    steps = decision.transition
    held = {a.pool for a in plan.allocations if a.model in outcome.held}  # limits of the hold, not of the config
    return PlacementReport(
        enabled, what_if, outcome.planned_at, plan.status, plan.form, plan.cost_per_hour,
        outcome.fleet.cost_per_hour, plan.power_watts, plan.solve_time_s, workloads, pools, assignments,
        tuple(BindingConstraint(b.kind, b.subject, b.detail) for b in plan.binding if b.subject not in held),
        Decision(decision.action, decision.reason, decision.urgent, decision.current_cost_per_hour,
                 decision.target_cost_per_hour, decision.saving_per_hour, decision.move_cost,
                 _moves(steps.scale_out), _moves(steps.drain)),
        _node_plan(outcome), None if transition is None else transition_status(transition))


def _node_plan(outcome: PlanOutcome) -> NodePlan | None:
    packing = outcome.packing
    if packing is None:
        return None
    return NodePlan(tuple(NodeNeed(r.shape.gpu_type, r.shape.gpus, r.count) for r in packing.missing_nodes),
                    packing.idle_nodes, packing.unplaced,
                    packing.power_watts)
