"""`SimIngress`: every accepted request, owned until it ends, as the live ingress owns it.

It mirrors `orchestrator.dispatcher.Dispatcher` and `orchestrator.request_stream
.RequestStream` in virtual time: ask the router agents (in turn) for a replica, retry
every `retry_pause_s` while the fleet is full until `admission_timeout_s` (then the
request is rejected, a 429), refuse at once a request no replica can ever hold; a
replica that is full since the view was taken is avoided and another asked. When a
replica dies, each request it held resumes elsewhere from what the client had been
sent (prompt + output so far, recomputed), at most `max_resumes` times, then fails.
No network or Ray overhead is modelled: `bench.calibration` measures that gap.

Latencies are the client's: TTFT from arrival to the first token ever sent, TPOT over
the whole stream (resume stalls included), e2e from arrival to the last token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from actors.engines.base import EngineError, EngineOverloaded, GenerationRequest, RequestSnapshot
from actors.engines.sim_core import Progress
from bench.simulator.events import EventLoop, Priority
from bench.simulator.fleet import SimFleet
from bench.simulator.prompts import PromptNamer
from bench.simulator.records import RecordBook
from bench.simulator.replica import SimulatedReplica
from bench.simulator.routers import RouterPool
from bench.simulator.workload import Arrival
from policies.fleet_view import ReplicaState, RoutingRequest
from policies.routing import Refusal

log = logging.getLogger(__name__)
_NAN = float("nan")


class _Flight:
    """One accepted request: what the client was sent and where it runs."""

    __slots__ = ("admitted_at", "arrival", "cached", "first_token_at", "hashes", "migrations",
                 "outputs", "replica_id", "request", "resumes", "routing", "stall_s", "stalled_at")

    def __init__(self, arrival: Arrival, request: GenerationRequest, hashes: tuple[int, ...]):
        self.arrival = arrival
        self.request = request
        self.hashes = hashes
        self.routing = RoutingRequest(request.request_id, request.model, arrival.prompt_tokens,
                                      arrival.output_tokens, hashes, arrival.slo_class)
        self.outputs: tuple[int, ...] = ()  # tokens the client has (after a resume)
        self.replica_id: str | None = None
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.cached = 0
        self.resumes = self.migrations = 0
        self.stalled_at: float | None = None  # the stream stopped here (death, migration)
        self.stall_s = 0.0

    def pending(self) -> GenerationRequest:
        return replace(self.request, output_token_ids=self.outputs) if self.outputs else self.request

    def avoid(self, replica_id: str) -> None:
        self.routing = replace(self.routing, exclude=self.routing.exclude | {replica_id})


@dataclass
class Disruption:
    """Requests a fault (or migration wave) interrupted, and when they ran again."""

    at: float
    affected: int = 0
    resumed: int = 0
    failed: int = 0
    last_resumed_at: float | None = None
    members: set[str] = field(default_factory=set)

    @property
    def recovery_s(self) -> float | None:
        """Seconds from the fault to the last affected request's next token."""
        return None if self.last_resumed_at is None else self.last_resumed_at - self.at


