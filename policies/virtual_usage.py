"""Virtual usage: a replica's load the way Llumnix measures it (Sun et al., OSDI 2024),
normalised to the replica's own KV capacity so that replicas on different GPUs compare.

    usage = (KV blocks in use + KV blocks its queued requests need) / KV blocks in total
            + the headroom fraction of the most demanding class among its requests

Queued demand is what makes a replica with a long queue look loaded before it has
allocated anything (de-fragmentation falls out of this: the head-of-line request's demand
pushes its replica up the list); headroom is what makes a replica serving a protected
(high-priority) class look fuller than its blocks say, so that less is sent to it. The
headroom is held back from requests of other classes only: a request of the protected
class may use it (were every request protected, holding it back from them would only
leave capacity idle).
A replica with no KV capacity has infinite usage. Floats compare in a total order (no
NaN can arise: capacities are checked), with ties broken by replica id by the callers.

`LoadLedger` is the working copy of every replica's usage that a migration plan books its
moves on, starting from the view with every migration already in flight taken as done.
`project_moves` is the view as it would be once some moves are done, for what-ifs.
Units: KV blocks (each replica's own block size), fractions of a replica's KV capacity.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from policies.fleet_view import FleetView, ReplicaSnapshot, RequestStatus


def headroom_fraction(classes: Iterable[str], headroom: Mapping[str, float]) -> float:
    """Fraction of KV capacity reserved for the most demanding of `classes` (0 when none is)."""
    return max((headroom.get(c, 0.0) for c in classes), default=0.0)


def queued_blocks(replica: ReplicaSnapshot) -> int:
    """KV blocks the replica's queued requests will need to start: the larger of the sum
    over the queued requests it lists and its aggregate `waiting_prompt_tokens`, as
    either may lag the other."""
    listed = sum(r.kv_blocks(replica.block_size) for r in replica.requests if not r.running)
    return max(listed, -(-replica.waiting_prompt_tokens // replica.block_size))


def virtual_usage(replica: ReplicaSnapshot, headroom: Mapping[str, float]) -> float:
    """The replica's virtual usage (see the module's note), whatever its state."""
    return _usage(replica.kv_blocks_total, replica.kv_blocks_used + queued_blocks(replica),
                  headroom_fraction({r.slo_class for r in replica.requests}, headroom))


def _usage(total: int, demand: int, reserved: float) -> float:
    return math.inf if total <= 0 else demand / total + reserved


def check_replica(replica: ReplicaSnapshot) -> None:
    """Raise ValueError naming the replica and field when its load numbers cannot be used."""
    if replica.block_size < 1:
        raise ValueError(f"replica {replica.replica_id}: block_size must be >= 1, got {replica.block_size}")
    for name in ("kv_blocks_total", "kv_blocks_used", "waiting", "waiting_prompt_tokens"):
        if getattr(replica, name) < 0:
            raise ValueError(f"replica {replica.replica_id}: {name} must be >= 0, got {getattr(replica, name)}")


@dataclass
class _Load:
    """One replica's projected load; mutable, owned by one ledger."""

    replica: ReplicaSnapshot
    used: int  # KV blocks held by running requests
    queued: int  # KV blocks its queued requests need
    waiting: int  # queued requests
    classes: Counter[str] = field(default_factory=Counter)  # SLO class -> requests it holds

    def copy(self) -> _Load:
        return _Load(self.replica, self.used, self.queued, self.waiting, Counter(self.classes))


