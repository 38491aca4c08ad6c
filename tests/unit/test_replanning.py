"""The re-planning decision: table tests over literal fleets and plans, and transition order."""

from __future__ import annotations

import pytest

from policies.capacity import CapacityProfile, Slo
from policies.placement import PlacementPlan, PlacementProblem, PoolAllocation, PoolOption
from policies.replanning import FleetMix, ReplanSettings, decide, fleet_mix, transition
from policies.workload import BucketScheme, WorkloadProfile

SETTINGS = ReplanSettings(min_relative_saving=0.1, min_dwell_s=600, move_cost_per_replica=1.0,
                          payback_s=3600)


def plan(cost: float, **replicas: int) -> PlacementPlan:
    allocations = tuple(PoolAllocation(p, p, "m", n, n, 0.0, 0.0) for p, n in replicas.items())
    return PlacementPlan("optimal", "continuous", 1, allocations, (), cost, 0.0, (), (), 0.0)


NO_PLAN = PlacementPlan("infeasible", "continuous", 1, (), (), 0.0, 0.0, (), ("bucket x: no GPU",), 0.0)


@pytest.mark.parametrize("fleet, target, last_change, action, reason", [
    # no feasible plan: keep, whatever else holds
    (FleetMix({"A": 2}, 10.0, True), NO_PLAN, None, "keep", "no feasible plan: bucket x"),
    # already there
    (FleetMix({"A": 2}, 10.0, True), plan(10.0, A=2), None, "keep", "already"),
    # lacking capacity: change at once, dwell or not
    (FleetMix({"A": 2}, 10.0, False), plan(15.0, A=3), 1000.0, "change", "lacks capacity"),
    # within the dwell time
    (FleetMix({"A": 4}, 20.0, True), plan(10.0, A=2), 800.0, "keep", "dwell"),
    # saves 5% < 10%
    (FleetMix({"A": 4}, 20.0, True), plan(19.0, B=3), None, "keep", "hysteresis"),
    # saves 20% = $4/h, but 7 moves cost $7 > $4 within the hour
    (FleetMix({"A": 4}, 20.0, True), plan(16.0, B=3), None, "keep", "moving 7 replicas"),
    # saves $10/h for $2 of moves
    (FleetMix({"A": 4}, 20.0, True), plan(10.0, A=2), 0.0, "change", "saves $10.00/h (50%)"),
])
def test_decision_table(fleet, target, last_change, action, reason):
    decision = decide(fleet, target, now_s=1000.0, last_change_s=last_change, settings=SETTINGS)
    assert decision.action == action
    assert reason in decision.reason
    assert decision.transition.empty == (action == "keep")


def test_change_scales_out_first_then_drains():
    decision = decide(FleetMix({"A": 4, "B": 1}, 20.0, True), plan(8.0, A=1, B=2, C=1),
                      now_s=0.0, last_change_s=None, settings=SETTINGS)
    t = decision.transition
    assert [(c.pool, c.delta) for c in t.scale_out] == [("B", 1), ("C", 1)]
    assert [(c.pool, c.delta) for c in t.drain] == [("A", -3)]
    assert t.moves == 5 and decision.move_cost == 5.0
    assert decision.saving_per_hour == 12.0


def test_urgent_is_flagged_even_when_there_is_no_plan():
    decision = decide(FleetMix({"A": 1}, 5.0, False), NO_PLAN, now_s=0.0, last_change_s=None)
    assert decision.action == "keep" and decision.urgent


def test_transition_of_identical_mixes_is_empty():
    assert transition({"A": 2, "B": 0}, {"A": 2}).empty


def test_fleet_mix_prices_and_checks_the_current_fleet():
    scheme = BucketScheme((1, 100), (1, 10))
    cap = CapacityProfile("m", "L4", 1, scheme, Slo(1, 0.1), (4.0,), ("tpot",))
    problem = PlacementProblem((WorkloadProfile("m", scheme, (6.0,), 60.0),),
                               (PoolOption("L4", cap, 0.7),))
    assert fleet_mix(problem, {"L4": 2}) == FleetMix({"L4": 2}, pytest.approx(1.4), True)
    assert not fleet_mix(problem, {"L4": 1}).carries_load


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_dwell_s"):
        ReplanSettings(min_dwell_s=-1)
    with pytest.raises(ValueError, match="payback_s"):
        ReplanSettings(payback_s=0)
