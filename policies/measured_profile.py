"""Measured operator and step times that override the roofline where they cover a point.

A profile is a set of rows (key, size, context, seconds) measured for one GPU type, one
model and one tensor-parallel degree. The key is an operator of `policies.perfmodel`
(one call of it on one GPU; per-layer operators are one layer's call) or a phase:
"prefill" (a whole step computing one prompt chunk) or "decode" (a whole step of decode
tokens only). `size` is tokens for prefill-side keys and sequences for "attn_decode" and
"decode"; `context` is the per-sequence context: the tokens cached before the chunk for
prefill-side keys, the KV tokens each sequence reads for decode-side keys, 0 where it
does not matter (projections, MLP, elementwise, all-reduce).

Lookup interpolates linearly in size within one measured context, then linearly between
the two nearest measured contexts around the query; a query outside the measured range
of either returns None, and the caller falls back to the model. Exact at measured points.
"""

from __future__ import annotations

import bisect
import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("op", "size", "context", "seconds")


@dataclass(frozen=True)
class ProfileRow:
    """One measurement: `seconds` for key `op` at (`size`, `context`)."""

    op: str
    size: int
    context: int
    seconds: float

    def __post_init__(self) -> None:
        if self.size < 0 or self.context < 0:
            raise ValueError(f"profile row {self}: size and context must not be negative")
        if not self.seconds > 0:
            raise ValueError(f"profile row {self}: seconds must be positive")


@dataclass(frozen=True)
class _Curve:
    """Seconds against size at one context, sizes ascending and unique."""

    sizes: np.ndarray
    seconds: np.ndarray

    def at(self, size: float) -> float | None:
        if size < self.sizes[0] or size > self.sizes[-1]:
            return None
        return float(np.interp(size, self.sizes, self.seconds))


@dataclass(frozen=True)
class MeasuredProfile:
    """Measured seconds by key, size and context (see the module's note for their meaning).
    `StepTimeModel` refuses a profile whose keys it does not know."""

    rows: tuple[ProfileRow, ...]
    _curves: Mapping[str, Mapping[int, _Curve]] = field(init=False, repr=False, compare=False)
    _contexts: Mapping[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("MeasuredProfile needs at least one row")
        points: dict[str, dict[int, dict[int, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        for row in self.rows:
            points[row.op][row.context][row.size].append(row.seconds)
        curves = {op: {ctx: _curve(by_size) for ctx, by_size in by_ctx.items()}
                  for op, by_ctx in points.items()}
        object.__setattr__(self, "_curves", curves)
        object.__setattr__(self, "_contexts", {op: tuple(sorted(c)) for op, c in curves.items()})

    @classmethod
    def from_rows(cls, rows: Iterable[ProfileRow | tuple[str, int, int, float]]) -> MeasuredProfile:
        """A profile from rows or (op, size, context, seconds) tuples; repeated points are
        averaged."""
        return cls(tuple(r if isinstance(r, ProfileRow) else
                         ProfileRow(str(r[0]), int(r[1]), int(r[2]), float(r[3])) for r in rows))

    @classmethod
    def from_csv(cls, source: str | Path | io.TextIOBase) -> MeasuredProfile:
        """A profile from a CSV file (a path or an open text stream) whose header holds
        the columns op, size, context, seconds (others are ignored)."""
        if isinstance(source, (str, Path)):
            with open(source, newline="") as f:
                return cls.from_csv(f)
        reader = csv.DictReader(source)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"profile CSV lacks column(s) {missing}; it needs {list(CSV_COLUMNS)}")
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(ProfileRow(rec["op"], int(rec["size"]), int(rec["context"]),
                                       float(rec["seconds"])))
            except ValueError as e:
                raise ValueError(f"profile CSV line {line}: {e}") from None
        return cls.from_rows(rows)

    def keys(self) -> frozenset[str]:
        """The keys (operators and phases) this profile measured."""
        return frozenset(self._curves)

    def lookup(self, op: str, size: float, context: float = 0) -> float | None:
        """Measured (interpolated) seconds for `op` at (`size`, `context`), or None where
        the profile does not cover that point."""
        contexts = self._contexts.get(op)
        if contexts is None:
            return None
        curves = self._curves[op]
        i = bisect.bisect_left(contexts, context)
        if i < len(contexts) and contexts[i] == context:
            return curves[contexts[i]].at(size)
        if i == 0 or i == len(contexts):
            return None
        lo, hi = contexts[i - 1], contexts[i]
        t_lo, t_hi = curves[lo].at(size), curves[hi].at(size)
        if t_lo is None or t_hi is None:
            return None
        return t_lo + (t_hi - t_lo) * (context - lo) / (hi - lo)


def _curve(by_size: Mapping[int, list[float]]) -> _Curve:
    sizes = sorted(by_size)
    return _Curve(np.array(sizes, dtype=float),
                  np.array([sum(by_size[s]) / len(by_size[s]) for s in sizes]))
