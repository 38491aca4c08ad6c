"""The cheapest mix of GPU types that serves a workload within its SLO (after Mélange).

Mélange's program, solved as a mixed-integer linear program with HiGHS (scipy's `milp`):

    minimise    Σ_p price_p · x_p                     x_p: replicas of pool p (integer)
    subject to  Σ_p a_{b,p} = 1            for every bucket b with traffic
                Σ_b a_{b,p} · r_b / c_{b,p} <= x_p      for every pool p
                min_p <= x_p <= min(max_p, available_p)
                Σ_p watts_p · x_p <= power budget          (when one is set)
                Σ_p price_p · x_p <= cost limit            (when one is set)

where r_b is the bucket's rate (req/s), c_{b,p} the rate one replica of pool p sustains
for it within the SLO (`policies.capacity`), and a_{b,p} the share of the bucket sent to
pool p (only where c_{b,p} > 0). Two forms:
- "sliced" (the paper's): each bucket is cut into `slice_factor` equal slices and every
  slice goes whole to one pool. Slices of one bucket are interchangeable, so the program
  counts them instead: a_{b,p} = n_{b,p} / S with integer n_{b,p} summing to S — the same
  optimum as one binary per (slice, pool), without the symmetric copies that make branch
  and bound crawl.
- "continuous": a_{b,p} in [0, 1]; integers only on x_p. A lower bound on the sliced cost
  for every slice factor, and the fastest.
A pool is one GPU type serving one model (several models share one program and its power
budget; a bucket only goes to pools of its own model). Price and watts are per replica
(the GPU's times `gpus_per_replica`). Capacity constraints are often tight at exactly
1.0 replica-load, so loads are compared with `TOLERANCE`.

Bad input (unknown GPU type, mismatched buckets) raises ValueError. An infeasible
workload is an answer, not an error: a plan with status "infeasible" whose `problems`
name the bucket or the constraint that fails.

Units: $/h, watts, requests per second, replica-loads (1.0 = one replica fully busy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from policies.placement_model import (
    Assignment,
    Binding,
    Form,
    PlacementPlan,
    PlacementProblem,
    PoolAllocation,
    PoolOption,
    Status,
)

TOLERANCE = 1e-6  # replica-loads, watts and $/h compared within this

__all__ = ["TOLERANCE", "Assignment", "Binding", "Form", "PlacementPlan", "PlacementProblem",
           "PoolAllocation", "PoolOption", "check_mix", "solve_placement"]


@dataclass(frozen=True)
class _Demand:
    model: str
    bucket: int
    label: str
    rate: float


@dataclass(frozen=True)
class _Program:
    demands: tuple[_Demand, ...]
    edges: tuple[tuple[int, int], ...]  # (demand, pool) pairs a share may flow along
    coef: np.ndarray  # replica-loads per unit of each edge variable
    units: int  # what an edge's variables sum to per demand (S or 1)


def solve_placement(problem: PlacementProblem,
                    timer: Callable[[], float] = time.perf_counter) -> PlacementPlan:
    """The cheapest feasible mix, or an infeasible plan naming what fails (see the module
    note). `timer` only measures `solve_time_s`; it does not shape the answer."""
    began = timer()
    problems = _unservable(problem)
    if problems:
        return _no_plan(problem, problems, timer() - began)
    program = _program(problem)
    result = _run(problem, program)
    if result.x is None:
        problems = _diagnose(problem) if result.status == 2 else (
            f"HiGHS found no plan within {problem.time_limit_s:g} s ({result.message})",)
        return _no_plan(problem, problems, timer() - began)
    status: Status = "optimal" if result.status == 0 else "feasible"
    return _plan(problem, program, result.x, status, timer() - began)


def check_mix(problem: PlacementProblem, replicas: Mapping[str, int]) -> PlacementPlan:
    """Whether fixed replica counts (pool -> replicas; missing pools: 0) carry the
    workload within the SLO, splitting buckets continuously; the plan says how busy each
    pool would be, or `problems` what they lack. Power, cost and pool limits are ignored:
    the fleet is what it is."""
    pools = tuple(replace(p, min_replicas=replicas.get(p.name, 0), max_replicas=replicas.get(p.name, 0),
                          available_replicas=None) for p in problem.pools)
    return solve_placement(replace(problem, pools=pools, form="continuous",
                                   power_budget_watts=None, max_cost_per_hour=None))


# -- building and running the program ---------------------------------------------------

def _demands(problem: PlacementProblem) -> tuple[_Demand, ...]:
    return tuple(_Demand(w.model, i, b.label, rate) for w in problem.workloads
                 for i, b, rate in w.active())


def _unservable(problem: PlacementProblem) -> tuple[str, ...]:
    """Buckets no candidate pool can serve within the SLO, each with every pool's reason."""
    problems = []
    for d in _demands(problem):
        pools = [p for p in problem.pools if p.model == d.model]
        if not pools:
            problems.append(f"model {d.model}: no pool serves it")
            break
        if all(p.capacity.rate(d.bucket) <= 0 for p in pools):
            slo = pools[0].capacity.slo
            why = "; ".join(p.capacity.why_zero(d.bucket) for p in pools)
            problems.append(f"bucket {d.label} of {d.model} at {d.rate:.3g} req/s: no GPU type "
                            f"meets {slo} ({why})")
    return tuple(problems)


