"""Lazy checkpoints: which requests are due, what a round does, and that a resume after
a checkpoint loads the request's output blocks instead of recomputing them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from actors.engines.base import EngineError, GenerationRequest, SamplingSpec, UnknownRequest
from actors.engines.sim import SimEngine
from actors.kv_checkpoint import CheckpointSettings, KVCheckpointer, due
from policies.block_hash import block_hashes
from policies.fleet_view import RequestStatus
from tests.unit.test_kv_sim import ARCH, FakeLink, MemoryStore


def status(rid: str, prompt: int, output: int, running: bool = True) -> RequestStatus:
    return RequestStatus(request_id=rid, priority=0, slo_class="batch", prompt_tokens=prompt,
                         output_tokens=output, max_tokens=4096, running=running, arrived_at=0.0)


def test_due_are_running_requests_grown_enough_longest_growth_first():
    requests = [status("a", 100, 300), status("b", 1000, 50), status("c", 10, 10),
                status("queued", 2000, 0, running=False)]
    assert due(requests, {}, 256) == ["b", "a"]
    assert due(requests, {"b": 1000}, 256) == ["a"]  # b grew 50 since its last save
    with pytest.raises(ValueError, match="interval_s"):
        CheckpointSettings(interval_s=-1)


async def test_a_round_saves_what_is_due_and_survives_ended_and_failing_requests():
    live = {"a": status("a", 0, 300), "gone": status("gone", 0, 300), "full": status("full", 0, 300)}
    exported = []

    async def export(rid):
        if rid == "gone":
            raise UnknownRequest(rid)
        if rid == "full":
            raise EngineError("store_full", "no room")
        exported.append(rid)
        return ()

    cp = KVCheckpointer(CheckpointSettings(min_new_tokens=100), lambda: live.values(), export)
    assert await cp.round() == 1 and exported == ["a"]
    assert (cp.checkpoints, cp.failures) == (1, 1)
    assert await cp.round() == 0  # nothing grew
    live["a"] = replace(live["a"], output_tokens=450)
    assert await cp.round() == 1 and exported == ["a", "a"]


async def test_a_resume_after_a_checkpoint_loads_the_output_blocks():
    stores = {"n1": MemoryStore("n1")}
    first = SimEngine("m", "H100", ARCH, num_blocks=256, max_model_len=1024, time_scale=0.0)
    first.attach_kv_store(FakeLink("n1", stores))
    await first.start()
    prompt = tuple(range(40, 240))  # 12 full blocks of 16
    request = GenerationRequest("q", "m", prompt, SamplingSpec(max_tokens=300, temperature=0.0, ignore_eos=True))
    sent = []
    stream = first.generate(request)
    cp = KVCheckpointer(CheckpointSettings(min_new_tokens=64), lambda: first.stats().requests, first.export_kv)
    async for delta in stream:
        sent += delta.token_ids
        if len(sent) >= 120:
            assert await cp.round() == 1  # mid-stream, as the timer would
            break
    await stream.aclose()
    await first.shutdown()
    block = first.core.blocks.block_size
    held = set(stores["n1"].blocks)
    saved_context = block_hashes(prompt + tuple(sent[:100]), block, "m")
    assert set(saved_context) <= held and len(saved_context) > len(block_hashes(prompt, block, "m"))

    # the replica died; another resumes the request from what the client was sent
    second = SimEngine("m", "H100", ARCH, num_blocks=256, max_model_len=1024, time_scale=0.0)
    second.attach_kv_store(FakeLink("n1", stores))
    await second.start()
    resumed = replace(request, output_token_ids=tuple(sent))
    rest = [t async for d in second.generate(resumed) for t in d.token_ids]
    stats = second.stats()
    await second.shutdown()
    assert len(sent) + len(rest) == 300
    assert stats.loaded_prompt_tokens >= len(saved_context) * block  # output blocks loaded, not recomputed
