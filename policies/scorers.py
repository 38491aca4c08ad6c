"""Routing scorers: each maps the candidates of one decision to scores in [0, 1].

Higher is better. A scorer sees a `ScoringContext` (the request, the table and the
candidates' rows with their utilisation and booked load) and returns one float64
array aligned with `ctx.candidates`. A new heuristic is a new function here and an
entry in `SCORERS`; the router is not edited. Scores are combined only in
`policies.routing.combine`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from policies.fleet_view import RoutingRequest, SloClass

if TYPE_CHECKING:
    from policies.routing import RoutingTable


@dataclass(frozen=True, eq=False)
class ScoringContext:
    """What every scorer of one decision sees. Arrays align with `candidates`."""

    request: RoutingRequest
    table: RoutingTable
    candidates: np.ndarray  # rows of `table` still in the running, ascending
    utilisation: np.ndarray  # in [0, 1], reported load plus bookings
    booked_tokens: np.ndarray  # prompt tokens booked on each and not in its stats yet
    slo: SloClass | None  # the request's class; None when the fleet defines none
    now: float  # seconds, same clock as the replicas' observed_at
    every_row: bool = False  # the candidates are all of the table's rows, in order

    def column(self, name: str) -> np.ndarray:
        """A numeric table column (see `RoutingTable.columns`) for the candidates, read-only."""
        column = self.table.columns[name]
        return column if self.every_row else column[self.candidates]


Scorer = Callable[[ScoringContext], np.ndarray]


def load(ctx: ScoringContext) -> np.ndarray:
    """Free throughput, normalised to the best candidate's.

    free = max_batch_tokens_per_s x (1 - utilisation): tokens/s the replica could
    still produce. Dividing by the largest free among the candidates makes a faster
    GPU's spare room count for more than a slower GPU's (an idle L4 offers less than
    a half-loaded H100). All zero when no candidate has room.
    """
    free = ctx.column("max_batch_tokens_per_s") * (1.0 - ctx.utilisation)
    best = np.maximum.reduce(free)  # free.max(), without its wrapper
    return free / best if best > 0 else np.zeros_like(free)


def kv(ctx: ScoringContext) -> np.ndarray:
    """Free fraction of the KV cache, counting booked prompts as already placed."""
    used = ctx.column("kv_blocks_used") + ctx.booked_tokens / ctx.column("block_size")
    total = ctx.column("kv_blocks_total")
    if ctx.table.positive("kv_blocks_total"):
        usage = used / total
    else:
        usage = np.divide(used, total, out=np.ones_like(used), where=total > 0)
    return 1.0 - np.minimum(usage, 1.0)


def prefix(ctx: ScoringContext) -> np.ndarray:
    """Estimated prefix hit: leading request blocks the replica will not compute / request blocks.

    Blocks in the replica's own prefix cache count 1 each; the blocks after those that
    the KV-cache store on the replica's node holds (it loads them instead of computing
    them, at the cost of a copy) count `store_hit_weight` each. Zero everywhere for a
    request without full blocks.
    """
    hashes = ctx.request.block_hashes
    n = len(hashes)
    if n == 0:
        return np.zeros(ctx.candidates.size)
    own = ctx.table.prefix.depth(hashes)[ctx.candidates]
    table = ctx.table
    if table.store_hit_weight > 0 and table.store_prefix.keys.size:
        rows = table.store_of_row[ctx.candidates]
        in_store = np.where(rows >= 0, table.store_prefix.depth(hashes)[np.maximum(rows, 0)], 0)
        return (own + table.store_hit_weight * np.maximum(in_store - own, 0)) / n
    return own / n


def slo_fit(ctx: ScoringContext) -> np.ndarray:
    """How well the replica is predicted to meet the request's TTFT and TPOT targets.

    TTFT = (queued prompt tokens + this prompt) / prefill_tokens_per_s, where the queue
    is the reported waiting prompt tokens less what prefill has drained since
    `observed_at`, plus booked tokens; this prompt counts in full (conservative: the
    prefix scorer rewards cache hits). TPOT = decode_step_s x (1 + utilisation):
    step time grows with the batch, doubling at full load. Each prediction scores
    min(1, target / predicted); the replica scores the worse of the two. Without an
    SLO class the target is the best candidate's prediction (relative fit).
    """
    prefill = ctx.column("prefill_tokens_per_s")
    observed_at = ctx.table.uniform("observed_at")  # a view polls every replica at once
    if observed_at is not None:
        elapsed = max(ctx.now - observed_at, 0.0)
    else:
        elapsed = np.maximum(ctx.now - ctx.column("observed_at"), 0.0)
    queued = np.maximum(ctx.column("waiting_prompt_tokens") - prefill * elapsed, 0.0)
    ttft = (queued + ctx.booked_tokens + ctx.request.prompt_tokens) / prefill
    tpot = ctx.column("decode_step_s") * (1.0 + ctx.utilisation)
    if ctx.slo is None:
        ttft_target, tpot_target = ttft.min(), tpot.min()
    else:
        ttft_target, tpot_target = ctx.slo.ttft_s, ctx.slo.tpot_s
    return np.minimum(_fit(ttft_target, ttft), _fit(tpot_target, tpot))


def round_robin(ctx: ScoringContext) -> np.ndarray:
    """Round robin: each request to the next replica in turn, whatever their load.

    Stateless, so the turn is read from the bookings: the candidate the router agents
    have sent the fewest prompt tokens since its last report (`booked_tokens`) is next,
    ties going around the replicas in id order from an offset that advances with each
    view (`table.version`). With equal prompts that is exactly round robin; it never
    reads a replica's reported load, which is what makes it the load-oblivious
    baseline. Use it alone with `load_guard: 1.0`. Scores 1 for the pick, 0 elsewhere.
    """
    n = ctx.candidates.size
    ranks = ctx.table.id_rank[ctx.candidates]
    turn = (ranks - ctx.table.version) % len(ctx.table)  # position in this view's rotation
    pick = np.lexsort((turn, ctx.booked_tokens))[0]
    return _one_hot(n, pick)


def power_of_two(ctx: ScoringContext) -> np.ndarray:
    """Power of two choices (Ray Serve's default request router): sample two candidates
    at random and take the one with fewer requests queued on it (running + waiting, as
    last reported; fewer booked prompt tokens on a tie, then both score).

    The random source is the request's id, which the ingress draws at random (uuid4):
    the pair is a pure function of the request, so the scorer stays pure and testable,
    and is uniform over the candidate pairs across requests. Scores 1 for the pick
    (both on a full tie: the router then takes the less utilised), 0 elsewhere.
    """
    n = ctx.candidates.size
    if n == 1:
        return np.ones(1)
    a, b = np.random.default_rng(_seed(ctx.request.request_id)).choice(n, size=2, replace=False)
    queued = ctx.column("running") + ctx.column("waiting")
    key_a, key_b = (queued[a], ctx.booked_tokens[a]), (queued[b], ctx.booked_tokens[b])
    scores = np.zeros(n)
    scores[a], scores[b] = float(key_a <= key_b), float(key_b <= key_a)
    return scores


def _seed(request_id: str) -> int:
    """64 bits of the request id, as a generator seed."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def _one_hot(n: int, i: int) -> np.ndarray:
    scores = np.zeros(n)
    scores[i] = 1.0
    return scores


def _fit(target: float, predicted: np.ndarray) -> np.ndarray:
    """min(1, target / predicted), with a zero prediction meeting any target."""
    if predicted.size and np.minimum.reduce(predicted) > 0:  # the usual case: no zero to guard
        return np.minimum(target / predicted, 1.0)
    return np.minimum(
        np.divide(target, predicted, out=np.ones_like(predicted), where=predicted > 0), 1.0
    )


SCORERS: Mapping[str, Scorer] = MappingProxyType(
    {"load": load, "kv": kv, "prefix": prefix, "slo_fit": slo_fit,
     "round_robin": round_robin, "power_of_two": power_of_two}
)