# The least load one share of a bucket puts on a replica. A bucket of ~1e-5 req/s has
# coefficients (rate / capacity) of ~1e-6, at HiGHS's tolerances: it dropped such loads (no
# replica bought for them) or its presolve called a dearer mix optimal (126 of 300 random
# workloads with one such bucket, against an exhaustive search). Counted at 1e-4 of a
# replica, answers agree with HiGHS run without presolve on 3,000 random workloads, and at
# most a pool within 1e-4 of a whole replica is planned one replica larger.
MIN_LOAD = 1e-4


def _program(problem: PlacementProblem) -> _Program:
    demands = _demands(problem)
    units = problem.slice_factor if problem.form == "sliced" else 1
    edges, coef = [], []
    for k, d in enumerate(demands):
        for j, p in enumerate(problem.pools):
            cap = p.capacity.rate(d.bucket) if p.model == d.model else 0.0
            if cap > 0:
                edges.append((k, j))
                coef.append(max(d.rate / (units * cap), MIN_LOAD))
    return _Program(demands, tuple(edges), np.array(coef, dtype=float), units)


def _run(problem: PlacementProblem, program: _Program):
    pools, n_pools, n_edges = problem.pools, len(problem.pools), len(program.edges)
    n = n_pools + n_edges
    cost = np.concatenate([[p.price_per_replica for p in pools], np.zeros(n_edges)])
    sliced = problem.form == "sliced"
    integrality = np.concatenate([np.ones(n_pools), np.full(n_edges, 1 if sliced else 0)])
    upper = [p.upper[0] for p in pools]
    lb = np.concatenate([[p.min_replicas for p in pools], np.zeros(n_edges)])
    ub = np.concatenate([[np.inf if u is None else u for u in upper],
                         np.full(n_edges, float(program.units))])
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add_row(entries, row_lo, row_hi):
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(row_lo)
        hi.append(row_hi)

    for k in range(len(program.demands)):
        add_row([(n_pools + e, 1.0) for e, (d, _) in enumerate(program.edges) if d == k],
                program.units, program.units)
    for j in range(n_pools):
        entries = [(n_pools + e, program.coef[e]) for e, (_, p) in enumerate(program.edges) if p == j]
        if entries:
            add_row(entries + [(j, -1.0)], -np.inf, 0.0)
    if problem.power_budget_watts is not None:
        add_row([(j, p.watts_per_replica) for j, p in enumerate(pools)], -np.inf,
                 problem.power_budget_watts)
    if problem.max_cost_per_hour is not None:
        add_row([(j, p.price_per_replica) for j, p in enumerate(pools)], -np.inf,
                 problem.max_cost_per_hour)
    constraints = ()
    if lo:
        a = csr_matrix((vals, (rows, cols)), shape=(len(lo), n))
        constraints = (LinearConstraint(a, lo, hi),)
    return milp(cost, integrality=integrality, bounds=Bounds(lb, ub), constraints=constraints,
                options={"time_limit": problem.time_limit_s, "mip_rel_gap": 1e-9})


