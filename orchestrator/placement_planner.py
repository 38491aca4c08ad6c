"""One placement plan for the live fleet: workload → capacities → mix → decision → nodes.

`PlacementPlanner.outcome` chains the pure parts over a snapshot of the fleet taken on
the controller's loop, so it may run in a worker thread (`asyncio.to_thread`):
1. each model's workload from the window of finished requests (`WorkloadWindow`), or
   from rates the caller gives, times (1 + `placement.headroom`) times `rate_scale`;
2. each pool's capacity per bucket within the placement SLO class (`derive_capacity`,
   cached per model, GPU type, GPUs per replica, SLO and bucket scheme: the model is
   slow and its inputs rarely change);
3. the cheapest mix (`solve_placement`), the running mix against it (`fleet_mix`), and
   whether to move (`replanning.decide`);
4. where the replicas the fleet will run go on the live nodes (the plan's on a change,
   the current ones otherwise) and what to ask the autoscaler for (`packing.pack`).
A model with no requests in its window keeps its pools as they are (held at their
desired size): quiet is not the same as gone, and scaling a model to zero is the
operator's call. Until a model's window is full, only a change that adds missing
capacity is carried out (a partial window is a noisy one).

Units: seconds, $/h, requests per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from orchestrator.config import FleetConfig, PoolConfig
from orchestrator.workload_window import WorkloadWindow
from policies.capacity import CapacityProfile, Slo, derive_capacity
from policies.gpu_catalog import GPU_CATALOG, gpu_spec
from policies.packing import CurrentReplica, NodeShape, NodeSnapshot, PackingPlan, pack, replica_shape
from policies.placement import PlacementPlan, PlacementProblem, PoolOption, solve_placement
from policies.replanning import FleetMix, ReplanDecision, Transition, decide, fleet_mix, transition
from policies.workload import BucketScheme, WorkloadProfile

MAX_RATE_SCALE = 1000.0  # what-if workloads beyond this are typos, not plans


@dataclass(frozen=True)
class WorkloadOverride:
    """A what-if workload: `rates` (model, prompt tokens, output tokens, req/s) replace the
    observed workload of each model they name; every rate is then times `rate_scale`."""

    rate_scale: float = 1.0
    rates: tuple[tuple[str, int, int, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.rate_scale <= MAX_RATE_SCALE:
            raise ValueError(f"rate_scale must be in [0, {MAX_RATE_SCALE:g}], got {self.rate_scale}")
        for model, prompt, output, rate in self.rates:
            if prompt < 0 or output < 0 or not 0 <= rate < math.inf:
                raise ValueError(f"rate ({model}, {prompt}, {output}, {rate}): token counts and the rate "
                                 f"must be finite and >= 0")

    @property
    def given(self) -> bool:
        return bool(self.rates)


OBSERVED = WorkloadOverride()  # the observed workload as it is


@dataclass(frozen=True)
class FleetPicture:
    """What the planner reads of the live fleet, taken on the controller's loop."""

    now: float  # wall-clock seconds
    desired: Mapping[str, int]  # pool -> desired replicas
    replicas: tuple[CurrentReplica, ...]  # READY replicas and their nodes
    nodes: tuple[NodeSnapshot, ...]  # alive, uncordoned GPU nodes
    last_change_s: float | None  # when the fleet last changed for placement (None: never)
    workloads: tuple[WorkloadProfile, ...]  # per served model, over the span observed
    observed_s: Mapping[str, float]  # model -> seconds of its window the records cover

    def __post_init__(self) -> None:
        object.__setattr__(self, "desired", MappingProxyType(dict(self.desired)))
        object.__setattr__(self, "observed_s", MappingProxyType(dict(self.observed_s)))


@dataclass(frozen=True)
class PlanOutcome:
    """A plan for the fleet and what to do about it."""

    planned_at: float
    workloads: tuple[WorkloadProfile, ...]  # as planned for (headroom and scale applied)
    held: tuple[str, ...]  # models without traffic, whose pools keep their size
    plan: PlacementPlan
    fleet: FleetMix  # the running mix (desired replicas), judged against the workload
    decision: ReplanDecision
    # where the replicas the fleet will run go (the plan's on a change, the current ones
    # otherwise) and the nodes they need; None where no pool is packed (CPU only)
    packing: PackingPlan | None
    current: Mapping[str, int] = field(default_factory=dict)  # pool -> desired replicas when planned


