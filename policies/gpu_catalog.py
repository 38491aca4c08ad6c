"""The GPUs Flotilla knows, and how close each gets to its peaks on LLM operators.

`GpuSpec` holds datasheet numbers (units: FLOP/s, bytes/s, bytes, watts, $/h).
`Efficiency` holds, per operator group, the fraction of peak FLOP/s (MFU) and of peak
bandwidth (MBU) the kernels reach plus a fixed per-kernel latency; the roofline in
`policies.perfmodel` turns work into seconds with them.

The efficiencies of A100-80GB, H100 and A40 are fitted to operator timings measured on
those GPUs (Vidur's published profiles, `../shared/data/vidur`) by
`python -m bench.perfmodel_check`, which prints the numbers below and the model's error.
GPUs without measurements borrow them from the nearest measured chip: same die (A100-40GB
from A100-80GB, H200 from H100), or the same class of GDDR6 PCIe inference card (A10G
and L4 from A40). Attention on H100 and A40 borrows the A100 fit (only A100 attention was
measured). Prices are on-demand list prices of one GPU's share of the smallest cloud
instance that holds it, as of 2025; operators set their own per pool in `FleetConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_MIB = 2**20
_GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator's datasheet: dense peaks, capacity, power range and price."""

    name: str  # catalog key, e.g. "H100"
    bf16_flops: float  # dense (no sparsity) BF16 tensor peak, FLOP/s
    hbm_bytes_per_s: float  # memory bandwidth, bytes/s
    memory_bytes: int  # device memory capacity, bytes
    tdp_watts: float  # default (maximum) board power limit, W
    idle_watts: float  # drawn with nothing running, W
    min_power_limit_watts: float  # lowest power limit NVML lets one set, W
    price_per_hour: float  # $/h on-demand for one GPU
    # one direction of the link tensor-parallel all-reduce runs over (NVLink, else PCIe)
    interconnect_bytes_per_s: float = 32e9  # PCIe 4.0 x16

    def __post_init__(self) -> None:
        for field in ("bf16_flops", "hbm_bytes_per_s", "memory_bytes", "tdp_watts",
                      "interconnect_bytes_per_s"):
            if getattr(self, field) <= 0:
                raise ValueError(f"GpuSpec {self.name!r}: {field} must be positive")
        if not 0 <= self.idle_watts <= self.tdp_watts:
            raise ValueError(f"GpuSpec {self.name!r}: idle_watts must lie in [0, tdp_watts]")
        if not 0 < self.min_power_limit_watts <= self.tdp_watts:
            raise ValueError(f"GpuSpec {self.name!r}: min_power_limit_watts must lie in "
                             "(0, tdp_watts]")
        if self.price_per_hour < 0:
            raise ValueError(f"GpuSpec {self.name!r}: price_per_hour must not be negative")


@dataclass(frozen=True)
class Roofline:
    """How one operator group runs on one GPU: time = latency_s + max(FLOPs / (peak × mfu),
    bytes / (bandwidth × mbu)), per kernel call."""

    mfu: float  # fraction of peak FLOP/s reached when compute-bound, (0, 1]
    mbu: float  # fraction of peak bandwidth reached when memory-bound, (0, 1]
    latency_s: float = 0.0  # fixed cost of one kernel call: launch tail, ramp-up, sync

    def __post_init__(self) -> None:
        if not (0 < self.mfu <= 1 and 0 < self.mbu <= 1):
            raise ValueError(f"Roofline: mfu and mbu must lie in (0, 1], got {self.mfu}, "
                             f"{self.mbu}")
        if self.latency_s < 0:
            raise ValueError(f"Roofline: latency_s must not be negative, got {self.latency_s}")


