"""Table tests of the POLCA-style power policy over hand-made snapshots: thresholds,
priority order, fallback and deepening, hysteresis and hold, stale telemetry, overrides,
several budgets, and the fleet checks the admin API calls."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from policies.power import (
    PowerBudget,
    PowerDecision,
    PowerLevel,
    PowerOp,
    PowerPolicyParams,
    PowerSnapshot,
    ReplicaPower,
    budget_problem,
    decide,
    limit_problem,
    replica_priority,
)
from policies.power_model import GpuSetting

BUDGET = PowerBudget("cluster", "", 2000.0)
PARAMS = PowerPolicyParams()  # cap 0.85, emergency 0.95, uncap 0.80, hold 5 s, period 0.5 s
LOCK_MHZ = round(0.7 * 1980)  # H100's maximum SM clock times lock_clock_fraction


def h100(rid: str, draw: float | None, priority: int = 0, node: str = "n0", **kw) -> ReplicaPower:
    kw.setdefault("observed_at", None if draw is None else 0.0)
    return ReplicaPower.from_catalog(rid, "H100", node, draw_w=draw, priority=priority, **kw)


def snap(replicas, now: float = 0.0, budgets=(BUDGET,), state=None, fresh=True) -> PowerSnapshot:
    """A snapshot at `now`; `fresh` stamps every reading that exists as taken now."""
    if fresh:
        replicas = [replace(r, observed_at=now) if r.draw_w is not None else r for r in replicas]
    kw = {} if state is None else {"state": state}
    return PowerSnapshot(now, tuple(replicas), tuple(budgets), PARAMS, **kw)


def applied(replicas, decision: PowerDecision) -> list[ReplicaPower]:
    """The replicas once the decision's targets are in place."""
    targets = {t.replica_id: t.setting for t in decision.targets}
    return [replace(r, power_limit_w=targets[r.replica_id].power_limit_w or r.default_limit_w,
                    locked_clock_mhz=targets[r.replica_id].locked_clock_mhz) for r in replicas]


def run(replicas, times, budgets=(BUDGET,)) -> list[PowerDecision]:
    """Decide at each of `times` with the same draws, applying each decision."""
    decisions, state = [], None
    for now in times:
        decision = decide(snap(replicas, now, budgets, state))
        decisions.append(decision)
        replicas, state = applied(replicas, decision), decision.state
    return decisions


def settings(decision: PowerDecision) -> dict[str, GpuSetting]:
    return {t.replica_id: t.setting for t in decision.targets}


def ops(decision: PowerDecision) -> set[tuple[str, PowerOp, float | None]]:
    return {(a.replica_id, a.op, a.value) for a in decision.actions}


THREE_TIERS = [h100("low", 600, 0), h100("mid", 500, 5), h100("high", 650, 10)]  # 1750 W


# -- thresholds and priority order -----------------------------------------------------

def test_below_the_cap_threshold_nothing_happens():
    d = decide(snap([h100("a", 800), h100("b", 800)]))  # 80 %
    assert d.level is PowerLevel.NORMAL and d.actions == ()
    assert all(s == GpuSetting() for s in settings(d).values())
    assert d.scopes[0].draw_w == 1600 and d.scopes[0].headroom_w == 400


def test_over_the_cap_threshold_the_lowest_priority_clocks_lock_first():
    d = decide(snap(THREE_TIERS))  # 87.5 %: the low tier's saving covers the excess
    assert d.level is PowerLevel.LOCK
    assert ops(d) == {("low", PowerOp.LOCK_CLOCKS, LOCK_MHZ)}
    assert "cap threshold" in d.reasons[0]