def window_picture(window: WorkloadWindow, config: FleetConfig, now: float) -> tuple[
        tuple[WorkloadProfile, ...], dict[str, float]]:
    """Each served model's workload over the span its window covers, and that span."""
    settings = config.placement
    scheme = settings.buckets.scheme()
    profiles = tuple(window.profile(m.name, now, settings.window_s, scheme) for m in config.models)
    observed = {m.name: window.observed_s(m.name, now, settings.window_s) for m in config.models}
    return profiles, observed


class PlacementPlanner:
    def __init__(self) -> None:
        self._capacities: dict[tuple, CapacityProfile] = {}

    def outcome(self, config: FleetConfig, fleet: FleetPicture, override: WorkloadOverride = OBSERVED,
                force: bool = False) -> PlanOutcome:
        """Plan for the fleet's workload (or `override`'s); `force` skips dwell, hysteresis
        and payback (an operator's apply): any feasible plan that differs is a change."""
        settings = config.placement
        scheme = settings.buckets.scheme()
        workloads = self._workloads(config, fleet, override, scheme)
        held = tuple(w.model for w in workloads if w.total_rate <= 0)
        problem = PlacementProblem(
            workloads, tuple(self._option(config, p, scheme, fleet, held) for p in config.pools),
            form=settings.form, slice_factor=settings.slice_factor,
            power_budget_watts=settings.power_budget_watts, max_cost_per_hour=settings.max_cost_per_hour,
            time_limit_s=settings.solver_time_limit_s)
        plan = solve_placement(problem)
        mix = fleet_mix(problem, fleet.desired)
        if force:
            decision = _forced(mix, plan)
        else:
            decision = decide(mix, plan, now_s=fleet.now, last_change_s=fleet.last_change_s,
                              settings=settings.replan_settings())
            decision = _warming_up(decision, config, fleet, override, held)
        runs = dict(plan.replicas) if decision.action == "change" else dict(fleet.desired)
        return PlanOutcome(fleet.now, workloads, held, plan, mix, decision,
                           _packing(config, runs, fleet), dict(fleet.desired))

    def _workloads(self, config: FleetConfig, fleet: FleetPicture, override: WorkloadOverride,
                   scheme: BucketScheme) -> tuple[WorkloadProfile, ...]:
        factor = (1 + config.placement.headroom) * override.rate_scale
        given: dict[str, list[tuple[int, int, float]]] = {}
        for model, prompt, output, rate in override.rates:
            if config.model(model) is None:
                raise ValueError(f"rate for unknown model {model!r} (served: "
                                 f"{', '.join(m.name for m in config.models)})")
            given.setdefault(model, []).append((prompt, output, rate))
        observed = {w.model: w for w in fleet.workloads}
        out = []
        for m in config.models:
            if m.name in given:
                base = WorkloadProfile.from_rates(m.name, scheme, given[m.name])
            else:
                base = observed.get(m.name) or WorkloadProfile(m.name, scheme, (0.0,) * len(scheme), 1.0)
            out.append(base.scaled(factor))
        return tuple(out)

    def _option(self, config: FleetConfig, pool: PoolConfig, scheme: BucketScheme, fleet: FleetPicture,
                held: tuple[str, ...]) -> PoolOption:
        lo, hi = pool.min_replicas, pool.max_replicas
        if pool.model in held:
            lo = hi = fleet.desired.get(pool.name, pool.replicas)
        return PoolOption(pool.name, self.capacity(config, pool, scheme), pool.price_per_hour,
                          min_replicas=lo, max_replicas=hi)

    def capacity(self, config: FleetConfig, pool: PoolConfig, scheme: BucketScheme) -> CapacityProfile:
        """One replica of the pool's capacity per bucket within the placement SLO (cached)."""
        model = config.model(pool.model)
        spec = replace(model.transformer_spec(), name=model.name)  # presets carry their own name
        slo = placement_slo(config)
        settings = config.placement
        key = (spec, pool.gpu_type, pool.gpus_per_replica, slo, scheme, settings.memory_fraction,
               settings.max_num_seqs)
        cached = self._capacities.get(key)
        if cached is None:
            cached = self._capacities[key] = derive_capacity(
                spec, gpu_spec(pool.gpu_type), scheme, slo, gpus_per_replica=max(1, pool.gpus_per_replica),
                memory_fraction=settings.memory_fraction, max_num_seqs=settings.max_num_seqs)
        return cached