@dataclass(frozen=True)
class Efficiency:
    """Per-GPU efficiency of each operator group, plus communication and step overheads."""

    proj: Roofline  # QKV and output projections
    mlp: Roofline  # gate/up and down projections
    lm_head: Roofline  # vocabulary projection (a wide GEMM like the MLP's)
    attn_prefill: Roofline  # flash attention over prompt tokens
    attn_decode: Roofline  # paged attention of one new token per sequence
    elementwise: Roofline  # norms, rotary embedding, activation, residual add, KV write, embedding
    allreduce_busbw_fraction: float  # bus bandwidth reached, over `interconnect_bytes_per_s`
    allreduce_latency_s: float  # fixed cost of one all-reduce call
    step_overhead_s: float  # scheduler, input preparation and sampling per engine step

    def __post_init__(self) -> None:
        if not 0 < self.allreduce_busbw_fraction <= 1:
            raise ValueError("Efficiency: allreduce_busbw_fraction must lie in (0, 1]")
        if self.allreduce_latency_s < 0 or self.step_overhead_s < 0:
            raise ValueError("Efficiency: allreduce_latency_s and step_overhead_s must not be "
                             "negative")

    def group(self, name: str) -> Roofline:
        """The roofline of operator group `name` ("proj", "mlp", "lm_head", "attn_prefill", ...)."""
        if name not in _GROUPS:
            raise KeyError(f"unknown operator group {name!r} (known: {', '.join(_GROUPS)})")
        return getattr(self, name)


_GROUPS = ("proj", "mlp", "lm_head", "attn_prefill", "attn_decode", "elementwise")


def _gpu(name: str, tflops: float, tb_per_s: float, mib: int, tdp: float, idle: float,
         min_limit: float, price: float, link_gb_per_s: float = 32) -> GpuSpec:
    return GpuSpec(name, tflops * 1e12, tb_per_s * 1e12, mib * _MIB, tdp, idle, min_limit,
                   price, link_gb_per_s * 1e9)


# Peaks are NVIDIA's datasheets (SXM parts for A100/H100/H200), except the A10G, AWS's
# variant of the A10 with no published sheet: ~70 TFLOP/s is its commonly quoted dense
# BF16 rate. Memory is what nvidia-smi reports as total; idle watts its typical reading of
# an idle board; minimum limits are NVML's power-limit range. Links are one direction.
# Prices ($/h, on-demand, 2025): AWS g5.xlarge (A10G); GCP g2-standard-4 (L4),
# a2-highgpu-1g (A100-40GB), a2-ultragpu-1g (A100-80GB); AWS p5.48xlarge / 8 (H100) and
# p5en.48xlarge / 8 (H200), after AWS's June 2025 price cut; RunPod (A40).
GPU_CATALOG: Mapping[str, GpuSpec] = MappingProxyType({
    "A10G": _gpu("A10G", 70.0, 0.600, 23028, 300, 25, 100, 1.006),
    "L4": _gpu("L4", 121.0, 0.300, 23034, 72, 16, 40, 0.7068),
    "A40": _gpu("A40", 149.7, 0.696, 46068, 300, 30, 100, 0.44),
    "A100-40GB": _gpu("A100-40GB", 312.0, 1.555, 40960, 400, 50, 100, 3.6731, 300),
    "A100-80GB": _gpu("A100-80GB", 312.0, 2.039, 81920, 400, 60, 100, 5.0688, 300),
    "H100": _gpu("H100", 989.4, 3.35, 81559, 700, 70, 200, 6.88, 450),
    "H200": _gpu("H200", 989.4, 4.8, 143771, 700, 75, 200, 7.91, 450),
    # A pseudo-device for vLLM on a 2-core x86 laptop CPU: 2 cores × 3 GHz × 64 FP32
    # FLOP/cycle (AVX-512, two FMA units), ~20 GB/s that two cores draw from dual-channel
    # DDR4, 8 GiB of RAM given to one replica, a 28 W package, free.
    "CPU": _gpu("CPU", 0.384, 0.020, 8 * _GIB // _MIB, 28, 5, 8, 0.0),
})


def gpu_spec(name: str) -> GpuSpec:
    """The catalog entry for `name`; KeyError naming the known GPUs when there is none."""
    try:
        return GPU_CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(GPU_CATALOG))
        raise KeyError(f"unknown GPU type {name!r} (known: {known})") from None


