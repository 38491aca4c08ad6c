"""How much power a GPU draws on an engine step, and how a power limit or a locked SM
clock slows that step. The sim engine, the cluster simulator, the power policy's
estimates and routing (the expected step time of a capped replica) all use these
functions, so they agree on what a cap costs.

The model. `StepTimeModel.breakdown(batch)` splits a step into compute-bound kernels
(C), memory-bound kernels (M), tensor-parallel all-reduce (K) and fixed per-step
overhead (O), all timed at the GPU's maximum SM clock. At a fraction φ of that clock:

    T(φ) = C/φ + M·(1 + β·(1/φ − 1)) + K + O
    P(φ) = idle + (tdp − idle) · [C/φ · φ^γ + M_φ · (a_hbm + a_sm·φ^γ) + K·a_comm + O·a_wait] / T(φ)

Compute-bound kernels stretch with the clock; memory-bound ones are paced by HBM, which
the SM clock does not drive, so only their small SM-side share (β) stretches. Dynamic
power scales as φ^γ (P ∝ f·V², with the voltage following the clock down the DVFS
curve); HBM power does not follow the SM clock. Dense compute at full clock is the
calibration point: it draws exactly the TDP, the default power limit, so the
uncapped step times are the performance model's own (prefill draws "at TDP").

A power limit makes the GPU lower its clock until the step's average draw fits
(NVIDIA's power controller averages over windows of milliseconds, shorter than a step);
a locked clock pins φ from above, and a limit still applies under a lock. A limit below
what the lowest clock draws (HBM power does not follow the SM clock) is still enforced,
as the hardware's slowdown does: the step stretches until its average draw is the limit.

Calibration (`DEFAULT_COEFFICIENTS`), against the published facts that the table tests
in `tests/unit/test_power_model.py` assert:
- prefill draws about the TDP and decode well below it (Splitwise, Patel et al. 2024):
  dense compute is the TDP by construction, and memory-bound kernels reach a_hbm + a_sm =
  0.70 of the dynamic range (Llama-2-7B on an H100: a 2048-token prefill ≈ 665 W, a
  batch-64 decode step ≈ 495 W; Llama-2-70B at TP 8 decodes at ≈ 415 W per GPU);
- capping an H100 from 700 W to 350 W barely slows decode (Splitwise): with a_hbm = 0.35
  the limit stays reachable without starving HBM, and β = 0.05 keeps decode steps within
  3 % (Llama-2-7B, batch ≤ 64) and 1 % (Llama-2-70B, TP 8), while prefill slows as its
  clock falls (×1.35 for 2048 tokens of Llama-2-7B, its clock down 1980 → ≈ 1470 MHz);
- a 30 % power cut on A100-class inference costs about 7 % latency (Samsi et al. 2023,
  "From Words to Watts"): γ = 2.4 makes a batch of 16 Llama-2-13B requests of the Azure
  conversation trace's median shape (1020-token prompts, 129 output tokens) take 6.7 %
  longer on an A100-80GB limited to 280 W.
Clock ranges are nominal (nvidia-smi's supported-clock lists); at run time the NVML
backend reports each GPU's own. Units: seconds, watts, MHz; draws are per GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from policies.gpu_catalog import GpuSpec
from policies.perfmodel import BatchShape, StepBreakdown, StepTimeModel

__all__ = [
    "CLOCK_CATALOG", "DEFAULT_COEFFICIENTS", "UNCAPPED", "CappedStep", "ClockRange",
    "GpuSetting", "PowerCoefficients", "capped_speed", "capped_step", "clock_range",
    "decode_line", "power_draw", "step_time_at_clock", "step_time_under_cap",
]

_BISECTION_STEPS = 40  # φ to within 2^-40 of the largest clock that fits the limit


@dataclass(frozen=True)
class ClockRange:
    """The SM clocks one GPU type can be locked between, MHz."""

    min_mhz: float
    max_mhz: float

    def __post_init__(self) -> None:
        if not 0 < self.min_mhz <= self.max_mhz:
            raise ValueError(f"ClockRange: need 0 < min_mhz <= max_mhz, got {self.min_mhz}, "
                             f"{self.max_mhz}")

    def fraction(self, mhz: float) -> float:
        """`mhz` as a fraction of the maximum clock, clamped into the lockable range."""
        return min(max(mhz, self.min_mhz), self.max_mhz) / self.max_mhz


# Maximum (boost) SM clocks from NVIDIA's datasheets; minima are the lowest entries of
# nvidia-smi's supported graphics clocks. SXM parts for A100/H100/H200.
CLOCK_CATALOG: Mapping[str, ClockRange] = MappingProxyType({
    "A10G": ClockRange(210, 1710),
    "L4": ClockRange(210, 2040),
    "A40": ClockRange(210, 1740),
    "A100-40GB": ClockRange(210, 1410),
    "A100-80GB": ClockRange(210, 1410),
    "H100": ClockRange(345, 1980),
    "H200": ClockRange(345, 1980),
    "CPU": ClockRange(800, 3000),
})


def clock_range(gpu: GpuSpec) -> ClockRange:
    """The catalog's clock range of `gpu`; a GPU outside it gets the A100's."""
    return CLOCK_CATALOG.get(gpu.name, CLOCK_CATALOG["A100-80GB"])


@dataclass(frozen=True)
class PowerCoefficients:
    """The free parameters of the module's power model (see its note for the fit)."""

    voltage_exponent: float = 2.4  # γ: dynamic power ∝ clock^γ
    memory_clock_sensitivity: float = 0.05  # β: share of memory-bound time that follows the clock
    hbm_activity: float = 0.35  # memory-bound kernels' clock-independent (HBM) power share
    memory_sm_activity: float = 0.35  # their SM-side share, which scales with clock^γ
    comm_activity: float = 0.30  # all-reduce: NVLink and copy engines busy, SMs mostly not
    wait_activity: float = 0.10  # per-step overhead: the GPU awake at full clock, waiting

    def __post_init__(self) -> None:
        if self.voltage_exponent < 1:
            raise ValueError("PowerCoefficients.voltage_exponent must be >= 1 (power must "
                             "fall with the clock)")
        if not 0 <= self.memory_clock_sensitivity <= 1:
            raise ValueError("PowerCoefficients.memory_clock_sensitivity must lie in [0, 1]")
        shares = {"hbm_activity": self.hbm_activity, "memory_sm_activity": self.memory_sm_activity,
                  "comm_activity": self.comm_activity, "wait_activity": self.wait_activity}
        for name, value in shares.items():
            if not 0 <= value <= 1:
                raise ValueError(f"PowerCoefficients.{name} must lie in [0, 1], got {value}")
        if self.hbm_activity + self.memory_sm_activity > 1:
            raise ValueError("PowerCoefficients: hbm_activity + memory_sm_activity must not "
                             "exceed 1 (dense compute, at 1, is what draws the TDP)")

    def clock_power_scale(self, fraction: float) -> float:
        """Dynamic power at `fraction` of the maximum clock, relative to full clock."""
        return fraction ** self.voltage_exponent