class SimIngress:
    def __init__(self, loop: EventLoop, fleet: SimFleet, routers: RouterPool,
                 namers: Mapping[str, PromptNamer], records: RecordBook, *,
                 admission_timeout_s: float, retry_pause_s: float = 0.05, max_resumes: int = 3):
        self.loop, self.fleet, self.routers, self.namers = loop, fleet, routers, namers
        self.records = records
        self.admission_timeout_s = admission_timeout_s
        self.retry_pause_s = retry_pause_s
        self.max_resumes = max_resumes
        self.flights: dict[str, _Flight] = {}
        self.disruptions: list[Disruption] = []
        self._disrupted: dict[str, Disruption] = {}
        self.missing_first_token = 0  # requests that ended "ok" with no first token seen (see `_end`)

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    def arrive(self, arrival: Arrival, model: str) -> None:
        namer = self.namers[model]
        flight = _Flight(arrival, namer.request(arrival), namer.hashes(arrival))
        self.flights[flight.request.request_id] = flight
        self._assign(flight, self.loop.now + self.admission_timeout_s)

    # routing -----------------------------------------------------------------------------

    def _assign(self, flight: _Flight, deadline: float) -> None:
        """Dispatcher.assign, then RequestStream's first call to the replica."""
        while True:
            decision = self.routers.pick(flight.routing)
            if decision.routed:
                replica = self.fleet.replicas[decision.replica_id]
                if not replica.alive:  # the view predates its death: the lookup fails
                    flight.avoid(replica.replica_id)
                    continue
                try:
                    replica.submit(flight.pending(), flight.hashes)
                except EngineOverloaded:  # full since the view: try another
                    flight.avoid(replica.replica_id)
                    continue
                except EngineError as e:
                    self._end(flight, "failed", reason=str(e))
                    return
                flight.replica_id = replica.replica_id
                return
            if decision.refusal is Refusal.TOO_LONG or self.loop.now >= deadline:
                self._end(flight, "rejected", reason=decision.reason or "")
                return
            self.loop.after(self.retry_pause_s, lambda: self._retry(flight, deadline), Priority.ARRIVAL)
            return

    def _retry(self, flight: _Flight, deadline: float) -> None:
        if flight.request.request_id in self.flights:
            self._assign(flight, deadline)

    # what replicas report -------------------------------------------------------------------

    def on_progress(self, replica: SimulatedReplica, progress: Progress) -> None:
        flights = self.flights
        for admission, at in progress.admitted:
            flight = flights.get(admission.request_id)
            if flight is not None and flight.admitted_at is None:
                flight.admitted_at, flight.cached = at, admission.num_cached_tokens
        for rid, at in progress.first_tokens:
            flight = flights.get(rid)
            if flight is None:
                continue
            if flight.first_token_at is None:
                flight.first_token_at = at
            if flight.stalled_at is not None:
                self._resumed(flight, at)
        for rid, _, at in progress.finished:
            flight = flights.get(rid)
            if flight is not None:
                self._end(flight, "ok", finished_at=at)

    def replica_lost(self, snapshots: tuple[RequestSnapshot, ...], replica_id: str,
                     died_at: float, disruption: Disruption) -> None:
        """The streams from a dead replica broke (noticed now): resume each elsewhere."""
        for snapshot in snapshots:
            flight = self.flights.get(snapshot.request.request_id)
            if flight is None:
                continue
            self._interrupt(flight, snapshot, died_at, disruption)
            flight.avoid(replica_id)
            flight.resumes += 1
            if flight.resumes > self.max_resumes:
                self._end(flight, "failed", reason=f"gave up after {self.max_resumes} resumes")
            else:
                self._assign(flight, self.loop.now + self.admission_timeout_s)

    def migrate(self, request_id: str, to_replica: str, disruption: Disruption,
                copy_s: float | None = None) -> bool:
        """Move a request to `to_replica`; False, and nothing moves, if the request or the
        destination cannot take part.

        With `copy_s` None (and always for a queued request) the move is immediate and
        naive: the stream stops on the source and the target recomputes the whole context
        while it stalls. With `copy_s`, a KV copy: the context's computed blocks as of now
        travel to the target for `copy_s` seconds while the source keeps decoding, then
        the switch (`_switch`) hands over, and the target computes only what came since.
        """
        if copy_s is None or not self._running_on_source(request_id, to_replica):
            return self._move(request_id, to_replica, disruption)
        flight = self.flights[request_id]
        source = self.fleet.replicas[flight.replica_id]
        copied = source.snapshot(request_id).block_hashes
        self.loop.at(self.loop.now + copy_s,
                     lambda: self._switch(request_id, flight.replica_id, to_replica, copied, disruption),
                     Priority.CONTROL)
        return True

    def _running_on_source(self, request_id: str, to_replica: str) -> bool:
        flight = self.flights.get(request_id)
        if flight is None or flight.replica_id is None or flight.replica_id == to_replica:
            return False
        source = self.fleet.replicas[flight.replica_id]
        return source.alive and request_id in source.held and source.core.is_running(request_id)

    def _switch(self, request_id: str, source_id: str, to_replica: str, copied: tuple[int, ...],
                disruption: Disruption) -> None:
        """A KV copy's end: the request moves if it still runs where the copy began."""
        dest = self.fleet.replicas.get(to_replica)
        flight = self.flights.get(request_id)
        if dest is None or not dest.alive:
            return
        dest.receive_blocks(copied)
        if flight is None or flight.replica_id != source_id or not self._move(request_id, to_replica, disruption):
            dest.forget_blocks(copied)

    def _move(self, request_id: str, to_replica: str, disruption: Disruption) -> bool:
        """Stop the request on its replica and resume it on `to_replica` from the tokens sent."""
        flight = self.flights.get(request_id)
        dest = self.fleet.replicas.get(to_replica)
        if flight is None or flight.replica_id is None or dest is None or not dest.alive \
                or to_replica == flight.replica_id or dest.record.state is not ReplicaState.READY:
            return False
        source = self.fleet.replicas[flight.replica_id]
        if not source.alive:  # it died: the stream is already being resumed
            return False
        source.sync()
        if request_id not in self.flights:  # it finished just now
            return False
        snapshot = source.snapshot(request_id)
        try:
            dest.submit(replace(flight.request, output_token_ids=snapshot.request.output_token_ids),
                        flight.hashes)
        except (EngineOverloaded, EngineError):
            return False
        source.abort(request_id)
        self._interrupt(flight, snapshot, self.loop.now, disruption)
        flight.migrations += 1
        flight.replica_id = to_replica
        return True

    # ends ----------------------------------------------------------------------------------

    def _interrupt(self, flight: _Flight, snapshot: RequestSnapshot, at: float,
                   disruption: Disruption) -> None:
        flight.outputs = snapshot.request.output_token_ids
        if flight.stalled_at is None:
            flight.stalled_at = at
        rid = flight.request.request_id
        if rid not in disruption.members:
            disruption.members.add(rid)
            disruption.affected += 1
        self._disrupted[rid] = disruption

    def _resumed(self, flight: _Flight, at: float) -> None:
        flight.stall_s += at - flight.stalled_at
        flight.stalled_at = None
        disruption = self._disrupted.pop(flight.request.request_id, None)
        if disruption is not None:
            disruption.resumed += 1
            disruption.last_resumed_at = max(disruption.last_resumed_at or at, at)

    def _end(self, flight: _Flight, status: str, finished_at: float | None = None,
             reason: str = "") -> None:
        rid = flight.request.request_id
        self.flights.pop(rid, None)
        disruption = self._disrupted.pop(rid, None)
        if disruption is not None and status != "ok":
            disruption.failed += 1
        a = flight.arrival
        first, ok = flight.first_token_at, status == "ok"
        n = a.output_tokens
        if ok and first is None:  # a replica reported the end but never the first token: a bug, counted
            self.missing_first_token += 1
            if self.missing_first_token == 1:
                log.warning("request %s finished without a first token; its TTFT and TPOT are not recorded", rid)
        self.records.add(
            number=a.number, arrival_s=a.time_s, prompt_tokens=a.prompt_tokens, output_tokens=n,
            cached_tokens=flight.cached, prefix_group=a.prefix_group, slo_class=a.slo_class,
            status=status,
            queue_s=flight.admitted_at - a.time_s if flight.admitted_at is not None else _NAN,
            ttft_s=first - a.time_s if first is not None else _NAN,
            tpot_s=(finished_at - first) / (n - 1) if ok and n > 1 and first is not None else _NAN,
            e2e_s=finished_at - a.time_s if ok else _NAN,
            replica=flight.replica_id or "", resumes=flight.resumes, migrations=flight.migrations,
            stall_s=flight.stall_s)