def _fitted(proj: Roofline, mlp: Roofline, attn_prefill: Roofline, attn_decode: Roofline,
            elementwise: Roofline, busbw: float, ar_latency_s: float) -> Efficiency:
    # No lm-head timings were measured; it is a wide GEMM, so it takes the MLP's numbers.
    # The step overhead is not in operator data either: ~1 ms is vLLM V1's CPU-side cost
    # per step with CUDA graphs; a MeasuredProfile's "prefill"/"decode" rows replace it.
    return Efficiency(proj=proj, mlp=mlp, lm_head=mlp, attn_prefill=attn_prefill,
                      attn_decode=attn_decode, elementwise=elementwise,
                      allreduce_busbw_fraction=busbw, allreduce_latency_s=ar_latency_s,
                      step_overhead_s=1.0e-3)


# Fitted by `python -m bench.perfmodel_check` (least squares on log time); its table gives
# the error. Roofline(mfu, mbu, latency_s). Attention was measured on the A100 only.
_A100 = _fitted(
    proj=Roofline(0.689, 0.839, 7.4e-6),
    mlp=Roofline(0.712, 0.775, 10.2e-6),
    attn_prefill=Roofline(0.370, 0.766, 22.6e-6),
    attn_decode=Roofline(0.370, 0.766, 14.9e-6),
    elementwise=Roofline(1.0, 0.640, 2.5e-6),
    busbw=0.532, ar_latency_s=41.7e-6,
)
_H100 = _fitted(
    proj=Roofline(0.661, 0.929, 7.1e-6),
    mlp=Roofline(0.690, 0.824, 8.4e-6),
    attn_prefill=_A100.attn_prefill,
    attn_decode=_A100.attn_decode,
    elementwise=Roofline(1.0, 0.686, 2.0e-6),
    busbw=0.782, ar_latency_s=29.5e-6,
)
_A40 = _fitted(
    proj=Roofline(0.688, 0.774, 8.5e-6),
    mlp=Roofline(0.715, 0.688, 11.1e-6),
    attn_prefill=_A100.attn_prefill,
    attn_decode=_A100.attn_decode,
    elementwise=Roofline(1.0, 0.864, 1.5e-6),
    # not measured communicating; its PCIe link gets the A100's fraction of the link
    busbw=_A100.allreduce_busbw_fraction, ar_latency_s=_A100.allreduce_latency_s,
)
# Estimates, not fits: PyTorch CPU kernels reach about half the vector peak and of the
# bandwidth; each op costs ~20 µs of dispatch; vLLM's CPU step loop ~10 ms.
_CPU_KERNELS = Roofline(0.5, 0.5, 20e-6)
_CPU = Efficiency(proj=_CPU_KERNELS, mlp=_CPU_KERNELS, lm_head=_CPU_KERNELS,
                  attn_prefill=Roofline(0.3, 0.3, 20e-6), attn_decode=Roofline(0.3, 0.3, 20e-6),
                  elementwise=Roofline(1.0, 0.3, 20e-6), allreduce_busbw_fraction=0.5,
                  allreduce_latency_s=20e-6, step_overhead_s=10e-3)

EFFICIENCY_CATALOG: Mapping[str, Efficiency] = MappingProxyType({
    "A10G": _A40, "L4": _A40, "A40": _A40,
    "A100-40GB": _A100, "A100-80GB": _A100,
    "H100": _H100, "H200": _H100,
    "CPU": _CPU,
})


def default_efficiency(gpu: GpuSpec) -> Efficiency:
    """The calibrated efficiency of a catalog GPU; a GPU outside the catalog gets the
    A100's, a mid-range datacenter part's numbers."""
    return EFFICIENCY_CATALOG.get(gpu.name, _A100)

