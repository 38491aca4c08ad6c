"""Whether to move the live fleet to a newly solved mix, and in what order.

The solver re-plans every period over the latest workload window, and a window's
optimum wobbles with noise; following every wobble would churn replicas (each move is a
migration and a cold start) for little gain. The decision, in order:
1. No feasible plan: keep the fleet as it is (the plan's problems say why).
2. The plan equals the fleet: keep.
3. The fleet no longer carries the workload within the SLO: change now — dwell and
   hysteresis never hold back adding capacity.
4. The last change was less than `min_dwell_s` ago: keep.
5. The saving is under `min_relative_saving` of the current cost (hysteresis): keep.
6. The saving over `payback_s` does not repay moving (`move_cost_per_replica` for each
   replica started or drained): keep.
7. Otherwise change.
A change is ordered so that no request is dropped: first scale out every pool that
grows (and wait until those replicas are ready), then drain the replicas to remove —
their requests migrate to the rest — and stop them.

Units: seconds, $/h, $.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from policies.placement import PlacementPlan, PlacementProblem, check_mix

__all__ = ["FleetMix", "PoolChange", "ReplanDecision", "ReplanSettings", "Transition",
           "decide", "fleet_mix", "transition"]


@dataclass(frozen=True)
class ReplanSettings:
    """How eager the fleet is to follow a new plan."""

    min_relative_saving: float = 0.10  # hysteresis: a change must save this share of the cost
    min_dwell_s: float = 600.0  # seconds between two changes made for cost
    move_cost_per_replica: float = 0.10  # $ per replica started or drained (cold start, migration)
    payback_s: float = 3600.0  # the saving must repay the moves within this many seconds

    def __post_init__(self) -> None:
        for name in ("min_relative_saving", "min_dwell_s", "move_cost_per_replica"):
            if getattr(self, name) < 0:
                raise ValueError(f"ReplanSettings.{name} must be >= 0")
        if not self.payback_s > 0:
            raise ValueError("ReplanSettings.payback_s must be > 0")


@dataclass(frozen=True)
class FleetMix:
    """The fleet as it runs, judged against the latest workload."""

    replicas: Mapping[str, int]  # pool -> replicas now
    cost_per_hour: float
    carries_load: bool  # whether these replicas serve the workload within the SLO

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", MappingProxyType(dict(self.replicas)))


def fleet_mix(problem: PlacementProblem, replicas: Mapping[str, int]) -> FleetMix:
    """Cost of `replicas` at the problem's pool prices, and whether they carry its workload
    (`placement.check_mix`). Pools not in the problem are priced at 0 and carry nothing."""
    prices = {p.name: p.price_per_replica for p in problem.pools}
    cost = sum(prices.get(pool, 0.0) * n for pool, n in replicas.items())
    return FleetMix(replicas, cost, check_mix(problem, replicas).feasible)


@dataclass(frozen=True)
class PoolChange:
    pool: str
    current: int
    target: int

    @property
    def delta(self) -> int:
        return self.target - self.current


@dataclass(frozen=True)
class Transition:
    """The order of a change: every scale-out first, then every drain."""

    scale_out: tuple[PoolChange, ...] = ()  # start these replicas; wait until ready
    drain: tuple[PoolChange, ...] = ()  # then drain (migrate their requests away) and stop

    @property
    def moves(self) -> int:
        """Replicas started plus replicas drained."""
        return sum(abs(c.delta) for c in self.scale_out + self.drain)

    @property
    def empty(self) -> bool:
        return not (self.scale_out or self.drain)


@dataclass(frozen=True)
class ReplanDecision:
    action: Literal["keep", "change"]
    reason: str
    current_cost_per_hour: float
    target_cost_per_hour: float  # the plan's cost (the current cost when there is no plan)
    move_cost: float  # $ of the moves the change needs
    transition: Transition = field(default_factory=Transition)  # empty when keeping
    urgent: bool = False  # the fleet lacks capacity for the workload

    @property
    def saving_per_hour(self) -> float:
        return self.current_cost_per_hour - self.target_cost_per_hour


def transition(current: Mapping[str, int], target: Mapping[str, int]) -> Transition:
    """Scale-outs then drains that take `current` replicas per pool to `target`."""
    pools = sorted(set(current) | set(target))
    changes = [PoolChange(p, current.get(p, 0), target.get(p, 0)) for p in pools]
    return Transition(tuple(c for c in changes if c.delta > 0), tuple(c for c in changes if c.delta < 0))


def decide(fleet: FleetMix, plan: PlacementPlan, *, now_s: float, last_change_s: float | None,
           settings: ReplanSettings = ReplanSettings()) -> ReplanDecision:
    """Keep the fleet or change it to `plan` (see the module's note). `last_change_s` is
    when the fleet last changed for cost (None: never), on the same clock as `now_s`."""
    current = fleet.cost_per_hour
    if not plan.feasible:
        return ReplanDecision("keep", "no feasible plan: " + "; ".join(plan.problems), current,
                              current, 0.0, urgent=not fleet.carries_load)
    steps = transition(fleet.replicas, plan.replicas)
    target, move_cost = plan.cost_per_hour, steps.moves * settings.move_cost_per_replica

    def answer(action: str, reason: str) -> ReplanDecision:
        chosen = steps if action == "change" else Transition()
        return ReplanDecision(action, reason, current, target, move_cost, chosen,
                              not fleet.carries_load)

    if steps.empty:
        return answer("keep", "the fleet already has the planned mix")
    if not fleet.carries_load:
        return answer("change", "the fleet lacks capacity for the workload within the SLO")
    if last_change_s is not None and now_s - last_change_s < settings.min_dwell_s:
        return answer("keep", f"dwell: {now_s - last_change_s:.0f} s since the last change "
                              f"< {settings.min_dwell_s:g} s")
    saving = current - target
    if saving < settings.min_relative_saving * current or saving <= 0:
        return answer("keep", f"hysteresis: saves ${saving:.2f}/h of ${current:.2f}/h "
                              f"(< {settings.min_relative_saving:.0%})")
    repaid = saving * settings.payback_s / 3600
    if repaid <= move_cost:
        return answer("keep", f"moving {steps.moves} replicas costs ${move_cost:.2f}, more than the "
                              f"${repaid:.2f} saved within {settings.payback_s:g} s")
    return answer("change", f"saves ${saving:.2f}/h ({saving / current:.0%}) for "
                            f"${move_cost:.2f} of moves")