def test_a_larger_excess_locks_more_tiers_but_never_the_top_one():
    replicas = [h100("low", 300, 0), h100("mid", 700, 5), h100("high", 700, 10)]
    d = decide(snap(replicas, budgets=[PowerBudget("cluster", "", 1800)]))  # 94.4 %
    assert d.level is PowerLevel.LOCK
    assert ops(d) == {("low", PowerOp.LOCK_CLOCKS, LOCK_MHZ), ("mid", PowerOp.LOCK_CLOCKS, LOCK_MHZ)}


def test_one_priority_tier_is_the_lowest_and_gets_locked():
    d = decide(snap([h100("a", 900), h100("b", 850)]))
    assert {a.replica_id for a in d.actions if a.op is PowerOp.LOCK_CLOCKS} == {"a", "b"}


def test_over_the_emergency_threshold_every_replica_is_capped_by_priority():
    replicas = [h100("low", 700, 0), h100("mid", 600, 5), h100("high", 650, 10)]  # 97.5 %
    d = decide(snap(replicas))
    assert d.level is PowerLevel.CAP
    assert ops(d) == {("low", PowerOp.SET_POWER_LIMIT, 350), ("mid", PowerOp.SET_POWER_LIMIT, 455),
                      ("high", PowerOp.SET_POWER_LIMIT, 560)}  # 0.5 / 0.65 / 0.8 of 700 W


def test_the_lock_grows_by_a_tier_each_period_the_draw_stays_over():
    d0, d1, d2 = run(THREE_TIERS, [0.0, 0.5, 1.0])
    assert {r for r, op, _ in ops(d0)} == {"low"}
    assert ops(d1) == {("mid", PowerOp.LOCK_CLOCKS, LOCK_MHZ)}
    assert d2.actions == () and d2.level is PowerLevel.LOCK  # the top tier stays free


# -- fallback and deepening ------------------------------------------------------------

def test_clock_locks_that_do_not_bring_the_draw_down_fall_back_to_power_limits():
    decisions = run(THREE_TIERS, [0.0, 0.5, 1.0, 1.5])
    assert [d.level for d in decisions] == [PowerLevel.LOCK] * 3 + [PowerLevel.CAP]
    assert ("high", PowerOp.SET_POWER_LIMIT, 560) in ops(decisions[-1])
    assert "clock locks" in decisions[-1].reasons[0]


def test_cap_deepens_to_the_low_cap_then_to_minimum_limits_and_no_further():
    replicas = [h100("low", 700, 0), h100("high", 700, 10)]
    budgets = [PowerBudget("cluster", "", 1450)]  # 96.6 %, and the draws never fall
    decisions = run(replicas, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5], budgets)
    assert [(d.level, d.scopes[0].depth) for d in decisions][::3] == [
        (PowerLevel.CAP, 0), (PowerLevel.CAP, 1), (PowerLevel.CAP, 2), (PowerLevel.CAP, 2)]
    assert settings(decisions[0])["high"].power_limit_w == 560
    assert settings(decisions[3])["high"].power_limit_w == 350
    assert settings(decisions[6])["high"].power_limit_w == 200  # H100's minimum limit


def test_over_the_budget_itself_cap_deepens_every_period():
    replicas = [h100("low", 700, 0), h100("high", 700, 10)]
    decisions = run(replicas, [0.0, 0.5, 1.0], [PowerBudget("cluster", "", 1300)])  # 108 %
    assert [d.scopes[0].depth for d in decisions] == [0, 1, 2]


# -- hysteresis and hold ---------------------------------------------------------------

def test_between_the_uncap_and_cap_thresholds_the_level_holds():
    d0 = decide(snap(THREE_TIERS))
    cooler = [replace(r, draw_w=550) for r in applied(THREE_TIERS, d0)]  # 1650 W: 82.5 %
    d1 = decide(snap(cooler, now=60.0, state=d0.state))
    assert d1.level is PowerLevel.LOCK and d1.actions == ()


