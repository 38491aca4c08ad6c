"""`RequestStream`: one accepted request, owned by the ingress until it ends.

It records every token the client has been sent. If the replica serving it becomes
unavailable mid-stream, it asks for another replica and resumes there from that
record (prompt + tokens sent): the client sees no gap, no duplicate and no restart.
An accepted request ends in completion or in a clear `StreamFailed`; it is never
silently dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from actors.engines.base import EngineError, EngineOverloaded, FinishReason, GenerationRequest, TokenDelta
from actors.replica_client import ReplicaUnavailable
from orchestrator.dispatcher import Dispatcher, NoCapacity
from policies.fleet_view import RoutingRequest
from policies.routing import Refusal

log = logging.getLogger(__name__)


class StreamFailed(RuntimeError):
    """The request could not be completed; the message says why."""


@dataclass(frozen=True)
class Migration:
    """One handoff of this request, as its client lived it."""

    source: str
    target: str
    stalled_since: float | None  # clock time of the last token before the switch
    downtime_s: float | None = None  # from that token to the first one from the target


class RequestStream:
    def __init__(
        self,
        request: GenerationRequest,
        routing: RoutingRequest,
        dispatcher: Dispatcher,
        *,
        max_resumes: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_migrated: Callable[[Migration], None] | None = None,
        on_recovered: Callable[[float], None] | None = None,
    ):
        self.request = request
        self.routing = routing
        self.dispatcher = dispatcher
        self.max_resumes = max_resumes
        self.clock = clock
        self.arrived_at = clock()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.replica_id: str | None = None
        self.resumes = 0  # after failures; planned migrations do not count
        self.num_cached_tokens = 0
        self.migrations: list[Migration] = []
        self.on_migrated = on_migrated
        self.on_recovered = on_recovered  # called with the stall (seconds) once a resume yields a token
        self._failed_at: float | None = None  # a replica failed under it; no token since
        self._switching: Migration | None = None  # handed off, first token from the target not yet here
        self._full: set[str] = set()  # replicas avoided because they were full when asked

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def deltas(self) -> AsyncIterator[TokenDelta]:
        """The client's stream: contiguous deltas from index 0, the last one finished."""
        handed_to: str | None = None
        while self.finish_reason is None:
            try:
                replica = await self._next_replica(handed_to)
            except NoCapacity as e:
                if not self.output_ids and e.refusal is Refusal.EXCLUDED and self.routing.exclude <= self._full:
                    # every replica it could use was passed over for being full: the fleet is busy
                    raise NoCapacity(f"every replica that could take it is full ({e.reason})", Refusal.FULL) from e
                if not self.output_ids:
                    raise  # nothing sent yet: the ingress can still answer with a status code
                raise StreamFailed(f"request {self.request_id}: no replica to resume on after "
                                   f"{len(self.output_ids)} tokens: {e.reason}") from e
            self.replica_id, handed_to = replica.replica_id, None
            try:
                async for delta in replica.generate(self._pending_request()):
                    handed_to = delta.migrated_to or handed_to
                    fresh = self._accept(delta)
                    if fresh is not None:
                        yield fresh
                    if handed_to is not None:
                        break  # handed off: resume on the target now, not once the source's stream closes
                if self.finish_reason is None and handed_to is not None:
                    self._switching = Migration(replica.replica_id, handed_to, self.last_token_at)
                elif self.finish_reason is None:
                    # the replica let go of it (drained, shut down): continue elsewhere
                    raise ReplicaUnavailable(replica.replica_id, "stream ended without finishing", dead=False)
            except EngineOverloaded:
                self._avoid(replica.replica_id)  # full since the router looked; nothing was sent
                self._full.add(replica.replica_id)
            except EngineError as e:
                if not self.output_ids:
                    raise
                raise StreamFailed(f"request {self.request_id}: replica {replica.replica_id} failed it after "
                                   f"{len(self.output_ids)} tokens: {e}") from e
            except ReplicaUnavailable as e:
                self._avoid(replica.replica_id)
                self.dispatcher.forget_replica(replica.replica_id)
                self.resumes += 1
                if self._failed_at is None:
                    self._failed_at = self.last_token_at if self.last_token_at is not None else self.arrived_at
                if self.resumes > self.max_resumes:
                    raise StreamFailed(f"gave up after {self.max_resumes} resumes; last: {e}") from e
                log.warning("request %s: %s; resuming after %d tokens", self.request_id, e, len(self.output_ids))

    async def _next_replica(self, handed_to: str | None):
        """The replica a migration handed the request to, else the router's pick."""
        if handed_to is not None:
            try:
                return self.dispatcher.replica(handed_to)
            except ReplicaUnavailable:
                log.warning("request %s: migration target %s is gone; routing instead", self.request_id, handed_to)
        replica, _ = await self.dispatcher.assign(self.routing)
        return replica

    def _pending_request(self) -> GenerationRequest:
        """The request as it stands: fresh, or resumed after the tokens already sent."""
        return replace(self.request, output_token_ids=tuple(self.output_ids))

    def _accept(self, delta: TokenDelta) -> TokenDelta | None:
        """Trim what the client already has; refuse a gap (a broken engine contract)."""
        sent = len(self.output_ids)
        if delta.index > sent:
            raise StreamFailed(f"request {self.request_id}: replica skipped tokens {sent}..{delta.index - 1}")
        overlap = sent - delta.index
        if overlap:
            delta = replace(delta, index=sent, token_ids=delta.token_ids[overlap:])
        now = self.clock()
        if delta.token_ids:
            if self._switching is not None:
                self._finish_switch(now)
            if self._failed_at is not None:
                stall, self._failed_at = now - self._failed_at, None
                if self.on_recovered is not None:
                    self.on_recovered(stall)
            self.output_ids.extend(delta.token_ids)
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finish_reason is FinishReason.ABORT:
            # Not the client's abort (that closes this stream instead): the replica let go of it.
            delta = replace(delta, finish_reason=None)
        self.finish_reason = delta.finish_reason
        return delta if (delta.token_ids or delta.text or delta.finished) else None

    def _finish_switch(self, now: float) -> None:
        """The first token after a handoff: the stall the client saw is now known."""
        switch, self._switching = self._switching, None
        stalled_since = switch.stalled_since if switch.stalled_since is not None else self.arrived_at
        done = replace(switch, downtime_s=now - stalled_since)
        self.migrations.append(done)
        if self.on_migrated is not None:
            self.on_migrated(done)

    def _avoid(self, replica_id: str) -> None:
        self.routing = replace(self.routing, exclude=self.routing.exclude | {replica_id})

    # timings, seconds ---------------------------------------------------------------

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_at is None or len(self.output_ids) < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (len(self.output_ids) - 1)