DEFAULT_COEFFICIENTS = PowerCoefficients()


@dataclass(frozen=True)
class GpuSetting:
    """What is applied to one GPU: a power limit and an SM clock lock (None: default)."""

    power_limit_w: float | None = None  # None: the default limit, the TDP
    locked_clock_mhz: float | None = None  # None: clocks float up to the maximum

    def __post_init__(self) -> None:
        if self.power_limit_w is not None and self.power_limit_w <= 0:
            raise ValueError(f"GpuSetting.power_limit_w must be positive, got {self.power_limit_w}")
        if self.locked_clock_mhz is not None and self.locked_clock_mhz <= 0:
            raise ValueError(f"GpuSetting.locked_clock_mhz must be positive, got "
                             f"{self.locked_clock_mhz}")

    def tighter(self, other: GpuSetting) -> GpuSetting:
        """The stricter of two settings, field by field (lower limit, lower clock)."""
        return GpuSetting(_lowest(self.power_limit_w, other.power_limit_w),
                          _lowest(self.locked_clock_mhz, other.locked_clock_mhz))


UNCAPPED = GpuSetting()


def _lowest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class CappedStep:
    """One step under a setting: its time, one GPU's average draw and the clock it ran at."""

    seconds: float  # step time under the setting
    watts: float  # average draw of one of the replica's GPUs over the step
    clock_mhz: float  # SM clock the step ran at
    slowdown: float  # seconds over the uncapped step's seconds (1.0 for an empty step)
    limit_binds: bool  # the power limit lowered the clock (or stretched the step)


