"""Routing: filters, then weighted scorers in [0, 1], then one total-order pick.

A router agent builds a `RoutingTable` once per fleet view (about once a second):
columnar numpy arrays over the replicas plus an inverted prefix index, so that a
decision is a handful of vectorised operations rather than a Python loop over a
thousand replicas. `Router.pick` then runs, per request:

1. filters, each a boolean mask over the replicas: serves the model, fits the
   context, accepting (READY, queue not full), not excluded by the request; the
   first filter that leaves nothing names the refusal;
2. the load guard: drop candidates whose utilisation is above `load_guard`, unless
   that drops them all (this keeps prefix affinity from piling onto a hot replica);
3. the scorers named in `weights` (see `policies.scorers`), combined in `combine`
   as a weighted mean;
4. the argmax under a total order: score desc, utilisation asc, replica_id asc.
   Equal inputs give equal picks whatever the order of the replicas in the view
   (a comparator that is not a total order starved instances in Llumnix#303).

Utilisation, in [0, 1], is the busiest of three fractions of a replica's capacity:
KV demand (blocks held + blocks its waiting and booked prompts need, of its total),
queue fill (waiting + booked requests, of `max_queue`) and throughput
(`tokens_per_s` of `max_batch_tokens_per_s`). Running requests count through the
KV blocks they hold and the tokens they produce.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from types import MappingProxyType
from typing import Any

import numpy as np

from policies.bookings import Bookings
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, SloClass
from policies.prefix_index import PrefixIndex
from policies.scorers import SCORERS, Scorer, ScoringContext


@dataclass(frozen=True)
class RoutingDefaults:
    """Default routing policy: prefix-aware, with a load guard. `FleetConfig` imports it."""

    weights: Mapping[str, float]
    load_guard: float  # utilisation in (0, 1] above which a replica is skipped if others are not


DEFAULT_ROUTING = RoutingDefaults(
    weights=MappingProxyType({"prefix": 3.0, "load": 2.0, "slo_fit": 1.0, "kv": 1.0}),
    load_guard=0.9,
)


class Refusal(str, enum.Enum):
    """Why no replica can take a request now; the ingress maps it to an HTTP status."""

    NO_MODEL = "no_model"  # no replica serves the model (404)
    TOO_LONG = "too_long"  # no replica of the model can ever hold it (400)
    FULL = "full"  # none accepting: not READY or queue full (429/503, retry later)
    EXCLUDED = "excluded"  # every accepting replica is excluded for this request (503)


@dataclass(frozen=True)
class RoutingDecision:
    """Where one request goes, or why it goes nowhere now.

    `replica_id` is None exactly when `refusal` is set; `reason` then says why in words
    and the caller answers 429/503 (or 404/400 for `NO_MODEL`/`TOO_LONG`).
    """

    request_id: str
    view_version: int
    replica_id: str | None
    score: float = 0.0  # combined score of the pick, in [0, 1]
    # each scorer's score of the pick
    scores: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    utilisation: float = 0.0  # of the pick, including bookings, in [0, 1]
    candidates: int = 0  # replicas scored (after filters and load guard)
    refusal: Refusal | None = None
    reason: str | None = None

    @property
    def routed(self) -> bool:
        return self.replica_id is not None


_NUMERIC = (  # ReplicaSnapshot fields the table keeps as float64 columns
    "running",
    "waiting",
    "waiting_prompt_tokens",
    "kv_blocks_used",
    "kv_blocks_total",
    "block_size",
    "tokens_per_s",
    "max_batch_tokens_per_s",
    "prefill_tokens_per_s",
    "decode_step_s",
    "max_queue",
    "observed_at",
)
_POSITIVE = ("block_size", "max_batch_tokens_per_s", "prefill_tokens_per_s", "decode_step_s")


@dataclass(frozen=True, eq=False)
class RoutingTable:
    """One fleet view as read-only columns (row i = replica i), built once per view.

    Numeric columns are float64 in the snapshot's units (requests, tokens, KV blocks,
    tokens/s, seconds); `prefix` maps block hashes to the rows holding them.
    """

    version: int
    replica_ids: tuple[str, ...]
    index_of: Mapping[str, int]
    id_rank: np.ndarray  # rank of each replica_id in sorted order: the last tie-break
    slo_classes: Mapping[str, SloClass]
    accepting: np.ndarray  # bool: READY and waiting < max_queue
    kv_capacity_tokens: np.ndarray  # kv_blocks_total * block_size
    columns: Mapping[str, np.ndarray]  # the _NUMERIC fields by name
    prefix: PrefixIndex  # which rows hold which block hashes
    _model_masks: Mapping[str, np.ndarray]
    # KV-cache stores: which stores hold which block hashes, the store on each replica's
    # node (-1: none), and what a block loadable from there counts for (FleetView)
    store_prefix: PrefixIndex = field(default_factory=lambda: PrefixIndex.build(()))
    store_of_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    store_hit_weight: float = 0.0
    # facts that depend on the view alone, computed on first use (see `_once`)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_view(cls, view: FleetView) -> RoutingTable:
        """Columns and prefix index of `view`; raises ValueError naming a bad snapshot."""
        reps = view.replicas
        ids = tuple(r.replica_id for r in reps)
        index_of = {rid: i for i, rid in enumerate(ids)}
        if len(index_of) != len(ids):
            dup = next(rid for i, rid in enumerate(ids) if index_of[rid] != i)
            raise ValueError(f"fleet view {view.version}: replica_id {dup!r} appears twice")
        cols = {f: _column(reps, f) for f in _NUMERIC}
        _validate(reps, cols)
        for col in cols.values():
            _frozen(col)
        id_rank = np.empty(len(ids), dtype=np.int64)
        id_rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
        ready = np.fromiter((r.state is ReplicaState.READY for r in reps), bool, len(reps))
        models = np.array([r.model for r in reps], dtype=object)
        return cls(
            version=view.version,
            replica_ids=ids,
            index_of=MappingProxyType(index_of),
            id_rank=_frozen(id_rank),
            slo_classes=MappingProxyType({c.name: c for c in view.slo_classes}),
            accepting=_frozen(ready & (cols["waiting"] < cols["max_queue"])),
            kv_capacity_tokens=_frozen(cols["kv_blocks_total"] * cols["block_size"]),
            columns=MappingProxyType(cols),
            prefix=PrefixIndex.build([r.cached_block_hashes for r in reps]),
            _model_masks=MappingProxyType({m: _frozen(models == m) for m in set(models)}),
            **_store_columns(view),
        )

    def __len__(self) -> int:
        return len(self.replica_ids)

    def model_mask(self, model: str) -> np.ndarray:
        """Rows serving `model` (all False for a model no replica serves)."""
        mask = self._model_masks.get(model)
        return mask if mask is not None else np.zeros(len(self), dtype=bool)

    def booked(self, bookings: Bookings | None, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Booked (requests, prompt tokens) on `rows`, as float64 arrays."""
        if bookings is None:
            return np.zeros(rows.size), np.zeros(rows.size)
        requests, tokens = bookings.by_row(self.index_of, len(self))
        return requests[rows], tokens[rows]

    def utilisation(
        self, rows: np.ndarray, booked_requests: np.ndarray, booked_tokens: np.ndarray
    ) -> np.ndarray:
        """Utilisation in [0, 1] of `rows` with their bookings (see the module note)."""
        return self._utilisation(rows, booked_requests, booked_tokens)

    def _utilisation(
        self, rows: np.ndarray | None, booked_requests: np.ndarray, booked_tokens: np.ndarray
    ) -> np.ndarray:
        """`utilisation` of `rows`, or of every row when `rows` is None (no gather)."""
        c = self.columns
        if rows is None:
            col = c.__getitem__
        else:
            def col(name: str) -> np.ndarray:
                return c[name][rows]
        queued = (col("waiting_prompt_tokens") + booked_tokens) / col("block_size")
        kv = _ratio(col("kv_blocks_used") + queued, col("kv_blocks_total"), self.positive("kv_blocks_total"))
        queue = _ratio(col("waiting") + booked_requests, col("max_queue"), self.positive("max_queue"))
        throughput = self._throughput() if rows is None else self._throughput()[rows]
        return np.minimum(np.maximum(np.maximum(kv, queue), throughput), 1.0)

    def positive(self, name: str) -> bool:
        """Whether numeric column `name` is > 0 on every row (then a ratio over it needs
        no guard against a zero denominator)."""
        return self._once("positive:" + name, lambda: bool((self.columns[name] > 0).all()))

    def every_row_mask(self) -> np.ndarray:
        """All True, read-only: what a filter that drops no row returns (the router then
        skips it when combining masks)."""
        return self._once("every_row_mask", lambda: _frozen(np.ones(len(self), dtype=bool)))

    def min_kv_capacity_tokens(self) -> float:
        """The smallest KV cache of any row, tokens (inf for an empty table)."""
        cap = self.kv_capacity_tokens
        return self._once("min_kv_capacity", lambda: float(cap.min()) if cap.size else float("inf"))

    def uniform(self, name: str) -> float | None:
        """The value of numeric column `name` when every row has the same one, else None."""
        col = self.columns[name]
        return self._once("uniform:" + name, lambda: float(col[0]) if col.size and (col == col[0]).all() else None)

    def all_rows(self) -> np.ndarray:
        """Every row index, ascending (the candidates when no filter drops a row)."""
        return self._once("all_rows", lambda: _frozen(np.arange(len(self))))

    def _throughput(self) -> np.ndarray:
        """tokens_per_s / max_batch_tokens_per_s per row."""
        c = self.columns
        return self._once("throughput", lambda: _frozen(c["tokens_per_s"] / c["max_batch_tokens_per_s"]))

    def _once(self, key: str, compute: Callable[[], Any]) -> Any:
        """A fact of this table's view: computed on first use, then kept (the view never changes)."""
        value = self._derived.get(key, _UNSET)
        if value is _UNSET:
            value = self._derived[key] = compute()
        return value


