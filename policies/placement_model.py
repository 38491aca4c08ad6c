"""The nouns of GPU-mix placement: candidate pools, the problem, and the plan answered.

`policies.placement` solves a `PlacementProblem` into a `PlacementPlan`; these classes are
what the controller, the admin API and the CLI hand in and read back.

Units: $/h, watts, requests per second, replica-loads (1.0 = one replica fully busy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from policies.capacity import CapacityProfile
from policies.gpu_catalog import GPU_CATALOG
from policies.workload import WorkloadProfile

Form = Literal["sliced", "continuous"]
Status = Literal["optimal", "feasible", "infeasible"]

__all__ = ["Assignment", "Binding", "Form", "PlacementPlan", "PlacementProblem", "PoolAllocation",
           "PoolOption", "Status"]


@dataclass(frozen=True)
class PoolOption:
    """A pool the solver may use: one GPU type serving one model, with its limits."""

    name: str
    capacity: CapacityProfile  # its model, GPU type, gpus_per_replica and rates per bucket
    price_per_gpu_hour: float  # $/h of one GPU
    min_replicas: int = 0
    max_replicas: int | None = None  # None: no limit of its own
    available_replicas: int | None = None  # what the cluster or cloud can give now; None: any
    watts_per_gpu: float | None = None  # None: the catalog's TDP of the GPU type

    def __post_init__(self) -> None:
        if self.capacity.gpu_type not in GPU_CATALOG and self.watts_per_gpu is None:
            raise ValueError(f"pool {self.name!r}: unknown GPU type {self.capacity.gpu_type!r} "
                             f"(known: {', '.join(sorted(GPU_CATALOG))})")
        if not self.price_per_gpu_hour >= 0:
            raise ValueError(f"pool {self.name!r}: price_per_gpu_hour must be >= 0")
        for field in ("max_replicas", "available_replicas"):
            if (getattr(self, field) or 0) < 0:
                raise ValueError(f"pool {self.name!r}: {field} must be >= 0")
        if self.min_replicas < 0 or (self.max_replicas is not None
                                     and self.min_replicas > self.max_replicas):
            raise ValueError(f"pool {self.name!r}: need 0 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas}, {self.max_replicas}")

    @property
    def model(self) -> str:
        return self.capacity.model

    @property
    def gpu_type(self) -> str:
        return self.capacity.gpu_type

    @property
    def gpus_per_replica(self) -> int:
        return self.capacity.gpus_per_replica

    @property
    def price_per_replica(self) -> float:
        return self.price_per_gpu_hour * self.gpus_per_replica

    @property
    def watts_per_replica(self) -> float:
        watts = self.watts_per_gpu
        return (GPU_CATALOG[self.gpu_type].tdp_watts if watts is None else watts) * self.gpus_per_replica

    @property
    def upper(self) -> tuple[int | None, str]:
        """The tighter of max_replicas and available_replicas, and which one it is."""
        limits = [(v, n) for v, n in ((self.max_replicas, "max_replicas"),
                                      (self.available_replicas, "available")) if v is not None]
        return min(limits) if limits else (None, "")


@dataclass(frozen=True)
class PlacementProblem:
    """What to place: workloads (one per model), candidate pools and fleet-wide limits."""

    workloads: tuple[WorkloadProfile, ...]
    pools: tuple[PoolOption, ...]
    form: Form = "continuous"
    slice_factor: int = 8  # slices per bucket in the sliced form
    power_budget_watts: float | None = None  # Σ TDP of the planned GPUs may not exceed it
    max_cost_per_hour: float | None = None  # $/h the plan may not exceed
    time_limit_s: float = 30.0  # HiGHS stops here and returns its best plan so far

    def __post_init__(self) -> None:
        if self.form not in ("sliced", "continuous"):
            raise ValueError(f"form must be 'sliced' or 'continuous', got {self.form!r}")
        if self.slice_factor < 1:
            raise ValueError(f"slice_factor must be >= 1, got {self.slice_factor}")
        names = [p.name for p in self.pools]
        models = [w.model for w in self.workloads]
        for what, seq in (("pool", names), ("workload model", models)):
            dupes = sorted({n for n in seq if seq.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {what} name(s) {dupes}")
        schemes = {w.model: w.scheme for w in self.workloads}
        for p in self.pools:
            if p.model in schemes and p.capacity.scheme != schemes[p.model]:
                raise ValueError(f"pool {p.name!r}: its capacity profile's buckets differ from "
                                 f"the {p.model} workload's")


@dataclass(frozen=True)
class PoolAllocation:
    """How many replicas a pool gets and how busy they are."""

    pool: str
    gpu_type: str
    model: str
    replicas: int
    gpus: int
    cost_per_hour: float
    load: float  # replica-loads assigned (<= replicas)

    @property
    def utilisation(self) -> float:
        return self.load / self.replicas if self.replicas else 0.0


@dataclass(frozen=True)
class Assignment:
    """A share of one bucket's traffic sent to one pool."""

    model: str
    bucket: int  # index in the workload's scheme
    label: str  # the bucket as text, e.g. "in[2048,4096) out[256,512)"
    rate: float  # the bucket's whole rate, req/s
    pool: str
    fraction: float  # of the bucket's rate, (0, 1]
    load: float  # replica-loads it puts on the pool
    reason: str  # why this pool


@dataclass(frozen=True)
class Binding:
    """A constraint that shapes the plan: kind is "capacity", "max_replicas", "available",
    "min_replicas", "power" or "cost"."""

    kind: str
    subject: str  # the pool, or "fleet"
    detail: str


@dataclass(frozen=True)
class PlacementPlan:
    """The solver's answer. Check `feasible` before using the mix."""

    status: Status  # "feasible": the time limit stopped HiGHS before it proved optimality
    form: Form
    slice_factor: int
    allocations: tuple[PoolAllocation, ...]
    assignments: tuple[Assignment, ...]
    cost_per_hour: float
    power_watts: float  # Σ TDP of the planned GPUs
    binding: tuple[Binding, ...]
    problems: tuple[str, ...]  # why there is no plan (empty when feasible)
    solve_time_s: float

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def replicas(self) -> Mapping[str, int]:
        """Replicas per pool (every candidate pool, zeros included)."""
        return {a.pool: a.replicas for a in self.allocations}
