"""Live-migration policy, after Llumnix (Sun et al., OSDI 2024): which requests to move
between replicas of one model, and where, once per control period.

`plan_migrations(view, in_flight, now=..., settings=..., kv_bytes_per_token=...)` books
every move on one ledger of virtual usage (`policies.virtual_usage`: KV blocks in use plus
queued demand plus headroom, as a fraction of each replica's own KV capacity), starting
from the view with the migrations in flight taken as done. The rules run in this order,
each seeing the moves of those before it:

1. DRAIN: every request on a DRAINING replica goes to the READY replica of its model that
   it leaves least loaded; queued ones first (a re-dispatch, cheap), oldest first, then
   running ones, fewest KV blocks first.
2. PRIORITY: on a READY replica where requests of a protected class (one with headroom)
   wait for KV blocks, or where the headroom they reserve is not free, running requests
   of lower priority move off, lowest priority then fewest blocks first, until it is.
3. DEFRAGMENT: a queued request that fits on no READY replica of its model, where moving
   small running requests off one would make room: those move off the replica needing
   the fewest blocks freed (its own replica on a tie) and, if that is another replica,
   the queued request moves onto it. All of it, or nothing.
4. BALANCE: first, a queued request that cannot start where it waits (the blocks in use
   there and those of the requests queued ahead of it leave too little room) goes to the
   READY replica where it would start at once (after that replica's own queue), the one
   it leaves least loaded: a re-dispatch, nothing is copied, and its cooldown does not
   hold it, as it only ever moves to start. Then, per model, while the most loaded READY
   replica (usage >= high_load) and the least loaded (usage <= low_load) differ by more
   than balance_gap, the request with the fewest KV blocks to copy (queued ones have
   none) moves from the first to the second, so long as the target does not end up more
   loaded than the source.

Everywhere: a target is READY, serves the source's model, is not the source, and has
room: for a running request, KV blocks beyond the headroom held back from it (headroom is
kept free *for* its class, so a request of that class may use it: see
`LoadLedger.reserved_blocks`); for a queued one, a queue slot and capacity it could ever
run in. A request moves at most once; never while it is migrating already or listed on
two replicas (a handoff), inside its cooldown (`now - arrived_at < cooldown_s`: a migrated
request arrives afresh on its target, so this also stops one from bouncing back; save the
queued re-dispatch of rule 4), or with fewer than `min_remaining_tokens` left to generate.
KV copies (running requests) count against `max_per_replica` (as source or target),
`max_concurrent` and the bandwidth budget, with those already in flight; re-dispatching a
queued request copies nothing and counts against none of them. Ties break by replica id,
then request id. With `enabled` off, only DRAIN runs.

Pure: `now` is handed in (seconds, on the engines' wall clock, like `arrived_at`).
Units: KV blocks, bytes, seconds, fractions of a replica's KV capacity.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RequestStatus
from policies.virtual_usage import LoadLedger, project_moves

__all__ = ["InFlightMigration", "MigrationDecision", "MigrationPlan", "MigrationReason",
           "MigrationSettings", "apply_plan_to_view", "plan_migrations"]

_READY, _DRAINING = ReplicaState.READY, ReplicaState.DRAINING
_MIGRATING, _MOVED, _COOLDOWN = "migrating already", "moved in this plan", "in cooldown"


class MigrationReason(str, enum.Enum):
    """Why a request moves; the order of the rules."""

    DRAIN = "drain"  # its replica is being drained (scale-in, maintenance, placement)
    PRIORITY = "priority"  # to free blocks for a protected class's requests
    DEFRAGMENT = "defragment"  # to make room for a queued request that fits nowhere
    BALANCE = "balance"  # from the most to the least loaded replica of its model


@dataclass(frozen=True)
class MigrationSettings:
    """Thresholds are virtual usage (fractions of a replica's KV capacity, see the module)."""

    enabled: bool = True  # False: only drains move requests (they must finish regardless)
    balance_gap: float = 0.2  # balance while most and least loaded differ by more than this
    high_load: float = 0.7  # a replica at or above this may give requests to balance
    low_load: float = 0.5  # a replica at or below this may take requests to balance
    max_per_replica: int = 2  # KV copies in flight with one replica as source or target
    max_concurrent: int = 8  # KV copies in flight cluster-wide
    bandwidth_bytes_per_s: float = 10e9  # cluster-wide rate the KV copies may use
    bandwidth_window_s: float = 1.0  # bytes in flight <= rate x window: each copy ends within it
    min_remaining_tokens: int = 8  # requests closer than this to max_tokens finish in place
    cooldown_s: float = 5.0  # seconds after it arrived on a replica before a request may move
    headroom: tuple[tuple[str, float], ...] = ()  # SLO class -> KV fraction kept free for it

    def __post_init__(self) -> None:
        pairs = self.headroom.items() if isinstance(self.headroom, Mapping) else self.headroom
        object.__setattr__(self, "headroom", tuple(sorted((str(c), float(f)) for c, f in pairs)))
        if not 0 <= self.low_load <= self.high_load:
            raise ValueError(f"migration thresholds need 0 <= low_load <= high_load, got "
                             f"low_load={self.low_load}, high_load={self.high_load}")
        for name in ("balance_gap", "max_per_replica", "max_concurrent", "min_remaining_tokens", "cooldown_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"migration {name} must be >= 0, got {getattr(self, name)}")
        if not (self.bandwidth_bytes_per_s > 0 and self.bandwidth_window_s > 0):
            raise ValueError("migration bandwidth_bytes_per_s and bandwidth_window_s must be > 0")
        bad = [c for c, f in self.headroom if not 0 <= f < 1]
        if bad:
            raise ValueError(f"migration headroom must be fractions in [0, 1), not for class(es) {bad}")

    @property
    def bandwidth_bytes(self) -> float:
        """KV bytes that may be in flight at once."""
        return self.bandwidth_bytes_per_s * self.bandwidth_window_s

    @property
    def headroom_by_class(self) -> Mapping[str, float]:
        return MappingProxyType(dict(self.headroom))


@dataclass(frozen=True)
class InFlightMigration:
    """A migration the controller started and has not seen end."""

    request_id: str
    source: str
    target: str
    est_bytes: int  # KV bytes it copies (0 for a re-dispatch)
    running: bool = True  # False: a queued request's re-dispatch, which copies nothing

    def __post_init__(self) -> None:
        if self.est_bytes < 0:
            raise ValueError(f"in-flight migration of {self.request_id}: est_bytes must be >= 0")
        if self.source == self.target:
            raise ValueError(f"in-flight migration of {self.request_id}: source and target are both {self.source}")


@dataclass(frozen=True)
class MigrationDecision:
    """Move `request_id` from replica `source` to replica `target`."""

    request_id: str
    source: str
    target: str
    reason: MigrationReason
    kv_blocks: int  # blocks to copy, in the source's block size (0: queued, a re-dispatch)
    est_bytes: int  # KV bytes to copy: context tokens x KV bytes per token (0: queued)
    running: bool  # False: queued on the source; it is re-dispatched, nothing is copied

    def in_flight(self) -> InFlightMigration:
        """The record to hand back to the policy while this migration runs."""
        return InFlightMigration(self.request_id, self.source, self.target, self.est_bytes, self.running)


@dataclass(frozen=True)
class MigrationPlan:
    """The moves of one control period, in the order decided, and why wanted moves were not made."""

    decisions: tuple[MigrationDecision, ...] = ()
    notes: tuple[str, ...] = ()


def plan_migrations(view: FleetView, in_flight: Iterable[InFlightMigration], *, now: float,
                    settings: MigrationSettings, kv_bytes_per_token: Mapping[str, int]) -> MigrationPlan:
    """The moves of this control period (see the module's note for the rules).

    `in_flight`: migrations started and not yet ended; `now`: seconds on the engines'
    clock; `kv_bytes_per_token`: model -> KV bytes one token takes (all layers, K and V;
    `TransformerSpec.kv_bytes_per_token`), for every model with running requests.
    Raises ValueError naming the problem for a malformed view or a missing model.
    """
    in_flight = tuple(in_flight)
    twice = sorted(rid for rid, n in Counter(m.request_id for m in in_flight).items() if n > 1)
    if twice:
        raise ValueError(f"in_flight lists request(s) {twice} more than once")
    planner = _Planner(view, in_flight, now, settings, kv_bytes_per_token)
    planner.drain()
    if settings.enabled:
        planner.priority()
        planner.defragment()
        planner.balance()
    else:
        planner.notes.append("migration is disabled: only drains move requests")
    return MigrationPlan(tuple(planner.state.decisions), tuple(planner.notes))


class _Bounds:
    """KV copies in flight, planned ones included, against the settings' bounds."""

    def __init__(self, settings: MigrationSettings, in_flight: Iterable[InFlightMigration]) -> None:
        self.settings = settings
        self.per_replica: Counter[str] = Counter()
        self.count, self.bytes = 0, 0
        for m in in_flight:
            if m.running:
                self.book(m.source, m.target, m.est_bytes)

    def copy(self) -> _Bounds:
        other = _Bounds(self.settings, ())
        other.per_replica, other.count, other.bytes = Counter(self.per_replica), self.count, self.bytes
        return other

    def refusal(self, source: str, target: str, est_bytes: int) -> str | None:
        """Why one more copy from `source` to `target` would break a bound (None: it would not)."""
        why = self.saturated(source) or self.saturated(target)
        if why is None and self.bytes + est_bytes > self.settings.bandwidth_bytes:
            return (f"{self.bytes + est_bytes} bytes in flight would exceed the bandwidth budget "
                    f"of {self.settings.bandwidth_bytes:.0f} bytes")
        return why

    def saturated(self, replica_id: str) -> str | None:
        """Why no copy may start or end at `replica_id`, whatever its size (None: one may)."""
        s = self.settings
        if self.count >= s.max_concurrent:
            return f"{self.count} KV copies in flight cluster-wide (max_concurrent {s.max_concurrent})"
        if self.per_replica[replica_id] >= s.max_per_replica:
            return f"replica {replica_id} has {self.per_replica[replica_id]} KV copies in flight (max_per_replica)"
        return None

    def book(self, source: str, target: str, est_bytes: int) -> None:
        self.per_replica.update((source, target))
        self.count += 1
        self.bytes += est_bytes


@dataclass
class _State:
    """What a plan has booked so far; copied whole for an all-or-nothing trial."""

    ledger: LoadLedger
    bounds: _Bounds
    decisions: list[MigrationDecision] = field(default_factory=list)
    moved: set[str] = field(default_factory=set)

    def copy(self) -> _State:
        return _State(self.ledger.copy(), self.bounds.copy(), list(self.decisions), set(self.moved))


class _Planner:
    """One plan in the making: the rules as methods over a shared `_State`."""

    def __init__(self, view: FleetView, in_flight: tuple[InFlightMigration, ...], now: float,
                 settings: MigrationSettings, kv_bytes_per_token: Mapping[str, int]) -> None:
        self.settings, self.now = settings, now
        self.replicas = sorted(view.replicas, key=lambda r: r.replica_id)
        self.bytes_per_token = _checked_bytes(self.replicas, kv_bytes_per_token)
        ledger = LoadLedger(view, settings.headroom_by_class,
                            [(m.request_id, m.source, m.target) for m in in_flight])
        self.state = _State(ledger, _Bounds(settings, in_flight))
        self.migrating = {m.request_id for m in in_flight}
        self.notes: list[str] = []

    @property
    def ledger(self) -> LoadLedger:
        return self.state.ledger

    # -- the rules ---------------------------------------------------------------------

    def drain(self) -> None:
        for r in self._in_state(_DRAINING):
            if not r.requests and (r.running or r.waiting):
                self.notes.append(f"drain {r.replica_id}: it lists no requests; they finish in place")
            queued = sorted((q for q in r.requests if not q.running), key=lambda q: (q.arrived_at, q.request_id))
            held: Counter[str] = Counter()
            for q in queued + self._smallest_first(r, (q for q in r.requests if q.running)):
                target, why = (None, hold) if (hold := self._hold(q)) else self._target(q, r.replica_id)
                if target is not None:
                    self._move(q, r.replica_id, target, MigrationReason.DRAIN)
                elif why != _MIGRATING:
                    held[why] += 1
            self.notes += [f"drain {r.replica_id}: {n} request(s) stay: {why}" for why, n in sorted(held.items())]

    def priority(self) -> None:
        for r in self._in_state(_READY):
            short = self._priority_shortfall(r)
            if short is None:
                continue
            top, need = short
            lower = [q for q in r.requests if q.running and q.priority < top]
            if not lower:
                continue  # nothing here this rule could ever move (e.g. one class): no note every period
            holds = {q.request_id: self._hold(q) for q in lower}
            held = Counter(why for why in holds.values() if why is not None)
            movable = sorted((q for q in lower if holds[q.request_id] is None),
                             key=lambda q: (q.priority, q.kv_blocks(r.block_size), q.request_id))
            why = "no more running requests of lower priority may move" + "".join(
                f"; {n} {reason}" for reason, n in sorted(held.items()))
            for q in movable:
                if need <= 0:
                    break
                target, refusal = self._target(q, r.replica_id)
                if target is None:
                    why = refusal
                    continue
                self._move(q, r.replica_id, target, MigrationReason.PRIORITY)
                need -= q.kv_blocks(r.block_size)
            if need > 0:
                self.notes.append(f"priority {r.replica_id}: still {need} KV block(s) short for "
                                  f"protected requests: {why}")

    def defragment(self) -> None:
        queued = [(q, r) for r in self._in_state(_READY) for q in r.requests if not q.running]
        stuck: dict[str, list[RequestStatus]] = {}
        for q, home in sorted(queued, key=lambda p: (p[0].arrived_at, p[0].request_id)):
            if self._hold(q) in (_MIGRATING, _MOVED):
                continue
            peers = [r.replica_id for r in self._in_state(_READY) if r.model == home.model]
            if any(self.ledger.fits(p, q) for p in peers):
                continue  # it fits somewhere: balancing's business, not de-fragmentation's
            may_go = self._hold(q) is None
            options = [p for p in peers if self.ledger.could_ever_fit(p, q)
                       and (p == home.replica_id or (may_go and self.ledger.queue_room(p) > 0))]
            options.sort(key=lambda p: (self._blocks_short(p, q), p != home.replica_id, p))
            if not any(self._try_to_free(q, home.replica_id, p) for p in options):
                stuck.setdefault(home.model, []).append(q)
        for model, requests in sorted(stuck.items()):
            self.notes.append(f"defragment {model}: {len(requests)} queued request(s) fit on no replica and "
                              f"none can free enough KV blocks (first: {requests[0].request_id})")

    def unqueue(self) -> None:
        """Queued requests that cannot start where they wait go where they start at once."""
        for r in self._in_state(_READY):
            queued = sorted((q for q in r.requests if not q.running), key=lambda q: (q.arrived_at, q.request_id))
            ahead = 0  # blocks of the queued requests ahead that stay
            for q in queued:
                blocks = q.kv_blocks(r.block_size)
                target = None
                if self.ledger.room(r.replica_id, q) - ahead < blocks and self._hold(q) in (None, _COOLDOWN):
                    target = self._start_now(q, r.replica_id)
                if target is None:
                    ahead += blocks
                else:
                    self._move(q, r.replica_id, target, MigrationReason.BALANCE)

    def _start_now(self, q: RequestStatus, source: str) -> str | None:
        """The READY replica of the source's model where queued `q` would start at once (its
        own queue started first), leaving it least loaded; None if there is none."""
        src, ledger = self.ledger.replica(source), self.ledger
        starts = [r.replica_id for r in self._in_state(_READY) if r.model == src.model and r.replica_id != source
                  and ledger.queue_room(r.replica_id) > 0
                  and ledger.room_after_queue(r.replica_id, q) >= q.kv_blocks(r.block_size)]
        return min(starts, key=lambda rid: (ledger.usage_with(rid, q), rid), default=None)

    def balance(self) -> None:
        self.unqueue()
        for model in sorted({r.model for r in self._in_state(_READY)}):
            ready = [r.replica_id for r in self._in_state(_READY) if r.model == model]
            moved, refused = self._balance_once(ready)
            while moved:
                moved, why = self._balance_once(ready)
                refused = refused or why
            if refused:
                self.notes.append(f"balance {model}: {refused}")

    # -- the steps ---------------------------------------------------------------------

    def _priority_shortfall(self, r: ReplicaSnapshot) -> tuple[int, int] | None:
        """(highest protected priority, KV blocks to free) on `r`, or None when nothing is short."""
        headroom = self.settings.headroom_by_class
        protected = [q for q in r.requests if headroom.get(q.slo_class, 0) > 0
                     and q.request_id not in self.state.moved]
        if not protected:
            return None
        waiting = sum(q.kv_blocks(r.block_size) for q in protected if not q.running)
        need = waiting - self.ledger.room(r.replica_id)
        return (max(q.priority for q in protected), need) if need > 0 else None

    def _blocks_short(self, replica_id: str, q: RequestStatus) -> int:
        return q.kv_blocks(self.ledger.replica(replica_id).block_size) - self.ledger.room(replica_id, q)

    def _try_to_free(self, q: RequestStatus, home: str, replica_id: str) -> bool:
        """Move small running requests off `replica_id` until `q` fits on it, then `q` onto
        it if it is elsewhere; keep the moves only if `q` then fits."""
        saved, self.state = self.state, self.state.copy()
        r = self.ledger.replica(replica_id)
        small = [x for x in r.requests if x.running and x.request_id != q.request_id and self._hold(x) is None]
        for x in self._smallest_first(r, small):
            if self.ledger.fits(replica_id, q):
                break
            target, _ = self._target(x, replica_id)
            if target is not None:
                self._move(x, replica_id, target, MigrationReason.DEFRAGMENT)
        if not self.ledger.fits(replica_id, q):
            self.state = saved
            return False
        if replica_id != home:
            self._move(q, home, replica_id, MigrationReason.DEFRAGMENT)
        return True

    def _balance_once(self, ready: list[str]) -> tuple[bool, str | None]:
        """One move from the most to the least loaded pair that allows one; (moved, why a
        bound refused a copy between a pair whose gap exceeds the threshold)."""
        s, usage, bounds = self.settings, self.ledger.usage, self.state.bounds
        sources = sorted((rid for rid in ready if usage(rid) >= s.high_load), key=lambda rid: (-usage(rid), rid))
        targets = sorted((rid for rid in ready if usage(rid) <= s.low_load), key=lambda rid: (usage(rid), rid))
        refused = None
        for src in sources:
            r = self.ledger.replica(src)
            blocked = bounds.saturated(src)  # once a bound is reached only re-dispatches pass
            candidates = [q for q in r.requests if not (blocked and q.running) and self._hold(q) is None]
            candidates.sort(key=lambda q: (q.kv_blocks(r.block_size) if q.running else 0, q.request_id))
            for tgt in (t for t in targets if t != src):
                if usage(src) - usage(tgt) <= s.balance_gap:
                    break
                refused = refused or blocked
                for q in candidates:
                    why = bounds.refusal(src, tgt, self._est_bytes(q, r)) if q.running else None
                    refused = refused or why
                    if why is None and self._has_room(tgt, q) and \
                            self.ledger.usage_with(tgt, q) <= self.ledger.usage_without(src, q):
                        self._move(q, src, tgt, MigrationReason.BALANCE)
                        return True, refused
        return False, refused

    # -- shared ------------------------------------------------------------------------

    def _in_state(self, state: ReplicaState) -> list[ReplicaSnapshot]:
        return [r for r in self.replicas if r.state is state]

    @staticmethod
    def _smallest_first(r: ReplicaSnapshot, requests: Iterable[RequestStatus]) -> list[RequestStatus]:
        return sorted(requests, key=lambda q: (q.kv_blocks(r.block_size), q.request_id))

    def _hold(self, q: RequestStatus) -> str | None:
        """Why `q` may not move now (None: it may)."""
        if q.request_id in self.migrating or len(self.ledger.listed_on(q.request_id)) > 1:
            return _MIGRATING
        if q.request_id in self.state.moved:
            return _MOVED
        if q.remaining_tokens < self.settings.min_remaining_tokens:
            return "about to finish"
        if self.now - q.arrived_at < self.settings.cooldown_s:
            return _COOLDOWN
        return None

    def _has_room(self, replica_id: str, q: RequestStatus) -> bool:
        if q.running:
            return self.ledger.fits(replica_id, q)
        return self.ledger.queue_room(replica_id) > 0 and self.ledger.could_ever_fit(replica_id, q)

    def _target(self, q: RequestStatus, source: str) -> tuple[str | None, str]:
        """The READY replica of the source's model, with room and within the bounds, that
        `q` leaves least loaded; or None and why there is none."""
        src = self.ledger.replica(source)
        fitting = [r.replica_id for r in self._in_state(_READY)
                   if r.model == src.model and r.replica_id != source and self._has_room(r.replica_id, q)]
        fitting.sort(key=lambda rid: (self.ledger.usage_with(rid, q), rid))
        refusals = []
        for rid in fitting:
            why = self.state.bounds.refusal(source, rid, self._est_bytes(q, src)) if q.running else None
            if why is None:
                return rid, ""
            refusals.append(why)
        return None, refusals[0] if refusals else f"no READY replica of {src.model} has room"

    def _est_bytes(self, q: RequestStatus, source: ReplicaSnapshot) -> int:
        """KV bytes of its context (what the pre-copy carries); none for a queued request."""
        return (q.prompt_tokens + q.output_tokens) * self.bytes_per_token[source.model] if q.running else 0

    def _move(self, q: RequestStatus, source: str, target: str, reason: MigrationReason) -> None:
        src, st = self.ledger.replica(source), self.state
        blocks = q.kv_blocks(src.block_size) if q.running else 0
        est = self._est_bytes(q, src)
        st.ledger.shift(q, source, target)
        if q.running:
            st.bounds.book(source, target, est)
        st.decisions.append(MigrationDecision(q.request_id, source, target, reason, blocks, est, q.running))
        st.moved.add(q.request_id)


def _checked_bytes(replicas: Iterable[ReplicaSnapshot], kv_bytes_per_token: Mapping[str, int]) -> dict[str, int]:
    """`kv_bytes_per_token`, checked for every model with a running request on a replica
    that may give requests away (READY or DRAINING)."""
    for model in sorted({r.model for r in replicas
                         if r.state in (_READY, _DRAINING) and any(q.running for q in r.requests)}):
        value = kv_bytes_per_token.get(model)
        if value is None or value <= 0:
            raise ValueError(f"kv_bytes_per_token: need positive bytes per token for model {model!r}, got {value!r}")
    return dict(kv_bytes_per_token)


def apply_plan_to_view(view: FleetView, plan: MigrationPlan, now: float | None = None) -> FleetView:
    """The view as it would be with every move of `plan` done (`policies.virtual_usage.project_moves`);
    with `now`, moved requests carry `arrived_at=now`. For tests, the simulator and what-ifs."""
    return project_moves(view, ((d.request_id, d.source, d.target) for d in plan.decisions), now)
