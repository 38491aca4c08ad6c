"""The migration switch between two replicas: on the source (`ModelReplica.handoff`) a
decoding request stops right after a token its client gets, a queued one at once, and one
that finishes first is not handed off; on the target (`resume_ahead`) the request starts
before its owner asks, the owner takes that stream over, and an early start for other
tokens or that nobody claims is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from actors.engines.base import FinishReason, GenerationRequest, SamplingSpec, UnknownRequest
from actors.replica import ModelReplica
from orchestrator.config import parse_config
from orchestrator.replica_manager import spec_for

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte"}],
    # real time: a decode step sleeps the performance model's ~8 ms, so a handoff lands mid-step
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "engine_args": {"time_scale": 1.0}}],
}


@contextlib.asynccontextmanager
async def _started(replica_id: str):
    config = parse_config(CONFIG)
    replica = ModelReplica(spec_for(config, config.pools[0], replica_id))
    await replica.start()
    try:
        yield replica
    finally:
        await replica.shutdown()


@pytest.fixture
async def replica():
    async with _started("h100-0a1b2c3d") as source:
        yield source


def _request(rid: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(rid, "m", tuple(97 + i % 26 for i in range(64)),
                             SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _stream(replica: ModelReplica, request: GenerationRequest, hand_off_after: int):
    """Consume the stream, asking for a handoff once `hand_off_after` tokens arrived.
    Returns (tokens received, last delta, the handoff task)."""
    tokens: list[int] = []
    last, handoff = None, None
    async for delta in replica.generate(request):
        tokens.extend(delta.token_ids)
        last = delta
        if handoff is None and len(tokens) >= hand_off_after:
            handoff = asyncio.create_task(replica.handoff(request.request_id, "h100-target"))
    return tokens, last, handoff


async def test_a_decoding_request_stops_right_after_a_token_the_client_gets(replica):
    for attempt in range(5):  # each lands at another point of the step in flight
        tokens, last, handoff = await _stream(replica, _request(f"r{attempt}", 200), hand_off_after=3 + attempt)
        snapshot = await handoff
        assert last.finish_reason is FinishReason.ABORT and last.migrated_to == "h100-target"
        # every token the source computed reached the client: none was thrown away mid-step
        assert list(snapshot.request.output_token_ids) == tokens
        assert 3 + attempt < len(tokens) < 200


async def test_a_request_with_no_token_yet_is_stopped_at_once(replica):
    busy = [asyncio.create_task(_stream(replica, _request(f"busy{i}", 5), hand_off_after=10**6)) for i in range(2)]
    queued = _request("queued", 50)
    stream = replica.generate(queued)
    first = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)
    snapshot = await replica.handoff("queued", "h100-target")
    assert snapshot.request.output_token_ids == ()
    delta = await first
    assert delta.finish_reason is FinishReason.ABORT and delta.migrated_to == "h100-target"
    await asyncio.gather(*busy)


async def test_a_request_that_finishes_before_its_next_token_is_not_handed_off(replica):
    tokens, last, handoff = await _stream(replica, _request("short", 4), hand_off_after=3)
    with pytest.raises(UnknownRequest):
        await handoff
    assert last.finish_reason is FinishReason.LENGTH and last.migrated_to is None and len(tokens) == 4
    assert replica._moved == {} and replica._switch_after_token == {}


# --- resume ahead: the target starts the request before the stream's owner asks -----------


class _InProcessClient:
    """What the source calls on the target (`ReplicaClient.resume_ahead`), without Ray."""

    def __init__(self, replica: ModelReplica):
        self.replica = replica

    def resume_ahead(self, request: GenerationRequest) -> None:
        asyncio.get_running_loop().create_task(self.replica.resume_ahead(request))


@pytest.fixture
async def target():
    async with _started("h100-target") as started:
        yield started


async def _switch(source: ModelReplica, target: ModelReplica, request: GenerationRequest) -> list[int]:
    """Stream `request` from the source, hand it off after 3 tokens telling the target
    directly, and wait until the target has started it. The tokens the client got."""
    tokens: list[int] = []
    handoff = None
    async for delta in source.generate(request):
        tokens.extend(delta.token_ids)
        if handoff is None and len(tokens) >= 3:
            handoff = asyncio.create_task(source.handoff(request.request_id, "h100-target", _InProcessClient(target)))
    await handoff
    for _ in range(200):
        if request.request_id in target._ahead:
            break
        await asyncio.sleep(0.005)
    assert request.request_id in target._ahead
    return tokens


async def _expected(replica: ModelReplica, request: GenerationRequest) -> list[int]:
    tokens: list[int] = []
    async for delta in replica.generate(replace(request, request_id=request.request_id + "-unmoved")):
        tokens.extend(delta.token_ids)
    return tokens


async def test_the_owner_takes_over_the_stream_the_target_started_ahead(replica, target):
    request = _request("moved", 40)
    expected = await _expected(target, request)
    tokens = await _switch(replica, target, request)
    async for delta in target.generate(replace(request, output_token_ids=tuple(tokens))):
        tokens.extend(delta.token_ids)
    assert tokens == expected  # no gap, no duplicate, the same greedy tokens
    assert "moved" not in target._ahead
    stats = target.engine.stats()
    assert stats.aborted_requests == 0 and stats.finished_requests == 2  # started once, by the early start


async def test_a_claim_for_other_tokens_stops_the_early_start_and_starts_afresh(replica, target):
    request = _request("moved", 40)
    expected = await _expected(target, request)
    tokens = await _switch(replica, target, request)
    fewer = tokens[:-1]  # as if the owner had not got the last token before the switch
    async for delta in target.generate(replace(request, output_token_ids=tuple(fewer))):
        fewer.extend(delta.token_ids)
    assert fewer == expected
    assert target.engine.stats().aborted_requests == 1  # the early start, for tokens the owner lacked


async def test_an_early_start_nobody_claims_is_stopped(replica, target):
    target._ahead.ttl_s = 0.05
    await _switch(replica, target, _request("orphan", 400))
    for _ in range(200):
        if "orphan" not in target._ahead and target.engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    stats = target.engine.stats()
    assert "orphan" not in target._ahead and stats.running == 0 and stats.waiting == 0
    assert stats.aborted_requests == 1