def placement_slo(config: FleetConfig) -> Slo:
    """The TTFT and TPOT targets capacities are computed for: `placement.slo_class`, else
    the fleet's default SLO class."""
    name = config.placement.slo_class or config.default_slo_class
    cls = next(c for c in config.slo_classes if c.name == name)
    return Slo(cls.ttft_s, cls.tpot_s)


def _forced(mix: FleetMix, plan: PlacementPlan) -> ReplanDecision:
    current = mix.cost_per_hour
    if not plan.feasible:
        return ReplanDecision("keep", "no feasible plan: " + "; ".join(plan.problems), current, current, 0.0,
                              urgent=not mix.carries_load)
    steps = transition(mix.replicas, plan.replicas)
    if steps.empty:
        return ReplanDecision("keep", "the fleet already has the planned mix", current, plan.cost_per_hour,
                              0.0, urgent=not mix.carries_load)
    return ReplanDecision("change", "applied by an operator (dwell and hysteresis skipped)", current,
                          plan.cost_per_hour, 0.0, steps, not mix.carries_load)


def _warming_up(decision: ReplanDecision, config: FleetConfig, fleet: FleetPicture,
                override: WorkloadOverride, held: tuple[str, ...]) -> ReplanDecision:
    """Keep a change made for cost while some model's window is not yet full."""
    if decision.action != "change" or decision.urgent or override.given:
        return decision
    window = config.placement.window_s
    short = {m: s for m, s in fleet.observed_s.items() if m not in held and s < window}
    if not short:
        return decision
    model, seen = min(short.items(), key=lambda kv: kv[1])
    return replace(decision, action="keep", transition=Transition(),
                   reason=f"warming up: {seen:.0f} s of the {window:g} s window of {model} observed "
                          f"(would: {decision.reason})")


def _packing(config: FleetConfig, target: Mapping[str, int], fleet: FleetPicture) -> PackingPlan | None:
    """Where `target` goes on the live nodes; CPU pools are not packed."""
    packed = {p.name: p for p in config.pools if p.gpus_per_replica >= 1 and p.gpu_type != "CPU"}
    if not packed:
        return None
    shapes = {name: replica_shape(name, config.model(p.model).transformer_spec(), p.gpu_type, p.gpus_per_replica,
                                  memory_fraction=config.placement.memory_fraction)
              for name, p in packed.items()}
    node_shapes = _node_shapes(packed.values(), fleet.nodes)
    current = tuple(r for r in fleet.replicas if r.pool in packed)
    return pack({name: target.get(name, 0) for name in packed}, shapes, fleet.nodes, current, node_shapes,
                config.placement.power_budget_watts)


def _node_shapes(pools, nodes: tuple[NodeSnapshot, ...]) -> dict[str, NodeShape]:
    """What a new node of each pool's GPU type brings: like a live node of that type, else
    just enough GPUs for the pool's largest replica."""
    shapes: dict[str, NodeShape] = {}
    for p in pools:
        seen = next((n for n in nodes if n.gpu_type == p.gpu_type), None)
        if seen is not None:
            shapes[p.gpu_type] = NodeShape(p.gpu_type, seen.gpus, seen.gpu_memory_bytes)
        else:
            gpus = max(p.gpus_per_replica, shapes[p.gpu_type].gpus if p.gpu_type in shapes else 0)
            shapes[p.gpu_type] = NodeShape(p.gpu_type, gpus, GPU_CATALOG[p.gpu_type].memory_bytes)
    return shapes
