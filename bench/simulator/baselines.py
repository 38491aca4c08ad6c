"""Baseline routing scorers, for comparing the real policy against the classics.

Each is a scorer over the same `ScoringContext` the real scorers see (candidates after
the router's filters and load guard), so a baseline is a routing weight, not a special
case: `{round_robin: 1}` with `load_guard: 1.0` is plain round robin over the
replicas that can take the request, `{random: 1}` a uniformly random pick among them.
They keep state (a turn, a random generator), so each simulation builds its own; they
live in `bench/` because a pure policy may not hold either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from policies.scorers import SCORERS, Scorer, ScoringContext


class RoundRobin:
    """Score 1 for the next candidate in turn, 0 for the others."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._turn = 0

    def __call__(self, ctx: ScoringContext) -> np.ndarray:
        scores = np.zeros(ctx.candidates.size)
        scores[self._turn % ctx.candidates.size] = 1.0
        self._turn += 1
        return scores


class UniformRandom:
    """Independent uniform scores: the argmax is a uniformly random candidate."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def __call__(self, ctx: ScoringContext) -> np.ndarray:
        return self._rng.random(ctx.candidates.size)


BASELINES: Mapping[str, Callable[[np.random.Generator], Scorer]] = MappingProxyType(
    {"round_robin": RoundRobin, "random": UniformRandom})

SCORER_NAMES = frozenset(SCORERS) | frozenset(BASELINES)


def scorers_for(rng: np.random.Generator) -> dict[str, Scorer]:
    """The live scorers plus a fresh instance of each baseline."""
    return {**SCORERS, **{name: make(rng) for name, make in BASELINES.items()}}