def test_release_waits_for_the_minimum_hold_then_steps_down_one_level_at_a_time():
    hot = [h100("low", 700, 0), h100("high", 700, 10)]
    d0 = decide(snap(hot, budgets=[PowerBudget("cluster", "", 1450)]))  # CAP
    cool = [replace(r, draw_w=300) for r in applied(hot, d0)]  # 41 %
    budgets = [PowerBudget("cluster", "", 1450)]
    early = decide(snap(cool, now=4.0, budgets=budgets, state=d0.state))
    assert early.level is PowerLevel.CAP and early.actions == ()
    d1 = decide(snap(cool, now=5.0, budgets=budgets, state=d0.state))
    assert d1.level is PowerLevel.LOCK
    assert ops(d1) == {("low", PowerOp.RESTORE_POWER_LIMIT, None),
                       ("high", PowerOp.RESTORE_POWER_LIMIT, None)}
    d2 = decide(snap(applied(cool, d1), now=10.0, budgets=budgets, state=d1.state))
    assert d2.level is PowerLevel.NORMAL and "released" in d2.reasons[0]


def test_leaving_lock_unlocks_the_clocks():
    d0 = decide(snap(THREE_TIERS))
    cool = [replace(r, draw_w=400) for r in applied(THREE_TIERS, d0)]
    d1 = decide(snap(cool, now=5.0, state=d0.state))
    assert d1.level is PowerLevel.NORMAL
    assert ops(d1) == {("low", PowerOp.UNLOCK_CLOCKS, None)}


def test_applied_targets_need_no_further_actions():
    d0 = decide(snap(THREE_TIERS))
    d1 = decide(snap(applied(THREE_TIERS, d0), now=0.2, state=d0.state))
    assert d1.actions == () and settings(d1) == settings(d0)


# -- telemetry -------------------------------------------------------------------------

def test_a_replica_without_telemetry_counts_at_its_limit_and_is_capped_to_the_safe_level():
    replicas = [h100("a", 300), h100("b", 300), h100("blind", None)]
    d = decide(snap(replicas))
    assert d.scopes[0].draw_w == 300 + 300 + 700 and d.scopes[0].stale == ("blind",)
    assert ops(d) == {("blind", PowerOp.SET_POWER_LIMIT, 420)}  # 0.6 x 700 W
    assert "telemetry" in d.targets[2].reasons[-1]


def test_telemetry_older_than_the_limit_is_stale_and_may_raise_the_level():
    replicas = [h100("a", 650, observed_at=10.0), h100("b", 650, observed_at=10.0),
                h100("old", 100, observed_at=7.0)]  # 3 s old, the limit is 2 s
    d = decide(snap(replicas, now=10.0, fresh=False))
    assert d.scopes[0].stale == ("old",)
    assert d.scopes[0].draw_w == 650 + 650 + 700  # the old 100 W reading is not trusted
    assert d.level is PowerLevel.CAP


def test_a_replica_whose_telemetry_returns_is_released():
    d0 = decide(snap([h100("a", 300), h100("b", None)]))
    back = [replace(r, draw_w=300.0, observed_at=1.0) for r in applied([h100("a", 300), h100("b", None)], d0)]
    d1 = decide(snap(back, now=1.0, state=d0.state))
    assert ops(d1) == {("b", PowerOp.RESTORE_POWER_LIMIT, None)}


def test_without_a_budget_nothing_is_capped_not_even_blind_replicas():
    d = decide(snap([h100("a", 650), h100("blind", None)], budgets=()))
    assert d.actions == () and d.scopes == () and d.level is PowerLevel.NORMAL


def test_a_recent_reading_is_trusted():
    d = decide(PowerSnapshot(10.0, (h100("a", 100, observed_at=8.5),), (BUDGET,), PARAMS))
    assert d.scopes[0].stale == () and d.scopes[0].draw_w == 100 and d.actions == ()


# -- overrides, capabilities and budgets -------------------------------------------------