# -- reading the answer -----------------------------------------------------------------

def _plan(problem: PlacementProblem, program: _Program, x: np.ndarray, status: Status,
          seconds: float) -> PlacementPlan:
    pools, n_pools = problem.pools, len(problem.pools)
    counts = [int(round(v)) for v in x[:n_pools]]
    shares = x[n_pools:]
    if problem.form == "sliced":
        shares = np.round(shares)
    loads = np.zeros(n_pools)
    for e, (_, j) in enumerate(program.edges):
        loads[j] += program.coef[e] * shares[e]
    allocations = tuple(
        PoolAllocation(p.name, p.gpu_type, p.model, c, c * p.gpus_per_replica,
                       c * p.price_per_replica, float(loads[j]))
        for j, (p, c) in enumerate(zip(pools, counts)))
    assignments = []
    for e, (k, j) in enumerate(program.edges):
        fraction = shares[e] / program.units
        if fraction > TOLERANCE:
            d = program.demands[k]
            assignments.append(Assignment(d.model, d.bucket, d.label, d.rate, pools[j].name,
                                          float(fraction), float(program.coef[e] * shares[e]),
                                          _reason(problem, d, j, counts)))
    cost = sum(a.cost_per_hour for a in allocations)
    power = sum(c * p.watts_per_replica for p, c in zip(pools, counts))
    return PlacementPlan(status, problem.form, problem.slice_factor, allocations,
                         tuple(assignments), cost, power,
                         _binding(problem, allocations, cost, power), (), seconds)


def _unit_cost(pool: PoolOption, bucket: int) -> float:
    """$/h per req/s of the bucket on this pool (inf where it cannot serve it)."""
    cap = pool.capacity.rate(bucket)
    return pool.price_per_replica / cap if cap > 0 else math.inf


def _reason(problem: PlacementProblem, d: _Demand, j: int, counts: list[int]) -> str:
    chosen = problem.pools[j]
    ranked = sorted((p for p in problem.pools if p.model == d.model),
                    key=lambda p: _unit_cost(p, d.bucket))
    best = ranked[0]
    if _unit_cost(chosen, d.bucket) <= _unit_cost(best, d.bucket) * (1 + TOLERANCE):
        return f"cheapest per req/s (${_unit_cost(chosen, d.bucket):.3g}/h each)"
    i = problem.pools.index(best)
    limit, which = best.upper
    if limit is not None and counts[i] >= limit:
        return f"cheapest per req/s is {best.name}, at its {which} ({limit})"
    return f"fills spare {chosen.name} capacity (cheapest per req/s: {best.name})"


def _binding(problem: PlacementProblem, allocations: tuple[PoolAllocation, ...], cost: float,
             power: float) -> tuple[Binding, ...]:
    found = []
    for p, a in zip(problem.pools, allocations):
        limit, which = p.upper
        if a.replicas and a.load >= a.replicas - TOLERANCE:
            found.append(Binding("capacity", p.name, f"{a.replicas} replicas carry "
                                 f"{a.load:.3f} replica-loads (full)"))
        if limit is not None and a.replicas >= limit:
            found.append(Binding(which, p.name, f"at its {which} of {limit}"))
        if p.min_replicas and a.replicas == p.min_replicas and a.load < a.replicas - 1 + TOLERANCE:
            found.append(Binding("min_replicas", p.name, f"held at min_replicas {p.min_replicas} "
                                 f"with {a.load:.3f} replica-loads"))
    smallest_watts = min((p.watts_per_replica for p in problem.pools), default=0.0)
    budget = problem.power_budget_watts
    if budget is not None and budget - power < smallest_watts - TOLERANCE:
        found.append(Binding("power", "fleet", f"{power:g} of {budget:g} W: no room for another replica"))
    smallest_price = min((p.price_per_replica for p in problem.pools), default=0.0)
    limit = problem.max_cost_per_hour
    if limit is not None and limit - cost < smallest_price - TOLERANCE:
        found.append(Binding("cost", "fleet", f"${cost:.2f}/h of ${limit:.2f}/h: no room for "
                             "another replica"))
    return tuple(found)


