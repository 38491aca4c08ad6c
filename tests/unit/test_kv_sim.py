"""The sim engine and the KV-cache stores: the scheduler's `prefix_loader` hook, and
`SimEngine` saving and loading through `SimKV` against an in-process stand-in store
(the real store and Ray are in tests/integration)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from actors.engines.base import EngineError, GenerationRequest, SamplingSpec, UnknownRequest
from actors.engines.sim import SimEngine
from actors.engines.sim_core import SimScheduler
from actors.kv_link import KVLinkSettings, LoadPlan
from actors.kvstore import PutResult
from actors.kvstore_block import BlockLayout, BlockRefused, describe, verify
from actors.kvstore_client import Fetched
from policies.block_hash import block_hashes
from policies.perfmodel import MODEL_PRESETS
from tests.contract.engine_contract import idle, wait_until

BS = 4
ARCH = MODEL_PRESETS["llama-2-7b"]


class FixedTimer:
    def step_time(self, batch) -> float:
        return 0.01


def scheduler(loader=None) -> SimScheduler:
    core = SimScheduler(FixedTimer(), "m", num_blocks=64, block_size=BS, max_model_len=200)
    core.prefix_loader = loader
    return core


def request(rid: str, prompt_len: int = 20, max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(rid, "m", tuple(range(10, 10 + prompt_len)), SamplingSpec(max_tokens=max_tokens))


def run(core: SimScheduler, rid: str, **kw) -> tuple[list[int], list]:
    core.add(request(rid, **kw))
    tokens, steps = [], []
    while core.has_work:
        result = core.step()
        steps.append(result)
        tokens += [t.token_id for t in result.tokens]
    return tokens, steps


def test_loaded_blocks_skip_prefill_and_cost_their_transfer_in_the_admitting_step():
    asked = []

    def loader(hashes, first, limit):
        asked.append((first, limit))
        return limit, 0.5  # every block it may, in half a simulated second

    cold_tokens, cold_steps = run(scheduler(), "q")
    core = scheduler(loader)
    tokens, steps = run(core, "q")
    assert tokens == cold_tokens  # the same deterministic output
    assert asked == [(0, 4)]  # 20 tokens: 5 full blocks, the last token's block is computed
    assert steps[0].admitted[0].num_cached_tokens == 16
    assert steps[0].shape.prefill_tokens == 4 and cold_steps[0].shape.prefill_tokens == 20
    assert steps[0].duration_s == pytest.approx(0.01 + 0.5)
    stats = core.stats(observed_at=0.0)
    assert (stats.computed_prompt_tokens, stats.loaded_prompt_tokens) == (4, 16)


def test_the_counters_split_prompt_tokens_into_computed_cached_and_loaded():
    core = scheduler(lambda hashes, first, limit: (min(limit, 2), 0.0))
    run(core, "a")  # 2 blocks loaded, 12 tokens computed
    run(core, "b")  # its own cache now holds 4 blocks: nothing left to load
    stats = core.stats(observed_at=0.0)
    assert (stats.computed_prompt_tokens, stats.cached_prompt_tokens, stats.loaded_prompt_tokens) == (16, 16, 8)


def test_a_loader_that_supplies_nothing_changes_nothing():
    cold_tokens, cold_steps = run(scheduler(), "q")
    tokens, steps = run(scheduler(lambda hashes, first, limit: (0, 0.0)), "q")
    assert tokens == cold_tokens and [s.duration_s for s in steps] == [s.duration_s for s in cold_steps]


# ---- SimEngine with a stand-in store ------------------------------------------------

@dataclass
class MemoryStore:
    """Holds blocks like a KV store, in this process; can be told to corrupt them."""

    node_id: str
    blocks: dict[int, tuple] = field(default_factory=dict)
    corrupt: bool = False

    @property
    def store_id(self) -> str:
        return f"kvstore-{self.node_id}"

    def put_blocks(self, layout: BlockLayout, blocks, *, with_checksum: bool, wait_s=5.0) -> PutResult:
        for h, data in blocks:
            self.blocks[h] = (describe(h, layout, data, with_checksum), np.array(data))
        return PutResult(tuple(h for h, _ in blocks), ())

    def fetch(self, layout: BlockLayout, hashes, *, verify_checksum: bool, timeout_s: float = 10.0) -> Fetched:
        out = []
        for h in hashes:
            if h not in self.blocks:
                break
            meta, data = self.blocks[h]
            data = data.copy()
            if self.corrupt:
                data[0] ^= 0xFF
            try:
                out.append(verify(meta, data, layout, verify_checksum))
            except BlockRefused as e:
                return Fetched(tuple(out), 0.0, str(e))
        return Fetched(tuple(out), 0.0)

    def leading(self, hashes) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n


@dataclass
class FakeLink:
    """`KVLink` over `MemoryStore`s: one per node, this replica on `node_id`."""

    node_id: str
    stores: dict[str, MemoryStore]
    settings: KVLinkSettings = field(default_factory=lambda: KVLinkSettings("test", kv_bytes_scale=1 / 4096,
                                                                             min_load_tokens=0))

    def local(self):
        return self.stores.get(self.node_id)

    def store(self, node_id):
        return self.stores.get(node_id)

    def forget(self, node_id):
        """A real link drops its cached handle to a dead store; these stores are plain dicts."""

    async def plan(self, model_id, hashes) -> LoadPlan:
        local = self.stores[self.node_id].leading(hashes) if self.node_id in self.stores else 0
        best = max(self.stores.values(), key=lambda s: (s.leading(hashes), s.node_id == self.node_id))
        n = best.leading(hashes)
        return LoadPlan(local, best.node_id if n else None, n, best.node_id == self.node_id)


async def engine_on(link: FakeLink) -> SimEngine:
    engine = SimEngine("m", "H100", ARCH, num_blocks=256, max_model_len=1024, time_scale=0.0)
    engine.attach_kv_store(link)
    await engine.start()
    return engine


def prompt_request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, "m", tuple(range(40, 40 + 200)), SamplingSpec(max_tokens=4, temperature=0.0))


async def generate(engine: SimEngine, req: GenerationRequest) -> list[int]:
    return [t for d in [d async for d in engine.generate(req)] for t in d.token_ids]


async def test_a_prefix_computed_on_one_node_is_loaded_on_another_with_the_same_output():
    stores = {"n1": MemoryStore("n1"), "n2": MemoryStore("n2")}
    a, b = await engine_on(FakeLink("n1", stores)), await engine_on(FakeLink("n2", stores))
    first = await generate(a, prompt_request("q1"))
    await wait_until(a, lambda s: len(stores["n1"].blocks) == 12, "saved")  # 200 tokens: 12 blocks of 16
    second = await generate(b, prompt_request("q2"))
    assert second == first
    sa, sb = a.stats(), b.stats()
    assert (sa.computed_prompt_tokens, sa.loaded_prompt_tokens) == (200, 0)
    assert (sb.computed_prompt_tokens, sb.loaded_prompt_tokens) == (8, 192)
    await wait_until(b, lambda s: len(stores["n2"].blocks) == 12, "the loaded blocks saved on its own node")
    for engine in (a, b):
        await engine.shutdown()


async def test_a_context_shorter_than_min_load_tokens_never_waits_on_the_stores():
    stores = {"n1": MemoryStore("n1"), "n2": MemoryStore("n2")}
    a = await engine_on(FakeLink("n1", stores))
    first = await generate(a, prompt_request("q1"))
    await wait_until(a, lambda s: len(stores["n1"].blocks) == 12, "saved")  # saving is not skipped
    link = FakeLink("n2", stores, KVLinkSettings("test", kv_bytes_scale=1 / 4096, min_load_tokens=256))
    b = await engine_on(link)
    assert await generate(b, prompt_request("q2")) == first
    assert (b.stats().computed_prompt_tokens, b.stats().loaded_prompt_tokens) == (200, 0)
    for engine in (a, b):
        await engine.shutdown()


async def test_corrupt_blocks_are_recomputed_never_used():
    stores = {"n1": MemoryStore("n1")}
    a = await engine_on(FakeLink("n1", stores))
    first = await generate(a, prompt_request("q1"))
    await wait_until(a, lambda s: len(stores["n1"].blocks) == 12, "saved")
    stores["n1"].corrupt = True
    b = await engine_on(FakeLink("n1", stores))
    assert await generate(b, prompt_request("q2")) == first
    assert (b.stats().computed_prompt_tokens, b.stats().loaded_prompt_tokens) == (200, 0)
    for engine in (a, b):
        await engine.shutdown()


async def test_export_saves_a_running_requests_blocks_and_needs_a_store():
    stores = {"n1": MemoryStore("n1")}
    engine = await engine_on(FakeLink("n1", stores))
    with pytest.raises(UnknownRequest):
        await engine.export_kv("nobody")
    req = GenerationRequest("q", "m", tuple(range(40, 240)), SamplingSpec(max_tokens=400, temperature=0.0))
    stream = engine.generate(req)
    await anext(stream)
    held = await engine.export_kv("q")
    # the request may finish at time scale 0, so its hashes come from the prompt, not a snapshot
    prompt_blocks = block_hashes(req.prompt_token_ids, engine.core.blocks.block_size, "m")
    assert len(held) >= len(prompt_blocks) == 12 and held[:12] == prompt_blocks
    assert set(held) <= set(stores["n1"].blocks)
    await stream.aclose()
    await wait_until(engine, idle, "idle")
    await engine.shutdown()
    bare = SimEngine("m", "H100", ARCH, num_blocks=256, max_model_len=1024, time_scale=0.0)
    with pytest.raises(EngineError, match="no KV-cache store"):
        await bare.export_kv("q")
