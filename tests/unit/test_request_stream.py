"""The ingress-owned stream: contiguous, no duplicates, resumed elsewhere when a replica goes away."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from actors.engines.base import EngineOverloaded, FinishReason, GenerationRequest, SamplingSpec, TokenDelta
from actors.replica_client import ReplicaUnavailable
from orchestrator.dispatcher import NoCapacity
from orchestrator.request_stream import RequestStream, StreamFailed
from policies.fleet_view import RoutingRequest
from policies.routing import Refusal, RoutingDecision

TOKENS = list(range(100, 120))  # what a deterministic engine emits for the test prompt


@dataclass
class ScriptedReplica:
    """Emits TOKENS from where the request stands; may fail after `fail_after` tokens."""

    replica_id: str
    fail_after: int | None = None
    overloaded: bool = False
    end_with: FinishReason | None = None  # an early end (ABORT) instead of finishing
    migrate_to: str | None = None  # with end_with=ABORT: a handoff to this replica
    replay: int = 0  # re-send this many already-sent tokens first (an engine bug we tolerate)
    skip: int = 0  # skip this many tokens (an engine bug we refuse)
    seen: list[GenerationRequest] = field(default_factory=list)

    async def generate(self, request: GenerationRequest):
        self.seen.append(request)
        if self.overloaded:
            raise EngineOverloaded()
        start = len(request.output_token_ids) - self.replay + self.skip
        end = min(len(TOKENS), request.sampling.max_tokens)
        for i in range(start, end):
            if self.fail_after is not None and i >= self.fail_after:
                raise ReplicaUnavailable(self.replica_id, "actor died", dead=True)
            if self.end_with is not None and i == start + 2:
                yield TokenDelta(request.request_id, i, (), "", finish_reason=self.end_with,
                                 migrated_to=self.migrate_to)
                return
            last = i == end - 1
            yield TokenDelta(request.request_id, i, (TOKENS[i],), f"<{TOKENS[i]}>",
                             finish_reason=FinishReason.LENGTH if last else None)


class ScriptedDispatcher:
    def __init__(self, *replicas: ScriptedReplica):
        self.replicas = {r.replica_id: r for r in replicas}
        self.assigned: list[str] = []
        self.forgotten: list[str] = []

    async def assign(self, routing: RoutingRequest):
        replica = next(r for rid, r in self.replicas.items() if rid not in routing.exclude)
        self.assigned.append(replica.replica_id)
        return replica, RoutingDecision(routing.request_id, 1, replica.replica_id)

    def replica(self, replica_id: str):
        return self.replicas[replica_id]

    def forget_replica(self, replica_id: str) -> None:
        self.forgotten.append(replica_id)


def stream_over(dispatcher, max_tokens: int = 10, max_resumes: int = 3) -> RequestStream:
    request = GenerationRequest("r1", "m", (1, 2, 3), SamplingSpec(max_tokens=max_tokens, temperature=0))
    return RequestStream(request, RoutingRequest("r1", "m", 3, max_tokens), dispatcher, max_resumes=max_resumes)


async def collect(stream: RequestStream) -> list[TokenDelta]:
    return [d async for d in stream.deltas()]


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_a_plain_stream_is_contiguous_and_finishes_once():
    stream = stream_over(ScriptedDispatcher(ScriptedReplica("a")))
    deltas = await collect(stream)
    assert tokens_of(deltas) == TOKENS[:10]
    assert [d.index for d in deltas] == list(range(10))
    assert [d.finish_reason for d in deltas].count(FinishReason.LENGTH) == 1 and deltas[-1].finished
    assert stream.ttft_s is not None and stream.tpot_s is not None


async def test_a_replica_dying_mid_stream_is_resumed_elsewhere_without_gap_or_duplicate():
    a, b = ScriptedReplica("a", fail_after=4), ScriptedReplica("b")
    dispatcher = ScriptedDispatcher(a, b)
    stream = stream_over(dispatcher)
    stalls = []
    stream.on_recovered = stalls.append
    deltas = await collect(stream)
    assert len(stalls) == 1 and stalls[0] >= 0  # the client's stall, reported once
    assert tokens_of(deltas) == TOKENS[:10]
    assert dispatcher.assigned == ["a", "b"] and dispatcher.forgotten == ["a"]
    resumed = b.seen[0]
    assert resumed.output_token_ids == tuple(TOKENS[:4]) and resumed.prompt_token_ids == (1, 2, 3)
    assert stream.resumes == 1


async def test_a_replica_that_lets_go_of_a_request_is_resumed_elsewhere():
    a, b = ScriptedReplica("a", end_with=FinishReason.ABORT), ScriptedReplica("b")
    deltas = await collect(stream_over(ScriptedDispatcher(a, b)))
    assert tokens_of(deltas) == TOKENS[:10]
    assert all(d.finish_reason is not FinishReason.ABORT for d in deltas)


async def test_replayed_tokens_are_trimmed():
    a, b = ScriptedReplica("a", fail_after=5), ScriptedReplica("b", replay=2)
    deltas = await collect(stream_over(ScriptedDispatcher(a, b)))
    assert tokens_of(deltas) == TOKENS[:10]


async def test_a_gap_is_refused_not_shown():
    a, b = ScriptedReplica("a", fail_after=5), ScriptedReplica("b", skip=1)
    with pytest.raises(StreamFailed, match="skipped tokens"):
        await collect(stream_over(ScriptedDispatcher(a, b)))


async def test_an_overloaded_replica_is_avoided_before_anything_is_sent():
    full, free = ScriptedReplica("full", overloaded=True), ScriptedReplica("free")
    dispatcher = ScriptedDispatcher(full, free)
    stream = stream_over(dispatcher)
    assert tokens_of(await collect(stream)) == TOKENS[:10]
    assert dispatcher.assigned == ["full", "free"] and stream.resumes == 0


async def test_resumes_are_bounded_and_then_the_client_gets_a_clear_error():
    dying = [ScriptedReplica(f"r{i}", fail_after=i + 1) for i in range(5)]
    stream = stream_over(ScriptedDispatcher(*dying), max_resumes=2)
    with pytest.raises(StreamFailed, match="gave up after 2 resumes"):
        await collect(stream)
    assert stream.output_ids == TOKENS[:3]  # everything sent before giving up was contiguous


async def test_a_handoff_resumes_on_the_named_target_and_records_the_stall():
    source = ScriptedReplica("a", end_with=FinishReason.ABORT, migrate_to="c")
    dispatcher = ScriptedDispatcher(source, ScriptedReplica("b"), ScriptedReplica("c"))
    moves = []
    stream = stream_over(dispatcher)
    stream.on_migrated = moves.append
    deltas = await collect(stream)
    assert tokens_of(deltas) == TOKENS[:10]
    assert dispatcher.assigned == ["a"]  # the target came from the handoff, not the router
    assert dispatcher.replicas["c"].seen[0].output_token_ids == tuple(TOKENS[:2])
    assert stream.resumes == 0 and [(m.source, m.target) for m in stream.migrations] == [("a", "c")]
    assert moves == stream.migrations and moves[0].downtime_s >= 0


class DrainedDispatcher(ScriptedDispatcher):
    """Like ScriptedDispatcher, but says so (as the real one does) when no replica is left."""

    async def assign(self, routing: RoutingRequest):
        if all(rid in routing.exclude for rid in self.replicas):
            raise NoCapacity("no ready replica of model m", None)
        return await super().assign(routing)


async def test_no_replica_to_resume_on_is_a_clear_error_once_tokens_were_sent():
    stream = stream_over(DrainedDispatcher(ScriptedReplica("a", fail_after=4)))
    with pytest.raises(StreamFailed, match="no replica to resume on after 4 tokens"):
        await collect(stream)


async def test_no_replica_before_the_first_token_stays_an_admission_refusal():
    stream = stream_over(DrainedDispatcher(ScriptedReplica("a", fail_after=0)))
    with pytest.raises(NoCapacity):  # the ingress can still answer 503 with Retry-After
        await collect(stream)


class ExcludingDispatcher(ScriptedDispatcher):
    """Refuses as the router does once every replica is excluded: EXCLUDED."""

    async def assign(self, routing: RoutingRequest):
        if all(rid in routing.exclude for rid in self.replicas):
            raise NoCapacity("every accepting replica of model 'm' is excluded", Refusal.EXCLUDED)
        return await super().assign(routing)


async def test_a_request_every_replica_turned_away_as_full_is_refused_as_busy():
    stream = stream_over(ExcludingDispatcher(ScriptedReplica("a", overloaded=True),
                                             ScriptedReplica("b", overloaded=True)))
    with pytest.raises(NoCapacity) as refused:
        await collect(stream)
    assert refused.value.refusal is Refusal.FULL  # the ingress answers 429 fleet_busy, not 503
    assert "every replica that could take it is full" in refused.value.reason


async def test_a_request_excluded_for_another_reason_keeps_the_routers_refusal():
    stream = stream_over(ExcludingDispatcher(ScriptedReplica("a", overloaded=True), ScriptedReplica("b", fail_after=0)))
    with pytest.raises(NoCapacity) as refused:
        await collect(stream)
    assert refused.value.refusal is Refusal.EXCLUDED  # b went away: not (only) a full fleet
