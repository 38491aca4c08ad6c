"""What the power policy decides over, and what it decides: frozen snapshots in, a frozen
decision out (see `policies.power.decide`). Units: watts, MHz, seconds (the clock the
controller hands in); `draw_w` is a replica's total over its GPUs, limits and clocks are
per GPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from policies.gpu_catalog import gpu_spec
from policies.power_model import GpuSetting, clock_range


class PowerLevel(enum.IntEnum):
    """How hard a budget is being defended; higher is harder."""

    NORMAL = 0  # nothing applied
    LOCK = 1  # SM clocks of the lowest-priority replicas locked lower
    CAP = 2  # a power limit on every replica, milder for higher priority


@dataclass(frozen=True)
class ReplicaPower:
    """One replica's GPUs as the power controller last saw them."""

    replica_id: str
    gpu_type: str
    node_id: str
    default_limit_w: float  # the GPU's default power limit (NVML's; the TDP)
    limit_range_w: tuple[float, float]  # (min, max) power limit NVML accepts
    clock_range_mhz: tuple[float, float]  # (min, max) SM clock it can be locked to
    idle_w: float  # per GPU draw with nothing running
    power_limit_w: float  # the limit applied now
    row: str = ""  # the row of racks its node sits in ("" where rows are not configured)
    gpus: int = 1
    draw_w: float | None = None  # total over its GPUs; None when never read
    observed_at: float | None = None  # when `draw_w` was read
    locked_clock_mhz: float | None = None  # the SM clock lock applied now
    priority: int = 0  # higher is more important (see `policies.power.replica_priority`)
    pinned_limit_w: float | None = None  # an operator's override: this limit, nothing else
    controllable: bool = True  # False: read-only telemetry (no privilege to set anything)
    can_lock_clocks: bool = True  # False: clock locks unsupported, power limits stand in

    def __post_init__(self) -> None:
        lo, hi = self.limit_range_w
        if not 0 < lo <= hi:
            raise ValueError(f"replica {self.replica_id}: limit_range_w must be 0 < min <= max, "
                             f"got {self.limit_range_w}")
        if not 0 < self.clock_range_mhz[0] <= self.clock_range_mhz[1]:
            raise ValueError(f"replica {self.replica_id}: clock_range_mhz must be 0 < min <= "
                             f"max, got {self.clock_range_mhz}")
        if self.gpus < 1:
            raise ValueError(f"replica {self.replica_id}: gpus must be >= 1, got {self.gpus}")
        if self.draw_w is not None and self.draw_w < 0:
            raise ValueError(f"replica {self.replica_id}: draw_w must not be negative")
        if (self.draw_w is None) != (self.observed_at is None):
            raise ValueError(f"replica {self.replica_id}: draw_w and observed_at go together")
        for name in ("default_limit_w", "power_limit_w", "pinned_limit_w"):
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"replica {self.replica_id}: {name} {value:g} W is outside the "
                                 f"GPU's supported range {lo:g}-{hi:g} W")

    @classmethod
    def from_catalog(cls, replica_id: str, gpu_type: str, node_id: str, **fields) -> ReplicaPower:
        """A replica on catalog GPUs: ranges, idle draw and default limit from
        `policies.gpu_catalog` and `policies.power_model` (the NVML backend reports the
        real ones); uncapped unless `fields` say otherwise."""
        gpu, clocks = gpu_spec(gpu_type), clock_range(gpu_spec(gpu_type))
        base = dict(default_limit_w=gpu.tdp_watts, power_limit_w=gpu.tdp_watts,
                    limit_range_w=(gpu.min_power_limit_watts, gpu.tdp_watts),
                    clock_range_mhz=(clocks.min_mhz, clocks.max_mhz), idle_w=gpu.idle_watts)
        return cls(replica_id, gpu_type, node_id, **(base | fields))

    @property
    def setting(self) -> GpuSetting:
        """What is applied now (None for the default limit)."""
        limit = None if self.power_limit_w == self.default_limit_w else self.power_limit_w
        return GpuSetting(limit, self.locked_clock_mhz)

    def clamp_limit(self, watts: float) -> float:
        return min(max(watts, self.limit_range_w[0]), self.limit_range_w[1])

    def clamp_clock(self, mhz: float) -> float:
        return min(max(mhz, self.clock_range_mhz[0]), self.clock_range_mhz[1])


@dataclass(frozen=True)
class PowerBudget:
    """A power budget and who draws from it: the whole cluster, one row or one node."""

    kind: str  # "cluster", "row" or "node"
    name: str  # the row or node ("" for the cluster)
    watts: float

    def __post_init__(self) -> None:
        if self.kind not in ("cluster", "row", "node"):
            raise ValueError(f"PowerBudget.kind must be cluster, row or node, got {self.kind!r}")
        if self.watts <= 0:
            raise ValueError(f"power budget {self.key}: watts must be positive, got {self.watts}")

    @property
    def key(self) -> str:
        return self.kind if self.kind == "cluster" else f"{self.kind}:{self.name}"

    def covers(self, replica: ReplicaPower) -> bool:
        return (self.kind == "cluster" or (self.kind == "row" and replica.row == self.name)
                or (self.kind == "node" and replica.node_id == self.name))