def _memory_at(parts: StepBreakdown, phi: float, co: PowerCoefficients) -> float:
    return parts.memory_s * (1 + co.memory_clock_sensitivity * (1 / phi - 1))


def _time_at(parts: StepBreakdown, phi: float, co: PowerCoefficients) -> float:
    return parts.compute_s / phi + _memory_at(parts, phi, co) + parts.comm_s + parts.overhead_s


def _watts_at(gpu: GpuSpec, parts: StepBreakdown, phi: float, co: PowerCoefficients) -> float:
    seconds = _time_at(parts, phi, co)
    if seconds == 0:
        return gpu.idle_watts
    scale, memory = co.clock_power_scale(phi), _memory_at(parts, phi, co)
    busy = (parts.compute_s / phi * scale
            + memory * (co.hbm_activity + co.memory_sm_activity * scale)
            + parts.comm_s * co.comm_activity + parts.overhead_s * co.wait_activity)
    return gpu.idle_watts + (gpu.tdp_watts - gpu.idle_watts) * busy / seconds


def _fitting_fraction(gpu: GpuSpec, parts: StepBreakdown, limit_w: float, lo: float,
                      hi: float, co: PowerCoefficients) -> float:
    """The largest clock fraction in [lo, hi] whose draw fits `limit_w` (lo if none does);
    the draw rises with the clock, so bisection finds it."""
    if _watts_at(gpu, parts, hi, co) <= limit_w:
        return hi
    if _watts_at(gpu, parts, lo, co) > limit_w:
        return lo
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _watts_at(gpu, parts, mid, co) <= limit_w else (lo, mid)
    return lo


