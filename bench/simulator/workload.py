"""Workloads: the requests a simulation replays, as a stream of `Arrival`s in time order.

Two sources, both deterministic given the `numpy.random.Generator` handed in:

- `TraceWorkload`: an Azure LLM inference trace (`bench.traces`), optionally windowed,
  sped up and looped back to back until `max_requests` or `duration_s`;
- `SyntheticWorkload`: Poisson arrivals whose rate is multiplied by `burst_factor` for
  `burst_s` out of every `burst_every_s` seconds, lengths drawn from a trace's rows or
  from log-normals.

Either may put a share of requests behind shared prompt prefixes (a system prompt, a
few-shot preamble): `groups` prefixes, picked with Zipf weights, each of a fixed
length. Requests longer than the model's context are clipped as a client would clip
them (`bench.traces.clip_to_context`: the prompt first). Times are seconds from the
start of the simulation; lengths are tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from bench import traces

_CHUNK = 65536  # arrivals generated per vectorised batch
_load_trace = lru_cache(maxsize=8)(traces.load_trace)  # parsing a trace takes a second


class Arrival(NamedTuple):
    """One request of a workload. A NamedTuple: a million are built per large run."""

    number: int  # 0, 1, ... in arrival order; names the request and seeds its tokens
    time_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: int  # shared-prefix group, -1 for none
    prefix_tokens: int  # leading prompt tokens shared with the group (0 for none)
    slo_class: str


@dataclass(frozen=True)
class PrefixGroups:
    """Shared prompt prefixes: `share` of requests open with one of `lengths` (tokens),
    group g picked with weight 1 / (g + 1) ** `zipf`."""

    lengths: tuple[int, ...]
    share: float
    zipf: float = 1.0

    def assign(self, prompts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(group, shared tokens) per prompt; a prefix always leaves one token of the
        prompt the request's own."""
        n = prompts.size
        if not self.lengths or self.share <= 0:
            return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
        weights = 1.0 / np.arange(1, len(self.lengths) + 1) ** self.zipf
        groups = rng.choice(len(self.lengths), size=n, p=weights / weights.sum())
        shared = rng.random(n) < self.share
        groups = np.where(shared, groups, -1)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        tokens = np.where(shared, np.minimum(lengths[np.maximum(groups, 0)], prompts - 1), 0)
        return groups, np.maximum(tokens, 0)


