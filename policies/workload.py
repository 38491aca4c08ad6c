"""What a model's traffic looks like: request rate per (input length, output length) bucket.

Mélange's observation is that no GPU type is cheapest for every request size, so the
placement solver needs the workload split by size. A `BucketScheme` cuts prompt and
output lengths at log-spaced edges; a `WorkloadProfile` holds the rate of each bucket
over one window of arrivals. Both are frozen and pure: the caller hands the request
records (live telemetry, or a trace read by `bench.traces`) and the time `now`.

Units: seconds, tokens, requests per second.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Bucket", "BucketScheme", "RequestLike", "RequestRecord", "WorkloadProfile",
           "characterise", "characterise_span", "sliding_windows"]


class RequestLike(Protocol):
    """Anything with an arrival time and its lengths (`RequestRecord`, `bench.traces.TraceRequest`)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class RequestRecord:
    """One finished request as telemetry reports it."""

    arrival_s: float  # when it arrived, seconds on the caller's clock
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"RequestRecord: token counts must not be negative, got "
                             f"{self.prompt_tokens} and {self.output_tokens}")


@dataclass(frozen=True)
class Bucket:
    """Requests with input_lo <= prompt < input_hi and output_lo <= output < output_hi."""

    input_lo: int
    input_hi: int
    output_lo: int
    output_hi: int

    @property
    def label(self) -> str:
        return f"in[{self.input_lo},{self.input_hi}) out[{self.output_lo},{self.output_hi})"

    @property
    def representative(self) -> tuple[int, int]:
        """(prompt, output) tokens that stand for the bucket: the geometric midpoint of
        each range (lengths spread about evenly in log space within a log-spaced bucket)."""
        return (_geo_mid(self.input_lo, self.input_hi), _geo_mid(self.output_lo, self.output_hi))

    def __str__(self) -> str:
        return self.label


def _geo_mid(lo: int, hi: int) -> int:
    return max(1, round(math.sqrt(max(lo, 1) * (hi - 1))))