def test_an_operator_pin_overrides_the_policy():
    replicas = [h100("low", 700, 0, pinned_limit_w=650), h100("high", 700, 10)]
    d = decide(snap(replicas, budgets=[PowerBudget("cluster", "", 1450)]))
    assert settings(d)["low"] == GpuSetting(650, None)
    assert ("low", PowerOp.SET_POWER_LIMIT, 650) in ops(d)


def test_read_only_replicas_get_no_actions_and_the_reason_says_so():
    replicas = [replace(r, controllable=False) for r in THREE_TIERS]
    d = decide(snap(replicas))
    assert d.level is PowerLevel.LOCK and d.actions == ()
    assert any("read-only" in reason for reason in d.reasons)


def test_without_clock_locks_a_power_limit_stands_in():
    replicas = [replace(THREE_TIERS[0], can_lock_clocks=False), *THREE_TIERS[1:]]
    d = decide(snap(replicas))
    assert ops(d) == {("low", PowerOp.SET_POWER_LIMIT, 350)}


def test_a_node_budget_caps_only_its_node_and_the_tightest_target_wins():
    replicas = [h100("a", 600, node="n1"), h100("b", 550, node="n1"), h100("c", 600, node="n2")]
    budgets = [PowerBudget("cluster", "", 3000), PowerBudget("node", "n1", 1200)]  # n1 at 95.8 %
    d = decide(snap(replicas, budgets=budgets))
    by_key = {s.key: s for s in d.scopes}
    assert by_key["cluster"].level is PowerLevel.NORMAL
    assert by_key["node:n1"].level is PowerLevel.CAP and d.level is PowerLevel.CAP
    assert {r for r, _, _ in ops(d)} == {"a", "b"}


def test_a_budget_capping_cannot_reach_is_reported():
    d = decide(snap([h100("a", 650), h100("b", 650)], budgets=[PowerBudget("cluster", "", 350)]))
    assert any("below what capping reaches (400 W" in reason for reason in d.reasons)


def test_replica_priority_comes_from_the_model_override_else_its_busiest_class():
    slo = {"interactive": 10, "batch": 0}
    assert replica_priority("m", ["batch", "interactive"], slo, {}, 10) == 10
    assert replica_priority("m", ["batch"], slo, {}, 10) == 0
    assert replica_priority("m", [], slo, {}, 10) == 10  # idle: the default class's
    assert replica_priority("m", ["interactive"], slo, {"m": 3}, 10) == 3


@pytest.mark.parametrize(("budget", "gpus", "over", "match"), [
    (100, ["H100", "H100"], None, "below the idle draw of its 2 GPUs \\(140 W\\)"),
    (1000, ["H100", "H100"], 1.3, "peak draw 1400 W exceeds the budget 1000 W"),
    (0, ["L4"], None, "must be positive"),
])
def test_budget_problems_name_the_reason(budget, gpus, over, match):
    problem = budget_problem(budget, gpus, oversubscription=over)
    assert problem is not None and re.search(match, problem)


def test_a_budget_the_fleet_fits_has_no_problem():
    assert budget_problem(1100, ["H100", "H100"], oversubscription=1.3) is None


def test_caps_outside_the_range_are_refused_with_the_range():
    assert limit_problem(800, (200, 700), "H100") == (
        "power limit 800 W is outside H100's supported range 200-700 W")
    assert limit_problem(350, (200, 700), "H100") is None


@pytest.mark.parametrize(("build", "match"), [
    (lambda: h100("a", 100, power_limit_w=800), "outside the GPU's supported range"),
    (lambda: h100("a", -1), "draw_w"),
    (lambda: replace(h100("a", 100), observed_at=None), "go together"),
    (lambda: snap([h100("a", 1), h100("a", 2)]), "duplicate replica ids"),
    (lambda: PowerPolicyParams(cap_threshold=0.7), "uncap_threshold < cap_threshold"),
    (lambda: PowerBudget("rack", "r", 10), "cluster, row or node"),
])
def test_bad_snapshots_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()