_UNSET = object()


def _store_columns(view: FleetView) -> dict:
    """The stores' prefix index and each replica row's store (on its node), or nothing
    when routing ignores stores."""
    if not view.stores or view.store_hit_weight <= 0:
        return {}
    if not 0 < view.store_hit_weight <= 1:
        raise ValueError(f"fleet view {view.version}: store_hit_weight must lie in [0, 1], "
                         f"got {view.store_hit_weight!r}")
    row_of_node = {s.node_id: i for i, s in enumerate(view.stores)}
    rows = np.fromiter((row_of_node.get(r.node_id, -1) for r in view.replicas), np.int64, len(view.replicas))
    return dict(
        store_prefix=PrefixIndex.build([s.cached_block_hashes for s in view.stores]),
        store_of_row=_frozen(rows),
        store_hit_weight=float(view.store_hit_weight),
    )


def _column(reps: tuple[ReplicaSnapshot, ...], name: str) -> np.ndarray:
    return np.fromiter(map(attrgetter(name), reps), dtype=np.float64, count=len(reps))


def _validate(reps: tuple[ReplicaSnapshot, ...], cols: Mapping[str, np.ndarray]) -> None:
    for name, col in cols.items():
        bad = ~np.isfinite(col) | (col <= 0 if name in _POSITIVE else col < 0)
        if bad.any():
            r = reps[int(np.argmax(bad))]
            need = "positive" if name in _POSITIVE else ">= 0"
            raise ValueError(
                f"replica {r.replica_id!r}: {name} must be finite and {need}, got {getattr(r, name)!r}"
            )