class LoadLedger:
    """Every replica's projected load while a plan is being made: check, then shift.

    Built from `view` with each migration in `moving` (request id, source, target) taken
    as done where the view still shows its request on the source: off the source, and
    onto the target unless the target already lists it. `copy()` gives an independent
    ledger, so that a rule can try a sequence of moves and keep it only if it works.
    """

    def __init__(self, view: FleetView, headroom: Mapping[str, float],
                 moving: Iterable[tuple[str, str, str]] = ()) -> None:
        self.headroom = dict(headroom)
        self._loads: dict[str, _Load] = {}
        self._listed: dict[str, list[str]] = {}  # request id -> replicas listing it
        for r in view.replicas:
            check_replica(r)
            if r.replica_id in self._loads:
                raise ValueError(f"FleetView lists replica {r.replica_id} twice")
            self._loads[r.replica_id] = _Load(r, r.kv_blocks_used, queued_blocks(r), r.waiting,
                                              Counter(q.slo_class for q in r.requests))
            for q in r.requests:
                self._listed.setdefault(q.request_id, []).append(r.replica_id)
        for request_id, source, target in moving:
            request = self.request_on(source, request_id)
            if request is not None:
                into = target if target in self._loads and self.request_on(target, request_id) is None else None
                self.shift(request, source, into)

    def copy(self) -> LoadLedger:
        other = LoadLedger.__new__(LoadLedger)
        other.headroom = self.headroom
        other._loads = {rid: load.copy() for rid, load in self._loads.items()}
        other._listed = self._listed  # read-only after construction
        return other

    def replica(self, replica_id: str) -> ReplicaSnapshot:
        return self._loads[replica_id].replica

    def listed_on(self, request_id: str) -> tuple[str, ...]:
        """Replicas whose snapshot lists `request_id` (two while a handoff is under way)."""
        return tuple(self._listed.get(request_id, ()))

    def request_on(self, replica_id: str, request_id: str) -> RequestStatus | None:
        load = self._loads.get(replica_id)
        return None if load is None else next(
            (q for q in load.replica.requests if q.request_id == request_id), None)

    def usage(self, replica_id: str) -> float:
        return self._usage_of(self._loads[replica_id])

    def usage_with(self, replica_id: str, request: RequestStatus) -> float:
        """The replica's usage were it to receive `request`."""
        return self._usage_after(self._loads[replica_id], request, +1)

    def usage_without(self, replica_id: str, request: RequestStatus) -> float:
        """The replica's usage were `request`, which it holds, to leave."""
        return self._usage_after(self._loads[replica_id], request, -1)

    def _usage_after(self, load: _Load, request: RequestStatus, sign: int) -> float:
        blocks = sign * request.kv_blocks(load.replica.block_size)
        used, queued = (max(0, load.used + blocks), load.queued) if request.running else \
            (load.used, max(0, load.queued + blocks))
        c = request.slo_class
        fraction = self._fraction(load, add=c) if sign > 0 else self._fraction(load, drop=c)
        return _usage(load.replica.kv_blocks_total, used + queued, fraction)

    def _usage_of(self, load: _Load) -> float:
        return _usage(load.replica.kv_blocks_total, load.used + load.queued, self._fraction(load))

    def _fraction(self, load: _Load, add: str | None = None, drop: str | None = None) -> float:
        """Headroom of the classes it holds, with one request of `add` more or of `drop` fewer."""
        if not self.headroom:
            return 0.0
        held = (c for c, n in load.classes.items() if n - (c == drop) > 0)
        return headroom_fraction([*held, add] if add is not None else held, self.headroom)

    def reserved_blocks(self, replica_id: str, for_class: str | None = None) -> int:
        """KV blocks held back as headroom from a request of `for_class` (None: from any
        request): the headroom of the protected classes the replica holds, and of
        `for_class`'s own, less what `for_class` itself is entitled to. Headroom is kept
        free *for* its class: a request of that class, or of one with as much headroom,
        may use it (when every request is of the protected class, none is held back)."""
        load = self._loads[replica_id]
        fraction = self._fraction(load, add=for_class)
        if for_class is not None:
            fraction = max(0.0, fraction - self.headroom.get(for_class, 0.0))
        return math.ceil(fraction * load.replica.kv_blocks_total)

    def room(self, replica_id: str, request: RequestStatus | None = None) -> int:
        """KV blocks free beyond the headroom held back from `request` (from any request
        when None; see `reserved_blocks`)."""
        load = self._loads[replica_id]
        reserved = self.reserved_blocks(replica_id, None if request is None else request.slo_class)
        return load.replica.kv_blocks_total - load.used - reserved

    def fits(self, replica_id: str, request: RequestStatus) -> bool:
        """Whether `request` can run on the replica now: its blocks fit the room."""
        return self.room(replica_id, request) >= request.kv_blocks(self.replica(replica_id).block_size)

    def room_after_queue(self, replica_id: str, request: RequestStatus | None = None) -> int:
        """`room` once the replica's own queued requests have started (negative: they cannot all)."""
        return self.room(replica_id, request) - self._loads[replica_id].queued

    def could_ever_fit(self, replica_id: str, request: RequestStatus) -> bool:
        """Whether `request` fits the replica's capacity less the headroom held back from it, were it empty."""
        load = self._loads[replica_id]
        reserved = self.reserved_blocks(replica_id, request.slo_class)
        return load.replica.kv_blocks_total - reserved >= request.kv_blocks(load.replica.block_size)

    def queue_room(self, replica_id: str) -> int:
        load = self._loads[replica_id]
        return load.replica.max_queue - load.waiting

    def shift(self, request: RequestStatus, source: str, target: str | None) -> None:
        """Book `request` off `source` and, unless `target` is None, onto `target`, in the
        state (running or queued) it is in."""
        self._book(self._loads[source], request, -1)
        if target is not None:
            self._book(self._loads[target], request, +1)

    @staticmethod
    def _book(load: _Load, request: RequestStatus, sign: int) -> None:
        blocks = sign * request.kv_blocks(load.replica.block_size)
        if request.running:
            load.used = max(0, load.used + blocks)
        else:
            load.queued = max(0, load.queued + blocks)
            load.waiting = max(0, load.waiting + sign)
        load.classes[request.slo_class] += sign