def _no_plan(problem: PlacementProblem, problems: tuple[str, ...], seconds: float) -> PlacementPlan:
    return PlacementPlan("infeasible", problem.form, problem.slice_factor, (), (), 0.0, 0.0, (),
                         problems, seconds)


# -- why there is no plan ---------------------------------------------------------------

def _mix(plan: PlacementPlan) -> str:
    return ", ".join(f"{a.pool}×{a.replicas}" for a in plan.allocations if a.replicas) or "nothing"


def _diagnose(problem: PlacementProblem) -> tuple[str, ...]:
    """Relax one family of limits at a time; each relaxation that yields a plan names the
    family that fails and by how much."""
    for p in problem.pools:
        limit, which = p.upper
        if limit is not None and p.min_replicas > limit:
            return (f"pool {p.name}: min_replicas {p.min_replicas} > {which} {limit}",)
    unlimited = tuple(replace(p, max_replicas=None, available_replicas=None) for p in problem.pools)
    no_min = tuple(replace(p, min_replicas=0) for p in problem.pools)
    relaxations = (("pools", replace(problem, pools=unlimited)),
                   ("power", replace(problem, power_budget_watts=None)),
                   ("cost", replace(problem, max_cost_per_hour=None)),
                   ("minimums", replace(problem, pools=no_min)))
    problems = []
    for kind, relaxed in relaxations:
        plan = _solve_relaxed(relaxed)
        if plan is not None:
            problems.append(_relaxation_message(kind, problem, plan))
    if problems:
        return tuple(problems)
    free = replace(problem, pools=tuple(replace(p, min_replicas=0) for p in unlimited),
                   power_budget_watts=None, max_cost_per_hour=None)
    plan = _solve_relaxed(free)
    cheapest = f"; without them the cheapest plan is {_mix(plan)} at ${plan.cost_per_hour:.2f}/h, " \
               f"{plan.power_watts:g} W" if plan else ""
    return ("pool limits, power budget and cost limit together admit no plan" + cheapest,)


def _solve_relaxed(problem: PlacementProblem) -> PlacementPlan | None:
    program = _program(problem)
    result = _run(problem, program)
    return None if result.x is None else _plan(problem, program, result.x, "feasible", 0.0)


def _relaxation_message(kind: str, problem: PlacementProblem, plan: PlacementPlan) -> str:
    if kind == "power":
        return (f"power budget {problem.power_budget_watts:g} W is too small: the cheapest plan "
                f"meeting the SLO draws {plan.power_watts:g} W ({_mix(plan)})")
    if kind == "cost":
        return (f"cost limit ${problem.max_cost_per_hour:.2f}/h is too small: the cheapest plan "
                f"meeting the SLO costs ${plan.cost_per_hour:.2f}/h ({_mix(plan)})")
    if kind == "minimums":
        held = ", ".join(f"{p.name} >= {p.min_replicas}" for p in problem.pools if p.min_replicas)
        return f"pool minimums ({held}) leave no room within the power budget or cost limit"
    over = [f"{p.name} needs {a.replicas} (its {p.upper[1]} is {p.upper[0]})"
            for p, a in zip(problem.pools, plan.allocations)
            if p.upper[0] is not None and a.replicas > p.upper[0]]
    return ("pool limits are too small to meet the SLO: " + "; ".join(over)
            + f" (cheapest plan without them: {_mix(plan)})")