def _ratio(num: np.ndarray, den: np.ndarray, positive: bool = False) -> np.ndarray:
    """num / den, and 1 (full) where den is 0; `positive`: the caller knows den > 0 throughout."""
    if positive:
        return num / den
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


_min, _max = np.minimum.reduce, np.maximum.reduce  # what ndarray.min/max run, without their wrappers
_any, _all = np.logical_or.reduce, np.logical_and.reduce


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# --- filters: (request, table) -> boolean mask over table rows ----------------------


def serves_model(request: RoutingRequest, table: RoutingTable) -> np.ndarray:
    return table.model_mask(request.model)


def fits_context(request: RoutingRequest, table: RoutingTable) -> np.ndarray:
    """The whole sequence (prompt + max_tokens) fits in the replica's KV cache."""
    need = request.prompt_tokens + request.max_tokens
    if need <= table.min_kv_capacity_tokens():
        return table.every_row_mask()
    return table.kv_capacity_tokens >= need


def accepting(request: RoutingRequest, table: RoutingTable) -> np.ndarray:
    return table.accepting


def not_excluded(request: RoutingRequest, table: RoutingTable) -> np.ndarray:
    if not request.exclude:
        return table.every_row_mask()
    mask = np.ones(len(table), dtype=bool)
    for replica_id in request.exclude:
        i = table.index_of.get(replica_id)
        if i is not None:
            mask[i] = False
    return mask


