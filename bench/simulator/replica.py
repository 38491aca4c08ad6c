"""`SimulatedReplica`: one model replica in virtual time.

It holds the very scheduler a live sim replica runs (`actors.engines.make_engine(spec)
.core`, built from the same `ReplicaSpec`), switched to virtual time, and the
controller's `ReplicaRecord` of it. The scheduler's clock is the simulation's clock:
a replica created at t starts idle at t. Between interactions the replica sleeps
until the scheduler's next visible change (`SimScheduler.next_change_s`); whatever
touches it (a request, an abort, a stats poll, a fault) first brings the scheduler
up to now (`sync`), then acts, then lets it plan again.

What its steps did goes to `on_progress(replica, progress)`, in virtual seconds. Its
GPUs' power setting and draw live in `power` (a `PowerState`, read and set through a
`SimPowerBackend` as the live replica's are); `timer` times its steps under that setting
and records what they drew (`bench.simulator.power`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from actors.engines.base import EngineStats, GenerationRequest, RequestSnapshot, RequestStatus
from actors.engines.sim_core import Progress, SimScheduler
from actors.power import ActionOutcome, PowerReading, SimPowerBackend, apply_action
from bench.simulator.events import Event, EventLoop, Priority
from bench.simulator.power import ReplicaPowerTimer
from orchestrator.fleet_state import ReplicaRecord
from policies.power_snapshot import PowerAction


class SimulatedReplica:
    """A replica's scheduler stepped by events. Times are virtual seconds."""

    def __init__(self, record: ReplicaRecord, core: SimScheduler, loop: EventLoop,
                 on_progress: Callable[[SimulatedReplica, Progress], None], timer: ReplicaPowerTimer):
        self.record = record
        self.core = core
        self.loop = loop
        self.timer = timer
        self.power = timer.state
        self._backend = SimPowerBackend(timer.state, clock=lambda: loop.now)
        self._on_progress = on_progress
        self._wake: Event | None = None
        self.held: dict[str, float] = {}  # request id -> when it was submitted here
        self._copied: set[int] = set()  # KV blocks a migration copied here, not yet admitted
        self.created_at = loop.now
        self.ended_at: float | None = None
        self.busy_s = 0.0  # time spent in steps
        self.steps = 0
        self.tokens = 0
        self.preemptions = 0
        if loop.now > 0:
            core.idle(loop.now)  # the scheduler's clock is the simulation's

    @property
    def replica_id(self) -> str:
        return self.record.replica_id

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    def submit(self, request: GenerationRequest, prompt_hashes: Sequence[int]) -> None:
        """Queue `request` now. Raises what `SimScheduler.add` raises (`EngineOverloaded`
        when the waiting queue is full, `EngineError` for a request it cannot serve)."""
        assert self.alive, f"submit to ended replica {self.replica_id}"
        self.sync()
        self.core.add(request, prompt_hashes)
        self.held[request.request_id] = self.loop.now
        self._changed()

    def receive_blocks(self, hashes: Sequence[int]) -> None:
        """KV blocks copied here ahead of a migration's switch: the admission of the moved
        request loads them rather than computing them (`SimScheduler.prefix_loader`)."""
        if self.core.prefix_loader is None:
            self.core.prefix_loader = self._load_copied
        self._copied.update(hashes)

    def forget_blocks(self, hashes: Sequence[int]) -> None:
        """Copied blocks no admission will claim (the migration did not switch)."""
        self._copied.difference_update(hashes)

    def _load_copied(self, hashes: Sequence[int], first: int, limit: int) -> tuple[int, float]:
        """(n, 0.0): the copied blocks from `first` on; their copy overlapped the source's
        decoding before the switch, so loading them adds no time to the step."""
        n = 0
        while n < limit and hashes[first + n] in self._copied:
            n += 1
        self._copied.difference_update(hashes[first:first + n])
        return n, 0.0

    def abort(self, request_id: str) -> bool:
        """Drop a request held here (False if it is not here)."""
        self.sync()
        self.held.pop(request_id, None)
        dropped = self.core.abort(request_id)
        self._changed()
        return dropped

    def snapshot(self, request_id: str) -> RequestSnapshot:
        self.sync()
        return self.core.snapshot(request_id)

    def stats(self, cached_hashes: bool, with_requests: bool) -> EngineStats:
        """What the replica reports to the controller's poll now."""
        self.sync()
        stats = self.core.stats(self.loop.now, cached_hashes)
        if not with_requests:
            return stats
        return replace(stats, requests=tuple(self._status(rid, at) for rid, at in self.held.items()))

    def read_power(self) -> tuple[PowerReading, ...]:
        """Each GPU's draw (over the last window of the clock), limit and clock now."""
        self.sync()
        return tuple(self._backend.read(gpu) for gpu in self._backend.gpus())

    def apply_power(self, action: PowerAction) -> ActionOutcome:
        """Carry out a power action on every GPU now; steps after the one in flight run
        under the new setting (a decode run planned under the old one is dropped)."""
        self.sync()
        outcome = apply_action(self._backend, self._backend.gpus(), action)
        if outcome.ok:
            self.core.replan()
            self._kick()
        return outcome

    def end(self) -> tuple[RequestSnapshot, ...]:
        """Stop stepping (death or shutdown) now; returns what it held, as the ingress
        would find each stream: the tokens of completed steps, none of the one in flight."""
        self.sync()
        snapshots = tuple(self.core.snapshot(rid) for rid in self.held)
        for rid in self.held:
            self.core.abort(rid)
        self.held.clear()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self.ended_at = self.loop.now
        return snapshots

    def sync(self) -> None:
        """Bring the scheduler up to now and report what its steps did."""
        if not self.alive:
            return
        progress = self.core.advance(self.loop.now)
        self.timer.account(progress, working=self.core.has_work, now=self.loop.now)
        if progress.steps == 0:
            return
        self.busy_s += progress.busy_s
        self.steps += progress.steps
        self.tokens += progress.tokens
        self.preemptions += len(progress.preempted)
        for rid, _, _ in progress.finished:
            self.held.pop(rid, None)
        self._on_progress(self, progress)

    def _changed(self) -> None:
        """Its queue changed now. With a step in flight nothing starts before that step
        ends, so wake then (a decode run the change cut short ends there); idle, start a
        step once every event of this instant has landed."""
        if not self.core.stepping:
            self._kick()
            return
        when = self.core.next_change_s()
        if self._wake is not None:
            if self._wake.time == when:
                return
            self._wake.cancel()
        self._wake = self.loop.at(when, self._on_wake, Priority.REPLICA)

    def _kick(self) -> None:
        """Plan again once every event of this instant has landed (REPLICA priority)."""
        if self._wake is not None:
            if self._wake.time == self.loop.now:
                return
            self._wake.cancel()
        self._wake = self.loop.at(self.loop.now, self._on_wake, Priority.REPLICA)

    def _on_wake(self) -> None:
        self._wake = None
        self.sync()
        if self.alive:
            when = self.core.next_change_s()
            if when is not None:
                self._wake = self.loop.at(when, self._on_wake, Priority.REPLICA)

    def _status(self, request_id: str, arrived_at: float) -> RequestStatus:
        snapshot = self.core.snapshot(request_id)
        request = snapshot.request
        return RequestStatus(request_id=request_id, priority=request.priority,
                             slo_class=request.slo_class, prompt_tokens=len(request.prompt_token_ids),
                             output_tokens=len(request.output_token_ids),
                             max_tokens=request.sampling.max_tokens,
                             running=self.core.is_running(request_id), arrived_at=arrived_at)
