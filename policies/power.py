"""The power controller's policy, after POLCA (Patel et al., ASPLOS 2024): keep every power
budget (the cluster's, a row's, a node's) from being exceeded while more GPUs are deployed
than the budget could feed at full power, slowing the least important replicas first.

`decide(snapshot) -> PowerDecision` runs once per control period. Per budget:

1. Draw. Sum the draws of the replicas under it. A replica whose telemetry is missing or
   older than `stale_after_s` counts at its power limit (the most its GPUs can draw) and
   is capped to `safe_cap_fraction` of its default limit: no news is not headroom. A
   replica under no budget is never capped.
2. Level, with hysteresis, on ratio = draw / budget:
   - ≥ `emergency_threshold`: CAP at once;
   - ≥ `cap_threshold`: at least LOCK at once; still there `fallback_periods` periods
     after LOCK began: CAP (power limits are the guaranteed fallback where clock locks do
     not bring the draw down); still there as long after CAP (or its last deepening), or
     one period when the draw exceeds the budget itself: one step deeper, from graded
     caps to every replica at the low-priority cap to every replica at its minimum limit;
   - < `uncap_threshold` with the level held `min_hold_s`: one step back;
   - otherwise the level holds.
3. Targets. Priorities split the budget's replicas into tiers. LOCK locks the SM clocks of
   the lowest tiers at `lock_clock_fraction` of the maximum clock: as many tiers as the
   estimated saving needs to bring the draw under `uncap_threshold`, one more each period
   the draw stays over `cap_threshold`, never the top tier while there are others. CAP
   limits every replica to a fraction of its default limit graded by tier, from
   `low_priority_cap_fraction` (lowest) to `high_priority_cap_fraction` (highest).
4. A replica under several budgets gets the tightest of their targets; an operator's
   pinned limit overrides them; read-only replicas keep what they have. The actions are
   the differences between the targets and what is applied now.

Pure: the clock is `snapshot.now`, the memory between periods is `snapshot.state`, which
each decision hands back updated. Units: watts, MHz, seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from policies.gpu_catalog import gpu_spec
from policies.power_model import DEFAULT_COEFFICIENTS, UNCAPPED, GpuSetting
from policies.power_snapshot import (
    MAX_DEPTH,
    PowerAction,
    PowerBudget,
    PowerControlState,
    PowerDecision,
    PowerLevel,
    PowerOp,
    PowerPolicyParams,
    PowerSnapshot,
    ReplicaPower,
    ReplicaTarget,
    ScopeState,
    ScopeStatus,
)

__all__ = [
    "PowerAction", "PowerBudget", "PowerControlState", "PowerDecision", "PowerLevel",
    "PowerOp", "PowerPolicyParams", "PowerSnapshot", "ReplicaPower", "ReplicaTarget",
    "ScopeState", "ScopeStatus", "budget_problem", "decide", "limit_problem",
    "replica_priority",
]

_EPS = 1e-9  # periods are sums of float seconds


def decide(snapshot: PowerSnapshot) -> PowerDecision:
    """The targets and actions of one control period (see the module's note)."""
    p, now = snapshot.params, snapshot.now
    stale = {r.replica_id for r in snapshot.replicas if _is_stale(r, now, p)}
    wanted = {r.replica_id: (UNCAPPED, []) for r in snapshot.replicas}
    scopes, states, reasons = [], [], []
    for budget in snapshot.budgets:
        members = [r for r in snapshot.replicas if budget.covers(r)]
        draw = sum(_assumed_draw(r, r.replica_id in stale) for r in members)
        prev = snapshot.state.scope(budget.key)
        state, why = _next_level(prev, draw / budget.watts, now, p)
        state = _grow_locks(state, prev, members, draw, budget, now, p, stale)
        reasons += [f"{budget.key}: {why}"] if why else []
        floor = sum(r.limit_range_w[0] * r.gpus for r in members)
        if floor > budget.watts:
            reasons.append(f"{budget.key}: budget {budget.watts:g} W is below what capping "
                           f"reaches ({floor:g} W at every minimum limit)")
        for r, setting, why in _scope_targets(state, members, p):
            old, whys = wanted[r.replica_id]
            wanted[r.replica_id] = old.tighter(setting), whys + [why]
        states.append(state)
        scopes.append(ScopeStatus(budget.key, budget.watts, draw, state.level, state.depth,
                                  floor, tuple(sorted(stale & {r.replica_id for r in members}))))
    covered = {r.replica_id for b in snapshot.budgets for r in snapshot.replicas if b.covers(r)}
    targets = [_final_target(r, *wanted[r.replica_id], r.replica_id in stale & covered, p, reasons)
               for r in snapshot.replicas]
    actions = [a for r, t in zip(snapshot.replicas, targets, strict=True) for a in _diff(r, t)]
    level = max((s.level for s in scopes), default=PowerLevel.NORMAL)
    return PowerDecision(level, tuple(scopes), tuple(targets), tuple(actions),
                         PowerControlState(tuple(states)), tuple(reasons))


# -- telemetry -------------------------------------------------------------------------

def _is_stale(r: ReplicaPower, now: float, p: PowerPolicyParams) -> bool:
    return r.observed_at is None or now - r.observed_at > p.stale_after_s


def _assumed_draw(r: ReplicaPower, stale: bool) -> float:
    return r.power_limit_w * r.gpus if stale else r.draw_w


# -- levels ----------------------------------------------------------------------------

def _next_level(prev: ScopeState, ratio: float, now: float,
                p: PowerPolicyParams) -> tuple[ScopeState, str | None]:
    """The budget's level after seeing `ratio` = draw / budget, and why it moved."""
    held = now - prev.since
    patience = 1 if ratio >= 1.0 else p.fallback_periods  # over the budget itself: no waiting
    overdue = held >= patience * p.control_period_s - _EPS
    at = f"draw at {ratio:.1%} of the budget"
    if ratio >= p.emergency_threshold and prev.level < PowerLevel.CAP:
        return _moved(prev, PowerLevel.CAP, 0, now), f"{at} >= emergency threshold: CAP"
    if ratio >= p.cap_threshold:
        if prev.level is PowerLevel.NORMAL:
            return _moved(prev, PowerLevel.LOCK, 0, now), f"{at} >= cap threshold: LOCK"
        if prev.level is PowerLevel.LOCK and overdue:
            return (_moved(prev, PowerLevel.CAP, 0, now),
                    f"{at} still >= cap threshold after {held:g} s of clock locks: CAP")
        if prev.level is PowerLevel.CAP and overdue and prev.depth < MAX_DEPTH:
            return (_moved(prev, PowerLevel.CAP, prev.depth + 1, now),
                    f"{at} still >= cap threshold after {held:g} s: CAP depth {prev.depth + 1}")
        return prev, None
    if ratio < p.uncap_threshold and prev.level > PowerLevel.NORMAL and held >= p.min_hold_s:
        if prev.depth > 0:
            return _moved(prev, PowerLevel.CAP, prev.depth - 1, now), f"{at}: CAP depth {prev.depth - 1}"
        if prev.level is PowerLevel.CAP:
            return _moved(prev, PowerLevel.LOCK, 0, now), f"{at} < uncap threshold: LOCK"
        return ScopeState(prev.key, since=now), f"{at} < uncap threshold: released"
    return prev, None


def _moved(prev: ScopeState, level: PowerLevel, depth: int, now: float) -> ScopeState:
    return replace(prev, level=level, depth=depth, since=now)


def _tiers(members: Iterable[ReplicaPower]) -> list[int]:
    """The distinct priorities of a budget's replicas, lowest first."""
    return sorted({r.priority for r in members})


def _lockable(tiers: list[int]) -> int:
    """Tiers LOCK may touch: all but the top one, or the only one."""
    return max(1, len(tiers) - 1)


def _grow_locks(state: ScopeState, prev: ScopeState, members: list[ReplicaPower], draw: float,
                budget: PowerBudget, now: float, p: PowerPolicyParams,
                stale: set[str]) -> ScopeState:
    """At LOCK, lock as many of the lowest tiers as the estimated saving needs to bring
    the draw under the uncap threshold; while the draw stays over the cap threshold with
    the locks in place a period, add at least one tier."""
    if state.level is not PowerLevel.LOCK or draw < p.cap_threshold * budget.watts:
        return state
    tiers = _tiers(members)
    fresh = prev.level is PowerLevel.NORMAL
    if not fresh and (now - state.tiers_since < p.control_period_s - _EPS
                      or state.locked_tiers >= _lockable(tiers)):
        return state
    # the locks in place already show in `draw`; only new tiers' savings count
    excess, saved = draw - p.uncap_threshold * budget.watts, 0.0
    k = state.locked_tiers
    must = k if fresh else k + 1
    while k < _lockable(tiers) and (k < must or saved < excess):
        saved += sum(_lock_saving(r, p) for r in members
                     if r.priority == tiers[k] and r.replica_id not in stale)
        k += 1
    return replace(state, locked_tiers=k, tiers_since=now)


def _lock_saving(r: ReplicaPower, p: PowerPolicyParams) -> float:
    """Watts a clock lock (or, without clock control, the low cap) is expected to save:
    the dynamic draw times the fall of dynamic power with the clock. Optimistic for
    memory-bound decode; the fallback to power limits covers the difference."""
    if not r.controllable or r.pinned_limit_w is not None or r.draw_w is None:
        return 0.0
    if not r.can_lock_clocks:
        return max(0.0, r.draw_w - r.gpus * _low_cap(r, p))
    fraction = _lock_clock(r, p) / r.clock_range_mhz[1]
    return max(0.0, r.draw_w - r.gpus * r.idle_w) * (1 - DEFAULT_COEFFICIENTS.clock_power_scale(fraction))


# -- targets ---------------------------------------------------------------------------

def _lock_clock(r: ReplicaPower, p: PowerPolicyParams) -> float:
    return r.clamp_clock(round(p.lock_clock_fraction * r.clock_range_mhz[1]))


def _share_of_default(r: ReplicaPower, fraction: float) -> float:
    """`fraction` of the default limit in whole watts, within the GPU's range."""
    return r.clamp_limit(round(fraction * r.default_limit_w))


def _low_cap(r: ReplicaPower, p: PowerPolicyParams) -> float:
    return _share_of_default(r, p.low_priority_cap_fraction)


def _cap_limit(r: ReplicaPower, rank: int, tiers: int, depth: int, p: PowerPolicyParams) -> float:
    if depth >= 2:
        return r.limit_range_w[0]
    if depth == 1:
        return _low_cap(r, p)
    share = rank / (tiers - 1) if tiers > 1 else 1.0
    fraction = p.low_priority_cap_fraction + share * (p.high_priority_cap_fraction
                                                      - p.low_priority_cap_fraction)
    return _share_of_default(r, fraction)


def _scope_targets(state: ScopeState, members: list[ReplicaPower],
                   p: PowerPolicyParams) -> Iterable[tuple[ReplicaPower, GpuSetting, str]]:
    """What one budget's level asks of each of its replicas."""
    if state.level is PowerLevel.NORMAL:
        return
    tiers = _tiers(members)
    for r in members:
        rank = tiers.index(r.priority)
        lock, limit, whys = None, None, []
        if rank < state.locked_tiers:
            if r.can_lock_clocks:
                lock = _lock_clock(r, p)
                whys.append(f"clocks locked to {lock:g} MHz")
            else:
                limit = _low_cap(r, p)
                whys.append(f"limited to {limit:g} W in place of a clock lock")
        if state.level is PowerLevel.CAP:
            limit = _cap_limit(r, rank, len(tiers), state.depth, p)
            whys.append(f"limited to {limit:g} W per GPU (CAP depth {state.depth})")
        if whys:
            yield (r, GpuSetting(limit, lock),
                   f"{state.key} {state.level.name}, priority tier {rank + 1} of "
                   f"{len(tiers)}: {', '.join(whys)}")


def _final_target(r: ReplicaPower, setting: GpuSetting, whys: list[str], stale: bool,
                  p: PowerPolicyParams, reasons: list[str]) -> ReplicaTarget:
    if stale:
        safe = _share_of_default(r, p.safe_cap_fraction)
        setting = GpuSetting(safe, None).tighter(setting)
        whys = whys + [f"telemetry missing or older than {p.stale_after_s:g} s: "
                       f"limited to the safe {safe:g} W"]
    if r.pinned_limit_w is not None:
        setting = GpuSetting(r.pinned_limit_w, None)
        whys = [f"pinned by the operator to {r.pinned_limit_w:g} W"]
    if setting.power_limit_w == r.default_limit_w:
        setting = replace(setting, power_limit_w=None)
    if not r.controllable and setting != r.setting:
        reasons.append(f"{r.replica_id}: read-only power controls, wanted {setting}, kept as is")
        setting, whys = r.setting, whys + ["read-only: nothing applied"]
    return ReplicaTarget(r.replica_id, setting, tuple(whys))


def _diff(r: ReplicaPower, target: ReplicaTarget) -> list[PowerAction]:
    """The calls that take `r` from what it has to `target`: limits first, they bound
    the draw for sure."""
    actions, why = [], "; ".join(target.reasons) or "released"
    want, have = target.setting, r.setting
    if want.power_limit_w is None and have.power_limit_w is not None:
        actions.append(PowerAction(r.replica_id, PowerOp.RESTORE_POWER_LIMIT, None, why))
    elif want.power_limit_w is not None and want.power_limit_w != have.power_limit_w:
        actions.append(PowerAction(r.replica_id, PowerOp.SET_POWER_LIMIT, want.power_limit_w, why))
    if want.locked_clock_mhz is None and have.locked_clock_mhz is not None:
        actions.append(PowerAction(r.replica_id, PowerOp.UNLOCK_CLOCKS, None, why))
    elif want.locked_clock_mhz is not None and want.locked_clock_mhz != have.locked_clock_mhz:
        actions.append(PowerAction(r.replica_id, PowerOp.LOCK_CLOCKS, want.locked_clock_mhz, why))
    return actions


# -- priorities and checks -------------------------------------------------------------

def replica_priority(model: str, serving: Iterable[str], slo_priorities: Mapping[str, int],
                     model_priority: Mapping[str, int], default_priority: int) -> int:
    """A replica's power priority: its model's override when configured, else the
    highest priority among the SLO classes of the requests it is serving, else (idle)
    `default_priority`, the default class's. Unknown class names are ignored."""
    if model in model_priority:
        return model_priority[model]
    return max((slo_priorities[c] for c in serving if c in slo_priorities),
               default=default_priority)


def budget_problem(budget_w: float, gpu_types: Iterable[str], *, scope: str = "cluster",
                   oversubscription: float | None = None) -> str | None:
    """Why a budget of `budget_w` cannot feed GPUs of `gpu_types` (one entry per GPU), or
    None: it is below their idle draw, or their peak (every GPU at its TDP) exceeds the
    budget times the `oversubscription` factor when one is given."""
    gpus = [gpu_spec(t) for t in gpu_types]
    idle, peak = sum(g.idle_watts for g in gpus), sum(g.tdp_watts for g in gpus)
    if budget_w <= 0:
        return f"{scope} power budget must be positive, got {budget_w:g} W"
    if budget_w < idle:
        return (f"{scope} power budget {budget_w:g} W is below the idle draw of its "
                f"{len(gpus)} GPUs ({idle:g} W)")
    if oversubscription is not None and peak > budget_w * oversubscription:
        return (f"{scope}: the {len(gpus)} GPUs' peak draw {peak:g} W exceeds the budget "
                f"{budget_w:g} W times the oversubscription factor {oversubscription:g}")
    return None


def limit_problem(watts: float, limit_range_w: tuple[float, float], gpu: str) -> str | None:
    """Why `watts` cannot be a power limit of a GPU accepting `limit_range_w`, or None."""
    lo, hi = limit_range_w
    if not lo <= watts <= hi:
        return f"power limit {watts:g} W is outside {gpu}'s supported range {lo:g}-{hi:g} W"
    return None