@dataclass(frozen=True)
class BucketScheme:
    """Edges cutting prompt and output lengths into buckets, row-major (input outer).

    Lengths below the first edge go to the first bucket and lengths at or above the last
    edge to the last one (their count is reported as `clamped`), so every request lands
    somewhere and the rate is never lost.
    """

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    buckets: tuple[Bucket, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("input_edges", "output_edges"):
            edges = tuple(int(e) for e in getattr(self, name))
            if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"BucketScheme.{name} must be >= 2 strictly increasing "
                                 f"non-negative edges, got {edges}")
            object.__setattr__(self, name, edges)
        ins, outs = self.input_edges, self.output_edges
        object.__setattr__(self, "buckets", tuple(
            Bucket(ins[i], ins[i + 1], outs[j], outs[j + 1])
            for i in range(len(ins) - 1) for j in range(len(outs) - 1)))

    @classmethod
    def log_spaced(cls, *, min_input: int = 32, max_input: int = 32768, min_output: int = 16,
                   max_output: int = 4096, factor: float = 2.0) -> BucketScheme:
        """Edges 1, min, min·factor, ... up to max (inclusive) for inputs and outputs: the
        default (32 … 32768 by 2, 16 … 4096 by 2) gives 11 × 9 = 99 buckets."""
        return cls(_log_edges(min_input, max_input, factor), _log_edges(min_output, max_output, factor))

    def __len__(self) -> int:
        return len(self.buckets)

    def index(self, prompt_tokens: int, output_tokens: int) -> int:
        """The bucket of a request (clamped into range, see the class note)."""
        i = _clamped_slot(self.input_edges, prompt_tokens)
        j = _clamped_slot(self.output_edges, output_tokens)
        return i * (len(self.output_edges) - 1) + j

    def indices(self, prompts: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, int]:
        """Bucket indices of arrays of lengths, and how many had to be clamped."""
        n_out = len(self.output_edges) - 1
        i = np.searchsorted(self.input_edges, prompts, side="right") - 1
        j = np.searchsorted(self.output_edges, outputs, side="right") - 1
        clamped = int(np.sum((i < 0) | (i >= len(self.input_edges) - 1)
                             | (j < 0) | (j >= n_out)))
        i = np.clip(i, 0, len(self.input_edges) - 2)
        j = np.clip(j, 0, n_out - 1)
        return i * n_out + j, clamped

    def contains(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether a request lies within the edges (needs no clamping)."""
        return (self.input_edges[0] <= prompt_tokens < self.input_edges[-1]
                and self.output_edges[0] <= output_tokens < self.output_edges[-1])


def _log_edges(lo: int, hi: int, factor: float) -> tuple[int, ...]:
    if not (1 <= lo < hi and factor > 1):
        raise ValueError(f"log-spaced edges need 1 <= min < max and factor > 1, got "
                         f"{lo}, {hi}, {factor}")
    edges = [1] if lo > 1 else []
    edge = float(lo)
    while round(edge) < hi:
        if not edges or round(edge) > edges[-1]:
            edges.append(round(edge))
        edge *= factor
    return tuple(edges) + (hi,)


def _clamped_slot(edges: Sequence[int], value: int) -> int:
    return min(max(bisect.bisect_right(edges, value) - 1, 0), len(edges) - 2)


@dataclass(frozen=True)
class WorkloadProfile:
    """The arrival rate of each bucket of `scheme` for one model over one window."""

    model: str
    scheme: BucketScheme
    rates: tuple[float, ...]  # requests/s per bucket, aligned with scheme.buckets
    window_s: float  # length of the window the rates were measured over, seconds
    end_s: float = 0.0  # the window is (end_s - window_s, end_s] on the caller's clock
    requests: int = 0  # requests counted
    clamped: int = 0  # of which outside the scheme's edges (counted in an edge bucket)

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.rates)
        if len(rates) != len(self.scheme):
            raise ValueError(f"WorkloadProfile: {len(rates)} rates for {len(self.scheme)} buckets")
        if any(not (r >= 0 and math.isfinite(r)) for r in rates):
            raise ValueError("WorkloadProfile: rates must be finite and >= 0")
        if not self.window_s > 0:
            raise ValueError(f"WorkloadProfile: window_s must be > 0, got {self.window_s}")
        object.__setattr__(self, "rates", rates)

    @property
    def total_rate(self) -> float:
        """Requests per second over all buckets."""
        return sum(self.rates)

    def active(self) -> Iterator[tuple[int, Bucket, float]]:
        """(index, bucket, rate) of every bucket with a positive rate."""
        for i, (bucket, rate) in enumerate(zip(self.scheme.buckets, self.rates)):
            if rate > 0:
                yield i, bucket, rate

    def scaled(self, factor: float) -> WorkloadProfile:
        """The same mix at `factor` times the rate."""
        if not factor >= 0:
            raise ValueError(f"scale factor must be >= 0, got {factor}")
        return WorkloadProfile(self.model, self.scheme, tuple(r * factor for r in self.rates),
                               self.window_s, self.end_s, self.requests, self.clamped)

    @classmethod
    def from_rates(cls, model: str, scheme: BucketScheme,
                   rates: Iterable[tuple[int, int, float]], window_s: float = 1.0) -> WorkloadProfile:
        """A profile from (prompt_tokens, output_tokens, req/s) triples: each adds its
        rate to the bucket holding that size (synthetic workloads, tests)."""
        per_bucket = [0.0] * len(scheme)
        for prompt, output, rate in rates:
            per_bucket[scheme.index(prompt, output)] += rate
        return cls(model, scheme, tuple(per_bucket), window_s)


def _arrays(records: Iterable[RequestLike]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in records]
    if not rows:
        return np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    a = np.asarray(rows, dtype=float)
    return a[:, 0], a[:, 1].astype(np.int64), a[:, 2].astype(np.int64)


def _profile(model: str, scheme: BucketScheme, prompts: np.ndarray, outputs: np.ndarray,
             window_s: float, end_s: float) -> WorkloadProfile:
    idx, clamped = scheme.indices(prompts, outputs)
    counts = np.bincount(idx, minlength=len(scheme)) if len(idx) else np.zeros(len(scheme))
    return WorkloadProfile(model, scheme, tuple(counts / window_s), window_s, end_s,
                           int(len(idx)), clamped)


def characterise(records: Iterable[RequestLike], *, now: float, window_s: float,
                 scheme: BucketScheme, model: str) -> WorkloadProfile:
    """Rates per bucket of the requests that arrived in (now - window_s, now]: count / window.

    Records outside the window are ignored, so the caller may hand a longer history; an
    empty window is a valid profile of rate zero.
    """
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    arrivals, prompts, outputs = _arrays(records)
    inside = (arrivals > now - window_s) & (arrivals <= now)
    return _profile(model, scheme, prompts[inside], outputs[inside], window_s, now)


def characterise_span(records: Iterable[RequestLike], *, scheme: BucketScheme,
                      model: str) -> WorkloadProfile:
    """Rates per bucket over the records' whole span (a trace): count / (last - first
    arrival). Needs at least two records at different times."""
    arrivals, prompts, outputs = _arrays(records)
    if len(arrivals) < 2 or arrivals.max() <= arrivals.min():
        raise ValueError("characterise_span needs at least two records at different times")
    return _profile(model, scheme, prompts, outputs, float(arrivals.max() - arrivals.min()),
                    float(arrivals.max()))


def sliding_windows(records: Iterable[RequestLike], *, window_s: float, step_s: float,
                    scheme: BucketScheme, model: str) -> tuple[WorkloadProfile, ...]:
    """Profiles of the windows ending at first arrival + window_s, then every step_s until
    the last arrival: what a controller re-planning every `step_s` would have seen."""
    if not (window_s > 0 and step_s > 0):
        raise ValueError(f"window_s and step_s must be > 0, got {window_s}, {step_s}")
    arrivals, prompts, outputs = _arrays(records)
    if not len(arrivals):
        return ()
    order = np.argsort(arrivals, kind="stable")
    arrivals, prompts, outputs = arrivals[order], prompts[order], outputs[order]
    profiles = []
    end = float(arrivals[0]) + window_s
    while True:
        lo = np.searchsorted(arrivals, end - window_s, side="right")
        hi = np.searchsorted(arrivals, end, side="right")
        profiles.append(_profile(model, scheme, prompts[lo:hi], outputs[lo:hi], window_s, end))
        if end >= arrivals[-1]:
            return tuple(profiles)
        end += step_s