class _Stream:
    """What both sources share: clipping, prefixes, SLO classes and the Arrival tuples."""

    def __init__(self, max_model_len: int, prefixes: PrefixGroups | None,
                 slo_mix: Mapping[str, float], rng: np.random.Generator):
        if not slo_mix or any(w < 0 for w in slo_mix.values()) or sum(slo_mix.values()) <= 0:
            raise ValueError(f"slo_mix needs non-negative weights, some positive: {dict(slo_mix)}")
        self.max_model_len = max_model_len
        self.prefixes = prefixes or PrefixGroups((), 0.0)
        self.classes = tuple(slo_mix)
        weights = np.array([slo_mix[c] for c in self.classes], dtype=float)
        self.class_p = weights / weights.sum()
        self.rng = rng
        self.clipped = 0  # requests shortened to fit the context

    def emit(self, first: int, times: np.ndarray, prompts: np.ndarray,
             outputs: np.ndarray) -> Iterator[Arrival]:
        prompts, outputs = self._clip(prompts, outputs)
        groups, shared = self.prefixes.assign(prompts, self.rng)
        classes = self.rng.choice(len(self.classes), size=times.size, p=self.class_p)
        names = self.classes
        for i, (t, p, o, g, s, c) in enumerate(zip(times.tolist(), prompts.tolist(), outputs.tolist(),
                                                   groups.tolist(), shared.tolist(), classes.tolist())):
            yield Arrival(first + i, t, p, o, g, s, names[c])

    def _clip(self, prompts: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`bench.traces.clip_to_context` (prompt + output <= max_model_len), vectorised."""
        room = self.max_model_len
        over = prompts + outputs > room
        self.clipped += int(over.sum())
        outputs = np.where(over, np.minimum(outputs, room - 1), outputs)
        prompts = np.where(over, np.minimum(prompts, room - outputs), prompts)
        return prompts, outputs


class TraceWorkload:
    """Replay of a trace (`code`, `conv` or a CSV path), see the module docstring.

    `window_s` keeps arrivals in [start, end) of the trace; `speedup` divides every
    arrival time (2.0: twice the rate); the result repeats back to back (each copy
    after the previous one's last arrival plus one mean gap) until `max_requests` or
    `duration_s`, whichever comes first; without either it plays once. `jitter_s` moves
    each arrival of the replay by a uniform draw in [-jitter_s, +jitter_s] seconds from
    `rng` (none before 0; requests keep their lengths and are numbered in their new order):
    a tail set by a handful of requests in a burst can then be read over many equally
    likely replays rather than one. No jitter draws nothing, so other results do not move.
    """

    def __init__(self, trace: str, *, max_model_len: int, rng: np.random.Generator,
                 window_s: tuple[float, float] | None = None, speedup: float = 1.0,
                 max_requests: int | None = None, duration_s: float | None = None,
                 prefixes: PrefixGroups | None = None,
                 slo_mix: Mapping[str, float] = {"default": 1.0}, jitter_s: float = 0.0):
        if jitter_s < 0:
            raise ValueError(f"jitter_s must not be negative, got {jitter_s}")
        rows = _load_trace(trace)
        if window_s is not None:
            rows = traces.window(rows, *window_s)
        rows = traces.compress(rows, speedup)
        if len(rows) < 2:
            raise ValueError(f"trace {trace!r}: fewer than two requests in window {window_s}")
        self.times = np.array([r.arrival_s for r in rows])
        self.prompts = np.array([r.prompt_tokens for r in rows], dtype=np.int64)
        self.outputs = np.array([r.output_tokens for r in rows], dtype=np.int64)
        if jitter_s > 0:
            moved = np.maximum(self.times + rng.uniform(-jitter_s, jitter_s, self.times.size), 0.0)
            order = np.argsort(moved, kind="stable")
            self.times, self.prompts, self.outputs = moved[order], self.prompts[order], self.outputs[order]
        span = float(self.times[-1] - self.times[0])  # of the arrivals as replayed, jitter included
        self.period_s = span + span / (len(rows) - 1)  # so a copy starts after the last one's end
        self.max_requests = max_requests if max_requests is not None else (
            None if duration_s is not None else len(rows))
        self.duration_s = duration_s
        self._stream = _Stream(max_model_len, prefixes, slo_mix, rng)

    @property
    def clipped(self) -> int:
        return self._stream.clipped

    def arrivals(self) -> Iterator[Arrival]:
        number, copy, n = 0, 0, self.times.size
        limit = self.max_requests if self.max_requests is not None else float("inf")
        end = self.duration_s if self.duration_s is not None else float("inf")
        while number < limit:
            times = self.times + copy * self.period_s
            keep = int(min(n, limit - number, np.searchsorted(times, end, side="left")))
            if keep == 0:
                return
            yield from self._stream.emit(number, times[:keep], self.prompts[:keep], self.outputs[:keep])
            number, copy = number + keep, copy + 1


@dataclass(frozen=True)
class LogNormal:
    """Lengths (tokens) whose log is normal: median `median`, shape `sigma`, in [1, `max`]."""

    median: float
    sigma: float
    max: int

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        values = rng.lognormal(np.log(self.median), self.sigma, size=n)
        return np.clip(np.rint(values), 1, self.max).astype(np.int64)


class SyntheticWorkload:
    """Bursty Poisson arrivals at `rate` requests/s (see the module docstring), for
    `duration_s` seconds or `max_requests` requests, whichever ends first.

    Lengths come from a trace's rows (`lengths_trace`, keeping the prompt/output
    correlation) or from the two log-normals.
    """

    def __init__(self, rate: float, *, max_model_len: int, rng: np.random.Generator,
                 duration_s: float | None = None, max_requests: int | None = None,
                 burst_every_s: float | None = None, burst_s: float = 0.0,
                 burst_factor: float = 1.0, lengths_trace: str | None = None,
                 prompt: LogNormal | None = None, output: LogNormal | None = None,
                 prefixes: PrefixGroups | None = None,
                 slo_mix: Mapping[str, float] = {"default": 1.0}):
        if not rate > 0:
            raise ValueError(f"rate must be positive requests/s, got {rate}")
        if duration_s is None and max_requests is None:
            raise ValueError("a synthetic workload needs duration_s or max_requests")
        if lengths_trace is not None and (prompt is not None or output is not None):
            raise ValueError("give either lengths_trace or length laws, not both")
        if lengths_trace is None and (prompt is None or output is None):
            raise ValueError("give lengths_trace, or both prompt and output length laws")
        self.rate, self.duration_s, self.max_requests = rate, duration_s, max_requests
        self.burst_every_s, self.burst_s, self.burst_factor = burst_every_s, burst_s, burst_factor
        self.rows = _load_trace(lengths_trace) if lengths_trace else None
        self.prompt, self.output = prompt, output
        self.rng = rng
        self._stream = _Stream(max_model_len, prefixes, slo_mix, rng)

    @property
    def clipped(self) -> int:
        return self._stream.clipped

    def rate_at(self, t: np.ndarray) -> np.ndarray:
        """Requests per second at times `t`."""
        if not self.burst_every_s:
            return np.full(np.shape(t), self.rate)
        in_burst = np.mod(t, self.burst_every_s) < self.burst_s
        return np.where(in_burst, self.rate * self.burst_factor, self.rate)

    def arrivals(self) -> Iterator[Arrival]:
        """Thinning (Lewis & Shedler): candidates at the peak rate, each kept with
        probability rate(t) / peak, give exactly the modulated Poisson process."""
        peak = self.rate * max(1.0, self.burst_factor if self.burst_every_s else 1.0)
        limit = self.max_requests if self.max_requests is not None else float("inf")
        end = self.duration_s if self.duration_s is not None else float("inf")
        number, t0 = 0, 0.0
        while number < limit:
            gaps = self.rng.exponential(1.0 / peak, size=_CHUNK)
            times = t0 + np.cumsum(gaps)
            t0 = float(times[-1])
            times = times[self.rng.random(_CHUNK) * peak < self.rate_at(times)]
            times = times[times < end][: int(min(times.size, limit - number))]
            if times.size:
                prompts, outputs = self._lengths(times.size)
                yield from self._stream.emit(number, times, prompts, outputs)
                number += times.size
            if t0 >= end:
                return

    def _lengths(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rows is not None:
            pairs = traces.sample_lengths(self.rows, n, self.rng)
            return pairs[:, 0], pairs[:, 1]
        return self.prompt.draw(n, self.rng), self.output.draw(n, self.rng)
