"""How fast one replica of a model on one GPU type may be fed each bucket within the SLO.

A `CapacityProfile` holds, per bucket of a `BucketScheme`, the highest request rate
(req/s) one replica (`gpus_per_replica` GPUs of the type) sustains while the mean TTFT
and mean TPOT stay within their targets — Mélange's "maximum throughput under the SLO",
which it measured by profiling; here it comes from the step-time model (`derive_capacity`)
and may be replaced per bucket by measured rates (`override_rates`).

The method (a steady-state model of continuous batching, per bucket, at the bucket's
representative prompt length P and output length O). With N sequences decoding at
once, a decode step takes T_d(N) (N sequences reading N·(P + O/2) KV tokens on average)
and each arriving request costs one prefill step T_p(P) that stalls decoding. Little's
law (N = λ · O · TPOT) together with the time split gives, at arrival rate λ:
    λ(N)  = N / (O · T_d(N) + N · T_p)          (decode and prefill time fill the GPU)
    ρ     = λ · T_p                              (fraction of time spent in prefill)
    TPOT  = T_d(N) / (1 - ρ)                     (decode steps stretched by prefills)
    TTFT  = T_d(N) / 2 + ρ · T_p / (2 (1 - ρ)) + T_p
            (the step in progress, M/D/1 queueing behind other prefills, its own prefill)
N is bounded by the KV cache (N · (P + O) tokens at their peak) and by `max_num_seqs`.
λ(N), TPOT and TTFT all grow with N, so a bisection finds the largest N meeting both
targets; the capacity is λ(N). Zero when even N = 1 misses a target, when the weights do
not fit, or when one sequence of P + O tokens does not fit its KV cache; `limits` says
which constraint bounds each bucket. Targets are means, as in Mélange, not tails.

Units: seconds, tokens, requests per second.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from policies.gpu_catalog import GpuSpec
from policies.measured_profile import MeasuredProfile
from policies.perfmodel import StepTimeModel
from policies.transformer_spec import TransformerSpec
from policies.workload import BucketScheme

__all__ = ["CapacityProfile", "Slo", "SteadyState", "derive_capacity", "override_rates",
           "parse_rate_table", "split_conditions", "steady_state"]

RATE_TABLE_COLUMNS = ("prompt_tokens", "output_tokens", "max_rate_per_s")


@dataclass(frozen=True)
class Slo:
    """Latency targets the capacity is computed for (means, seconds)."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"Slo: ttft_s and tpot_s must be > 0, got {self.ttft_s}, {self.tpot_s}")

    def __str__(self) -> str:
        return f"TTFT {self.ttft_s:g} s, TPOT {self.tpot_s:g} s"


@dataclass(frozen=True)
class CapacityProfile:
    """Per bucket of `scheme`: req/s one replica of `model` on `gpus_per_replica` GPUs of
    `gpu_type` sustains within `slo`, and the constraint that bounds it."""

    model: str
    gpu_type: str
    gpus_per_replica: int
    scheme: BucketScheme
    slo: Slo
    rates: tuple[float, ...]  # req/s per bucket; 0.0: this replica cannot serve the bucket
    # per bucket: what bounds the rate ("tpot", "ttft", "kv", "max_seqs", "measured") or,
    # where the rate is 0, why (a sentence naming the number that misses)
    limits: tuple[str, ...]
    source: str = "model"  # "model", or where measured rates came from

    def __post_init__(self) -> None:
        if len(self.rates) != len(self.scheme) or len(self.limits) != len(self.scheme):
            raise ValueError(f"CapacityProfile {self.gpu_type}: {len(self.rates)} rates and "
                             f"{len(self.limits)} limits for {len(self.scheme)} buckets")
        if any(not r >= 0 for r in self.rates):
            raise ValueError(f"CapacityProfile {self.gpu_type}: rates must be >= 0")

    def rate(self, bucket: int) -> float:
        return self.rates[bucket]

    def why_zero(self, bucket: int) -> str:
        """Why this replica cannot serve `bucket` (empty when it can)."""
        return "" if self.rates[bucket] > 0 else self.limits[bucket]


@dataclass(frozen=True)
class SteadyState:
    """One operating point of the steady-state model (see the module's note)."""

    decoding: int  # N, sequences decoding at once
    rate: float  # λ, requests per second
    ttft_s: float
    tpot_s: float