Filter = Callable[[RoutingRequest, RoutingTable], np.ndarray]

# In order; the first to leave no candidate gives the refusal and its message.
FILTERS: tuple[tuple[Filter, Refusal, str], ...] = (
    (serves_model, Refusal.NO_MODEL, "no replica serves model {model!r}"),
    (
        fits_context,
        Refusal.TOO_LONG,
        (
            "request needs {need} tokens of KV (prompt + max_tokens); "
            "no replica of model {model!r} holds that many"
        ),
    ),
    (accepting, Refusal.FULL, "every replica of model {model!r} that fits it is full or not ready"),
    (not_excluded, Refusal.EXCLUDED, "every accepting replica of model {model!r} is excluded"),
)


def load_guard(utilisation: np.ndarray, guard: float) -> np.ndarray:
    """Mask of candidates at or under `guard`, or all of them if none is."""
    under = utilisation <= guard
    return under if under.any() else np.ones_like(under)


# --- combine and pick: the one place scores meet ----------------------------------


def combine(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of the scorers' arrays (each in [0, 1]); the result is in [0, 1]."""
    total = sum([weights[name] for name in scores])
    combined = np.zeros(len(next(iter(scores.values()))))
    for name, s in scores.items():
        combined += (weights[name] / total) * s
    return np.minimum(combined, 1.0, out=combined)  # rounding can overshoot by an ulp


def best_index(score: np.ndarray, utilisation: np.ndarray, id_rank: np.ndarray) -> int:
    """Position of the best candidate: score desc, then utilisation asc, then id asc.

    A total order over candidates, so the pick never depends on their order.
    """
    # (ufunc reductions and methods directly: the numpy wrappers cost more than the work)
    tied = (score == _max(score)).nonzero()[0]
    if tied.size == 1:
        return int(tied[0])
    tied = tied[utilisation[tied] == _min(utilisation[tied])]
    return int(tied[id_rank[tied].argmin()])


class Router:
    """A routing policy: scorer weights and a load guard. Stateless; `pick` is pure."""

    def __init__(
        self,
        weights: Mapping[str, float] = DEFAULT_ROUTING.weights,
        load_guard: float = DEFAULT_ROUTING.load_guard,
        scorers: Mapping[str, Scorer] = SCORERS,
    ) -> None:
        unknown = sorted(set(weights) - set(scorers))
        if unknown:
            raise ValueError(
                f"routing weights name unknown scorer(s) {unknown}; known: {sorted(scorers)}"
            )
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"routing weight {name!r} must be a finite number >= 0, got {w!r}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(
                f"routing weights must give some scorer a positive weight: {dict(weights)}"
            )
        if not (isinstance(load_guard, (int, float)) and 0 < load_guard <= 1):
            raise ValueError(f"load_guard must be a utilisation in (0, 1], got {load_guard!r}")
        # weight 0 means "off": such scorers are not even computed
        self.weights = MappingProxyType({n: float(w) for n, w in weights.items() if w > 0})
        self.load_guard = float(load_guard)
        self._scorers = {name: scorers[name] for name in self.weights}

    def pick(
        self,
        request: RoutingRequest,
        table: RoutingTable,
        bookings: Bookings | None,
        now: float,
    ) -> RoutingDecision:
        """Choose a replica for `request` over `table` at `now` (seconds).

        `bookings` adds what this agent and its peers sent since the view was taken.
        Pure: nothing is booked here; the caller books the pick once it sends it.
        """
        _check_request(request)
        masks = [keep(request, table) for keep, _, _ in FILTERS]
        mask = masks[0]
        for m in masks[1:]:
            if m is not table.every_row_mask():  # (that one changes nothing)
                mask = mask & m
        if not _any(mask):
            return _refusal(request, table, masks)
        # Most decisions can choose among every row: then read whole columns, not copies.
        every = bool(_all(mask))
        candidates = table.all_rows() if every else mask.nonzero()[0]
        booked_requests, booked_tokens = (
            table.booked(bookings, candidates) if not every or bookings is None
            else bookings.by_row(table.index_of, len(table)))
        util = table._utilisation(None if every else candidates, booked_requests, booked_tokens)
        if not _max(util) <= self.load_guard:  # else the guard keeps every one
            kept = load_guard(util, self.load_guard)
            if not kept.all():
                candidates, util, booked_tokens, every = candidates[kept], util[kept], booked_tokens[kept], False
        ctx = ScoringContext(
            request=request,
            table=table,
            candidates=candidates,
            utilisation=util,
            booked_tokens=booked_tokens,
            slo=_slo_class(request, table),
            now=now,
            every_row=every,
        )
        scores = {name: _checked(name, scorer(ctx)) for name, scorer in self._scorers.items()}
        combined = combine(scores, self.weights)
        best = best_index(combined, ctx.utilisation, table.id_rank if every else table.id_rank[candidates])
        return RoutingDecision(
            request_id=request.request_id,
            view_version=table.version,
            replica_id=table.replica_ids[int(candidates[best])],
            score=float(combined[best]),
            scores=MappingProxyType({name: float(s[best]) for name, s in scores.items()}),
            utilisation=float(ctx.utilisation[best]),
            candidates=int(candidates.size),
        )