def capped_step(model: StepTimeModel, batch: BatchShape, setting: GpuSetting = UNCAPPED, *,
                coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> CappedStep:
    """Step `batch` of `model` on GPUs under `setting`: the clock is the lock (or the
    maximum), lowered further until the draw fits the power limit. An empty step draws
    the GPU's idle watts and takes no time."""
    gpu, clocks = model.gpu, clock_range(model.gpu)
    parts = model.breakdown(batch)
    top = 1.0 if setting.locked_clock_mhz is None else clocks.fraction(setting.locked_clock_mhz)
    if batch.is_empty:
        return CappedStep(0.0, gpu.idle_watts, top * clocks.max_mhz, 1.0, False)
    phi, limit = top, setting.power_limit_w
    if limit is not None:
        if limit <= gpu.idle_watts:
            raise ValueError(f"power limit {limit:g} W is not above {gpu.name}'s idle draw "
                             f"{gpu.idle_watts:g} W")
        phi = _fitting_fraction(gpu, parts, limit, clocks.min_mhz / clocks.max_mhz, top,
                                coefficients)
    seconds, watts = _time_at(parts, phi, coefficients), _watts_at(gpu, parts, phi, coefficients)
    stretch = 1.0 if limit is None or watts <= limit else (watts - gpu.idle_watts) / (limit - gpu.idle_watts)
    return CappedStep(seconds * stretch, watts if stretch == 1.0 else limit, phi * clocks.max_mhz,
                      seconds * stretch / parts.total_s, phi < top or stretch > 1.0)


def power_draw(model: StepTimeModel, batch: BatchShape, clock_mhz: float | None = None, *,
               coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> float:
    """Watts one of `model`'s GPUs draws on average over step `batch` at `clock_mhz`
    (default: the maximum clock, what an unlimited GPU runs at), no power limit."""
    return capped_step(model, batch, GpuSetting(locked_clock_mhz=clock_mhz),
                       coefficients=coefficients).watts


def step_time_at_clock(model: StepTimeModel, batch: BatchShape, clock_mhz: float, *,
                       coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> float:
    """Seconds of step `batch` with the SM clock locked at `clock_mhz` (no power limit)."""
    return capped_step(model, batch, GpuSetting(locked_clock_mhz=clock_mhz),
                       coefficients=coefficients).seconds


def step_time_under_cap(model: StepTimeModel, batch: BatchShape, *,
                        cap_watts: float | None = None, clock_mhz: float | None = None,
                        coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> float:
    """Seconds of step `batch` under a per-GPU power limit `cap_watts` and/or an SM clock
    lock `clock_mhz` (either may be None); both None gives `model.step_time(batch)`."""
    setting = GpuSetting(power_limit_w=cap_watts, locked_clock_mhz=clock_mhz)
    return capped_step(model, batch, setting, coefficients=coefficients).seconds


def capped_speed(model: StepTimeModel, setting: GpuSetting = UNCAPPED, *,
                 prefill_tokens: int = 2048, decode_batch: int = 16,
                 context_per_seq: int = 1024,
                 coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> tuple[float, float]:
    """(prompt tokens per second of one `prefill_tokens` prefill, seconds of a decode step
    of `decode_batch` sequences of `context_per_seq` tokens) under `setting`: the speeds
    routing states a replica by (`policies.fleet_view.ReplicaSnapshot`)."""
    prefill = BatchShape.from_requests([(prefill_tokens, 0)])
    decode = BatchShape(decode_seqs=decode_batch,
                        decode_context_tokens=decode_batch * context_per_seq)
    return (prefill_tokens / capped_step(model, prefill, setting, coefficients=coefficients).seconds,
            capped_step(model, decode, setting, coefficients=coefficients).seconds)


def decode_line(model: StepTimeModel, batch_size: int, setting: GpuSetting = UNCAPPED, *,
                context_per_seq: int = 1024,
                coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS) -> tuple[float, float] | None:
    """(a, b) such that a decode step of `batch_size` sequences reading c context tokens in
    all takes a + b·c seconds under `setting` (virtual-time hosts time whole decode runs
    with it), or None when the step time is not linear in c.

    The clock (and any stretch below the HBM floor) is the one the setting gives at
    c = batch_size × context_per_seq, held for every c. A lock holds it exactly; under a
    power limit the draw of a memory-bound step barely depends on c, so the line stays
    within 1 % of `capped_step` for 16-4096 tokens per sequence at limits the SM clock
    can meet (H100 at 350 W), within 5 % at limits below the HBM floor (H100 at 200 W)."""
    if batch_size < 1 or context_per_seq < 1:
        raise ValueError(f"decode_line: batch_size and context_per_seq must be >= 1, got "
                         f"{batch_size}, {context_per_seq}")
    clocks = clock_range(model.gpu)

    def shape(c: int) -> BatchShape:
        return BatchShape(decode_seqs=batch_size, decode_context_tokens=c)

    c0, c1, c2 = batch_size, batch_size * context_per_seq, batch_size * 4 * context_per_seq
    ref = capped_step(model, shape(c1), setting, coefficients=coefficients)
    phi = ref.clock_mhz / clocks.max_mhz
    stretch = ref.seconds / _time_at(model.breakdown(shape(c1)), phi, coefficients)
    t0, t1, t2 = (stretch * _time_at(model.breakdown(shape(c)), phi, coefficients)
                  for c in (c0, c1, c2))
    b = (t1 - t0) / (c1 - c0) if c1 > c0 else (t2 - t0) / (c2 - c0)
    a = t0 - b * c0
    if abs(a + b * c2 - t2) > 1e-9 * t2:
        return None
    return a, b