def project_moves(view: FleetView, moves: Iterable[tuple[str, str, str]], now: float | None = None) -> FleetView:
    """The view as it would be with every move (request id, source, target) done: the
    request off its source's `requests` and onto its target's, in the state it was in,
    with `running`, `waiting`, `waiting_prompt_tokens` and `kv_blocks_used` (in each
    replica's own block size) adjusted. With `now`, a moved request carries
    `arrived_at=now`, as the target's engine would stamp it. `version` and `created_at` stay.

    Raises ValueError naming the move whose replica is not in the view or whose request
    its source does not list.
    """
    replicas = {r.replica_id: r for r in view.replicas}
    for request_id, source, target in moves:
        for rid in (source, target):
            if rid not in replicas:
                raise ValueError(f"move of {request_id}: replica {rid} is not in the view")
        q = next((x for x in replicas[source].requests if x.request_id == request_id), None)
        if q is None:
            raise ValueError(f"move of {request_id}: replica {source} does not list it")
        replicas[source] = _with_request(replicas[source], q, -1)
        replicas[target] = _with_request(replicas[target], q if now is None else replace(q, arrived_at=now), +1)
    return replace(view, replicas=tuple(replicas[r.replica_id] for r in view.replicas))


def _with_request(r: ReplicaSnapshot, q: RequestStatus, sign: int) -> ReplicaSnapshot:
    requests = r.requests + (q,) if sign > 0 else tuple(x for x in r.requests if x.request_id != q.request_id)
    if q.running:
        return replace(r, requests=requests, running=max(0, r.running + sign),
                       kv_blocks_used=max(0, r.kv_blocks_used + sign * q.kv_blocks(r.block_size)))
    return replace(r, requests=requests, waiting=max(0, r.waiting + sign), waiting_prompt_tokens=max(
        0, r.waiting_prompt_tokens + sign * (q.prompt_tokens + q.output_tokens)))