def _refusal(request: RoutingRequest, table: RoutingTable, masks: list[np.ndarray]) -> RoutingDecision:
    """The decision for a request the filters (whose `masks` these are) leave nowhere to go:
    the first filter after which no row is left names the refusal."""
    mask = np.ones(len(table), dtype=bool)
    need = request.prompt_tokens + request.max_tokens
    for m, (_, refusal, message) in zip(masks, FILTERS):
        mask &= m
        if not mask.any():
            return RoutingDecision(request.request_id, table.version, None, refusal=refusal,
                                   reason=message.format(model=request.model, need=need))
    raise AssertionError("the filters left candidates")


def _check_request(request: RoutingRequest) -> None:
    if request.prompt_tokens < 0 or request.max_tokens < 0:
        raise ValueError(
            f"request {request.request_id!r}: prompt_tokens and max_tokens must be >= 0, "
            f"got {request.prompt_tokens} and {request.max_tokens}"
        )


def _slo_class(request: RoutingRequest, table: RoutingTable) -> SloClass | None:
    """The request's SLO class; None when the view defines none (scorers go relative)."""
    if not table.slo_classes:
        return None
    slo = table.slo_classes.get(request.slo_class)
    if slo is None:
        raise ValueError(
            f"request {request.request_id!r} names SLO class {request.slo_class!r}; "
            f"the fleet defines {sorted(table.slo_classes)}"
        )
    return slo


def _checked(name: str, s: np.ndarray) -> np.ndarray:
    # min/max comparisons are False for NaN, so this also catches NaN
    if not (_min(s) >= 0.0 and _max(s) <= 1.0):
        raise ValueError(f"scorer {name!r} returned scores outside [0, 1]: {s!r}")
    return s
