"""What the power manager reports: the one snapshot the admin API, the CLI, the tests and
the metrics read. Frozen; watts, MHz and wall-clock seconds as the field comments say."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPowerStatus:
    """One GPU of a replica, as last read, with the setting applied to it since."""

    replica_id: str
    gpu: int  # its index on the node
    gpu_type: str
    node_id: str
    row: str  # the node's row of racks ("" where rows are not labelled)
    draw_w: float  # average draw over the device's sampling window
    limit_w: float  # the power limit enforced now: the cap
    default_limit_w: float
    headroom_w: float  # limit_w - draw_w
    sm_clock_mhz: float
    locked_clock_mhz: float | None  # the SM clock ceiling applied, None when clocks float
    observed_at: float
    priority: int  # the replica's power priority; the lowest are slowed first
    pinned_limit_w: float | None  # an operator's cap, which overrides the policy
    controllable: bool  # False: read-only (no privilege to cap)
    reason: str  # why not controllable, or why clock locks are unavailable


@dataclass(frozen=True)
class BudgetStatus:
    """One power budget and what the replicas under it draw."""

    scope: str  # "cluster", "row:<name>" or "node:<node id>"
    kind: str  # "cluster", "row" or "node"
    name: str  # the row or node ("" for the cluster)
    budget_w: float
    source: str  # "config" or "operator"
    draw_w: float | None  # its replicas' draws, stale ones counted at their limit; None before a decision
    headroom_w: float | None  # budget_w - draw_w
    level: str  # "normal", "lock" (clocks of the lowest priorities locked) or "cap" (power limits)
    depth: int  # how far "cap" has deepened, 0..2
    floor_w: float | None  # the draw with every replica at its minimum limit: the deepest capping reaches
    stale_replicas: tuple[str, ...]  # without fresh telemetry, counted at their limit and capped safe


@dataclass(frozen=True)
class PowerStatus:
    """The fleet's power: per budget, per GPU, the policy's level and why it moved."""

    level: str  # the highest level over the budgets
    backend: str  # "sim" or "nvml"
    oversubscription: float  # deployed peak draw / budget allowed
    control_period_s: float
    decided_at: float | None  # the last control period (None before the first)
    capping_events: int  # times a budget's level rose since the controller started
    budgets: tuple[BudgetStatus, ...]
    gpus: tuple[GpuPowerStatus, ...]
    reasons: tuple[str, ...]  # what moved at the last decision and why
    failures: tuple[str, ...]  # power actions that failed at the last period (retried the next)


@dataclass(frozen=True)
class PowerCapStatus:
    """An operator's cap on one replica's GPUs."""

    replica_id: str
    pinned_limit_w: float | None  # per GPU; None: the policy decides
    limit_w: float  # the limit its GPUs run under now (a new pin lands within one control period)
    limit_range_w: tuple[float, float]  # (min, max) limit its GPUs accept