@dataclass(frozen=True)
class PowerPolicyParams:
    """Thresholds are fractions of a budget; the rest as named (see `policies.power`)."""

    cap_threshold: float = 0.85  # lock low-priority clocks at this share of a budget
    emergency_threshold: float = 0.95  # power-limit every replica at this share
    uncap_threshold: float = 0.80  # release one step below this share, after min_hold_s
    min_hold_s: float = 5.0  # seconds a level holds before it may be released
    control_period_s: float = 0.5  # seconds between decisions
    fallback_periods: int = 3  # periods a level may stay over cap_threshold before escalating
    stale_after_s: float = 2.0  # telemetry older than this is no telemetry
    safe_cap_fraction: float = 0.6  # of the default limit, for replicas without telemetry
    lock_clock_fraction: float = 0.7  # of the maximum SM clock, for LOCK
    high_priority_cap_fraction: float = 0.8  # of the default limit, for the top tier at CAP
    low_priority_cap_fraction: float = 0.5  # of the default limit, for the lowest tier at CAP

    def __post_init__(self) -> None:
        if not 0 < self.uncap_threshold < self.cap_threshold <= self.emergency_threshold:
            raise ValueError("power thresholds must satisfy 0 < uncap_threshold < cap_threshold "
                             f"<= emergency_threshold, got {self.uncap_threshold}, "
                             f"{self.cap_threshold}, {self.emergency_threshold}")
        if self.min_hold_s < 0 or self.control_period_s <= 0 or self.stale_after_s <= 0:
            raise ValueError("min_hold_s must be >= 0, control_period_s and stale_after_s > 0")
        if self.fallback_periods < 1:
            raise ValueError(f"fallback_periods must be >= 1, got {self.fallback_periods}")
        for name in ("safe_cap_fraction", "lock_clock_fraction", "high_priority_cap_fraction",
                     "low_priority_cap_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.low_priority_cap_fraction > self.high_priority_cap_fraction:
            raise ValueError("low_priority_cap_fraction must not exceed high_priority_cap_fraction")


MAX_DEPTH = 2  # at CAP: 0 graded caps, 1 every replica at the low cap, 2 at its minimum limit


@dataclass(frozen=True)
class ScopeState:
    """What the policy remembers of one budget between decisions."""

    key: str
    level: PowerLevel = PowerLevel.NORMAL
    depth: int = 0  # how far CAP has deepened, 0..MAX_DEPTH
    since: float = float("-inf")  # when level or depth last changed
    locked_tiers: int = 0  # lowest priority tiers whose clocks are locked
    tiers_since: float = float("-inf")  # when locked_tiers last grew


@dataclass(frozen=True)
class PowerControlState:
    """The policy's memory, handed back in every decision for the next snapshot."""

    scopes: tuple[ScopeState, ...] = ()

    def scope(self, key: str) -> ScopeState:
        return next((s for s in self.scopes if s.key == key), ScopeState(key))


@dataclass(frozen=True)
class PowerSnapshot:
    """Everything one decision sees."""

    now: float  # seconds, the clock of `observed_at` and of the state's times
    replicas: tuple[ReplicaPower, ...]
    budgets: tuple[PowerBudget, ...]
    params: PowerPolicyParams = field(default_factory=PowerPolicyParams)
    state: PowerControlState = field(default_factory=PowerControlState)

    def __post_init__(self) -> None:
        ids = [r.replica_id for r in self.replicas]
        if len(set(ids)) != len(ids):
            raise ValueError("PowerSnapshot.replicas: duplicate replica ids")
        keys = [b.key for b in self.budgets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"PowerSnapshot.budgets: duplicate budgets {sorted(keys)}")


class PowerOp(str, enum.Enum):
    """One call on a GPU's power controls (`actors.power.PowerBackend`)."""

    LOCK_CLOCKS = "lock_clocks"  # value: MHz, the SM clock's ceiling
    UNLOCK_CLOCKS = "unlock_clocks"
    SET_POWER_LIMIT = "set_power_limit"  # value: watts per GPU
    RESTORE_POWER_LIMIT = "restore_power_limit"  # back to the default limit


@dataclass(frozen=True)
class PowerAction:
    """Apply `op` to every GPU of one replica."""

    replica_id: str
    op: PowerOp
    value: float | None  # MHz or watts, see PowerOp; None for the unlock/restore ops
    reason: str


@dataclass(frozen=True)
class ReplicaTarget:
    """The setting a replica's GPUs should have after this decision, and why."""

    replica_id: str
    setting: GpuSetting
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class ScopeStatus:
    """One budget after this decision."""

    key: str
    budget_w: float
    draw_w: float  # members' draws, stale ones counted at their power limit
    level: PowerLevel
    depth: int
    floor_w: float  # the draw at every member's minimum limit: the deepest capping reaches
    stale: tuple[str, ...]  # members without fresh telemetry

    @property
    def headroom_w(self) -> float:
        return self.budget_w - self.draw_w


@dataclass(frozen=True)
class PowerDecision:
    """What to change, the level each budget is at, and the state for the next snapshot."""

    level: PowerLevel  # the highest over the budgets
    scopes: tuple[ScopeStatus, ...]
    targets: tuple[ReplicaTarget, ...]  # one per replica
    actions: tuple[PowerAction, ...]  # changes from what is applied now
    state: PowerControlState
    reasons: tuple[str, ...]  # what moved and why, for logs and the admin API
