"""SimEngine: the engine contract, plus what only the simulated engine promises
(step times from the performance model, readable deterministic text, KV sizing)."""

from __future__ import annotations

import asyncio

import pytest

from actors.engines.base import (
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
)
from actors.engines.sim import SimEngine
from actors.tokenizers import ByteTokenizer
from policies.perfmodel import MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec
from tests.contract.engine_contract import EngineContract, assert_well_formed, idle, wait_until

ARCH = MODEL_PRESETS["llama-2-7b"]
MODEL = "sim-llama"


def make_engine(**kw) -> SimEngine:
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("time_scale", 0.01)
    return SimEngine(MODEL, "H100", ARCH, **kw)


@pytest.fixture
async def sim():
    engine = make_engine()
    await engine.start()
    yield engine
    await engine.shutdown()


class TestSimEngineContract(EngineContract):
    model_name = MODEL
    max_model_len = 1024

    @pytest.fixture
    async def engine(self):
        engine = make_engine()
        await engine.start()
        yield engine
        await engine.shutdown()


def request(rid: str, prompt: str = "the quick brown fox", max_tokens: int = 16, **sampling):
    ids = tuple(ByteTokenizer().encode(prompt))
    return GenerationRequest(rid, MODEL, ids, SamplingSpec(max_tokens=max_tokens, **sampling))


async def collect(engine: SimEngine, req: GenerationRequest):
    return [d async for d in engine.generate(req)]


async def test_text_is_readable_and_matches_the_tokens(sim):
    deltas = await collect(sim, request("a", max_tokens=40))
    tokens = assert_well_formed(deltas)
    text = "".join(d.text for d in deltas)
    assert text == ByteTokenizer().decode(tokens)
    assert len(text) == 40 and text.replace(" ", "").isalpha()


async def test_stop_strings_end_the_stream_with_stop_and_are_not_sent(sim):
    full = "".join(d.text for d in await collect(sim, request("a", max_tokens=60)))
    stop = full[20:23]
    cut = full.find(stop)
    deltas = await collect(sim, request("b", max_tokens=60, stop=(stop,)))
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert "".join(d.text for d in deltas) == full[:cut]
    assert len(assert_well_formed(deltas)) == cut + len(stop)  # up to the completing token
    stats = await wait_until(sim, idle, "stopped request freed")
    assert (stats.finished_requests, stats.aborted_requests) == (2, 0)


async def test_a_slow_consumer_gets_coalesced_deltas_with_exact_indices(sim):
    req = request("a", max_tokens=50)
    stream = sim.generate(req)
    first = await stream.__anext__()
    while len(sim.snapshot("a").request.output_token_ids) < len(first.token_ids) + 5:
        await asyncio.sleep(0.001)  # let the engine run ahead of this consumer
    second = await stream.__anext__()
    assert second.index == first.index + len(first.token_ids)
    assert len(second.token_ids) >= 5
    rest = [first, second] + [d async for d in stream]
    assert len(assert_well_formed(rest)) == 50


async def test_each_step_sleeps_its_modelled_duration_times_time_scale():
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    engine = make_engine(time_scale=0.5, sleep=fake_sleep)
    await engine.start()
    await collect(engine, request("a", prompt="x" * 100, max_tokens=3))
    await engine.shutdown()
    model = StepTimeModel(gpu_spec("H100"), ARCH)
    prefill = BatchShape(prefill_tokens=100, prefill_attention_pairs=5050, prefill_seqs=1)
    decodes = [BatchShape(decode_seqs=1, decode_context_tokens=n) for n in (101, 102)]
    assert slept == [0.5 * model.step_time(s) for s in [prefill, *decodes]]


async def test_a_full_waiting_queue_refuses_new_requests():
    engine = make_engine(max_waiting=2)
    await engine.start()
    streams = [engine.generate(request("a")), engine.generate(request("b"))]
    with pytest.raises(EngineOverloaded):
        engine.generate(request("c"))
    for s in streams:
        assert_well_formed([d async for d in s])
    await engine.shutdown()


async def test_kv_pressure_preempts_but_every_stream_stays_exact():
    async def run(engine: SimEngine) -> list[list[int]]:
        await engine.start()
        reqs = [request(f"r{i}", prompt=f"prompt {i} " * 4, max_tokens=120) for i in range(6)]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        assert idle(engine.stats())
        await engine.shutdown()
        return [assert_well_formed(deltas) for deltas in results]

    roomy = await run(make_engine())
    tight = await run(make_engine(num_blocks=40, max_model_len=256))  # 6 x 160 tokens > 640
    assert tight == roomy


@pytest.mark.parametrize(
    "req, problem",
    [
        (GenerationRequest("a", MODEL, (65, 300), SamplingSpec(max_tokens=2)), "outside the vocab"),
        (request("a", stop=("",)), "stop strings must not be empty"),
        (request("a", max_tokens=0), "nothing to generate"),
    ],
)
async def test_bad_requests_are_refused_at_once(sim, req, problem):
    with pytest.raises(EngineError, match=problem) as info:
        sim.generate(req)
    assert info.value.code == "bad_request"


async def test_generate_needs_a_started_engine_and_shutdown_fails_open_streams():
    engine = make_engine()
    with pytest.raises(EngineError, match="not started"):
        engine.generate(request("a"))
    await engine.start()
    stream = engine.generate(request("a", max_tokens=500))
    await stream.__anext__()
    await engine.shutdown()
    with pytest.raises(EngineError, match="shut down") as info:
        await stream.__anext__()
    assert info.value.code == "shutdown"


async def test_a_request_aborted_before_its_first_step_leaves_the_loop_serving(sim):
    stream = sim.generate(request("gone"))
    assert await sim.abort("gone")
    assert [d.finish_reason for d in [d async for d in stream]] == [FinishReason.ABORT]
    await asyncio.sleep(0)  # the step loop wakes to find nothing to do
    assert_well_formed(await collect(sim, request("next")))


def test_kv_blocks_default_to_the_performance_model_capacity():
    capacity = StepTimeModel(gpu_spec("H100"), ARCH).kv_capacity_tokens() // 16
    assert SimEngine(MODEL, "H100", ARCH).stats().kv_blocks_total == capacity
    scaled = SimEngine(MODEL, "H100", ARCH, kv_scale=0.25).stats().kv_blocks_total
    assert scaled == int(capacity * 0.25)
    with pytest.raises(ValueError, match="kv_scale"):
        SimEngine(MODEL, "H100", ARCH, kv_scale=1.5)


async def test_stats_report_simulated_throughput(sim):
    await collect(sim, request("a", max_tokens=30))
    stats = sim.stats()
    assert stats.tokens_per_s > 0
    assert stats.batch_size == 1
    assert stats.finished_requests == 1