def steady_state(model: StepTimeModel, prompt: int, output: int, decoding: int,
                 prefill_s: float | None = None) -> SteadyState:
    """The rate, TTFT and TPOT with `decoding` sequences of a bucket (prompt, output
    tokens) decoding at once; `prefill_s` may pass T_p when the caller has it."""
    t_p = model.prefill_time(prompt) if prefill_s is None else prefill_s
    n = decoding
    t_d = model.decode_time(n, n * (prompt + max(1, output // 2)))
    rate = n / (output * t_d + n * t_p)
    rho = rate * t_p
    return SteadyState(n, rate, t_d / 2 + rho * t_p / (2 * (1 - rho)) + t_p, t_d / (1 - rho))


def derive_capacity(spec: TransformerSpec, gpu: GpuSpec, scheme: BucketScheme, slo: Slo, *,
                    gpus_per_replica: int = 1, memory_fraction: float = 0.9,
                    max_num_seqs: int = 256, max_model_len: int | None = None,
                    profile: MeasuredProfile | None = None) -> CapacityProfile:
    """The capacity of every bucket from the step-time model (a measured step-time
    `profile` makes it use measured prefill/decode times where they cover a point)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    tp = max(1, gpus_per_replica)
    model = StepTimeModel(gpu, spec, tp=tp, profile=profile)
    kv_tokens = model.kv_capacity_tokens(memory_fraction)
    rates, limits = [], []
    for bucket in scheme.buckets:
        prompt, output = bucket.representative
        rate, limit = _bucket_capacity(model, prompt, output, slo, kv_tokens, max_num_seqs,
                                       max_model_len)
        rates.append(rate)
        limits.append(limit)
    return CapacityProfile(spec.name, gpu.name, tp, scheme, slo, tuple(rates), tuple(limits),
                           "model" if profile is None else "model+measured step times")


def _bucket_capacity(model: StepTimeModel, prompt: int, output: int, slo: Slo, kv_tokens: int,
                     max_num_seqs: int, max_model_len: int | None) -> tuple[float, str]:
    where = f"{model.gpu.name}×{model.tp}"
    if kv_tokens == 0:
        return 0.0, f"{where}: the weights of {model.model.name} do not fit"
    length = prompt + output
    if max_model_len is not None and length > max_model_len:
        return 0.0, f"{where}: {length} tokens exceed max_model_len {max_model_len}"
    kv_seqs = kv_tokens // length
    if kv_seqs == 0:
        return 0.0, f"{where}: one sequence of {length} tokens exceeds the KV cache ({kv_tokens} tokens)"
    t_p = model.prefill_time(prompt)

    def state(n: int) -> SteadyState:
        return steady_state(model, prompt, output, n, t_p)

    def meets(s: SteadyState) -> bool:
        return s.ttft_s <= slo.ttft_s and s.tpot_s <= slo.tpot_s

    if not meets(state(1)):
        return _light_load(model, prompt, output, slo, t_p, where)
    top = min(kv_seqs, max_num_seqs)
    lo, hi = 1, top  # meets(lo) holds; find the largest N <= top that meets the SLO
    if meets(state(hi)):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(state(mid)):
            lo = mid
        else:
            hi = mid
    best = state(lo)
    if lo == top:
        limit = "kv" if kv_seqs <= max_num_seqs else "max_seqs"
    else:
        over = state(lo + 1)
        limit = "tpot" if over.tpot_s > slo.tpot_s else "ttft"
    return best.rate, limit


def _light_load(model: StepTimeModel, prompt: int, output: int, slo: Slo, t_p: float,
                where: str) -> tuple[float, str]:
    """Below one sequence decoding on average (λ < λ(1)) decode steps run at batch 1:
    TPOT = T_d(1) / (1 - ρ) and TTFT = T_d(1) / 2 + ρ·T_p / (2 (1 - ρ)) + T_p, both growing
    with ρ = λ·T_p; the largest ρ meeting both gives the rate (0 when even λ → 0 misses)."""
    t_d = model.decode_time(1, prompt + max(1, output // 2))
    if t_d > slo.tpot_s:
        return 0.0, f"{where}: TPOT {t_d:.3g} s at batch 1 > {slo.tpot_s:g} s"
    slack = slo.ttft_s - t_p - t_d / 2
    if slack < 0:
        return 0.0, (f"{where}: TTFT {t_p + t_d / 2:.3g} s of a {prompt}-token prompt "
                     f"> {slo.ttft_s:g} s")
    by_tpot, by_ttft = 1 - t_d / slo.tpot_s, 2 * slack / (t_p + 2 * slack)
    return min(by_tpot, by_ttft) / t_p, "tpot" if by_tpot <= by_ttft else "ttft"


def override_rates(capacity: CapacityProfile, measured: Iterable[tuple[int, int, float]],
                   source: str) -> CapacityProfile:
    """`capacity` with the rate of each bucket holding a measured (prompt_tokens,
    output_tokens, max req/s) point replaced (several points in one bucket: their mean)."""
    sums: dict[int, list[float]] = {}
    scheme = capacity.scheme
    for prompt, output, rate in measured:
        if not scheme.contains(prompt, output):
            raise ValueError(f"measured point ({prompt}, {output}) lies outside the bucket edges")
        if rate < 0:
            raise ValueError(f"measured point ({prompt}, {output}): rate {rate} < 0")
        sums.setdefault(scheme.index(prompt, output), []).append(rate)
    rates, limits = list(capacity.rates), list(capacity.limits)
    for i, values in sums.items():
        rates[i] = sum(values) / len(values)
        limits[i] = "measured" if rates[i] > 0 else f"{capacity.gpu_type}: measured 0 req/s"
    return CapacityProfile(capacity.model, capacity.gpu_type, capacity.gpus_per_replica, scheme,
                           capacity.slo, tuple(rates), tuple(limits), source)


def split_conditions(text: str) -> tuple[Mapping[str, str], str]:
    """A measured table's text split into its conditions (leading `# key: value` lines:
    machine, model, engine args, date, ...) and the CSV body after them."""
    conditions: dict[str, str] = {}
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    for line in lines[:header]:
        key, sep, value = line[1:].partition(":")
        if sep:
            conditions[key.strip()] = value.strip()
    return MappingProxyType(conditions), "".join(lines[header:])


def parse_rate_table(text: str) -> tuple[Mapping[str, str], tuple[tuple[int, int, float], ...]]:
    """Conditions and (prompt_tokens, output_tokens, max_rate_per_s) rows of a measured
    capacity table (CSV under `# key: value` condition lines)."""
    conditions, body = split_conditions(text)
    reader = csv.DictReader(io.StringIO(body))
    missing = [c for c in RATE_TABLE_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"capacity table lacks column(s) {missing}; it needs {list(RATE_TABLE_COLUMNS)}")
    rows = []
    for line, rec in enumerate(reader, start=2 + len(conditions)):
        try:
            rows.append((int(rec["prompt_tokens"]), int(rec["output_tokens"]),
                         float(rec["max_rate_per_s"])))
        except (TypeError, ValueError) as e:
            raise ValueError(f"capacity table line {line}: {e}") from None
    return conditions, tuple(rows)
