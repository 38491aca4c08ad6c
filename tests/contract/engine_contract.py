"""The engine contract: one suite that every engine (`sim`, `vllm`) passes.

Subclass `EngineContract` in a `test_*.py` file, set `model_name` (the name requests
carry and block hashes are keyed by) and `max_model_len`, and define an `engine`
fixture that yields a started engine (any scope) and shuts it down:

    class TestMyEngineContract(EngineContract):
        model_name = "my-model"
        max_model_len = 512

        @pytest.fixture
        async def engine(self):
            engine = MyEngine(...)
            await engine.start()
            yield engine
            await engine.shutdown()

The suite assumes nothing about token values: prompts are ids in [10, 250) (override
`prompt_ids` for a smaller vocabulary) and requests set `ignore_eos`, so every stream
runs to `max_tokens`. Conditions that an engine reaches asynchronously (KV freed after
an abort) are awaited with `wait_until`, never slept on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest

from actors.engines.base import (
    Engine,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
    TokenDelta,
    UnknownRequest,
)
from policies.block_hash import block_hashes

TIMEOUT_S = 120.0  # generous for real vLLM on a shared CPU; a passing test never waits this long
_ids = itertools.count()


async def wait_until(engine: Engine, condition: Callable[[EngineStats], bool],
                     what: str) -> EngineStats:
    """Poll `engine.stats()` until `condition` holds; fail naming `what` after TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while True:
        stats = engine.stats()
        if condition(stats):
            return stats
        if loop.time() > deadline:
            raise AssertionError(f"engine never reached: {what}; last stats {stats}")
        await asyncio.sleep(0.01)


def idle(stats: EngineStats) -> bool:
    """Nothing running or waiting and no KV block held by a request."""
    return stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


def assert_well_formed(deltas: list[TokenDelta], first_index: int = 0) -> list[int]:
    """Exactly one finish reason, on the last delta; indices contiguous from
    `first_index`. Returns the token ids."""
    assert deltas, "the stream ended without a delta"
    assert [d.finish_reason is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    tokens: list[int] = []
    for d in deltas:
        assert d.index == first_index + len(tokens), f"gap or duplicate at {d.index}"
        tokens.extend(d.token_ids)
    return tokens


class EngineContract:
    """The behaviour every engine owes its replica. See the module docstring."""

    model_name: str
    max_model_len: int

    @pytest.fixture
    async def engine(self) -> AsyncIterator[Engine]:
        raise NotImplementedError(f"{type(self).__name__} must define an `engine` fixture")

    @pytest.fixture(autouse=True)
    async def _leaves_engine_idle(self, engine):
        yield
        await wait_until(engine, idle, "idle after the test")

    # ---- helpers -------------------------------------------------------------------

    def prompt_ids(self, n: int, salt: int = 0) -> tuple[int, ...]:
        """A prompt of `n` valid token ids; different `salt`, different prompt."""
        return tuple(10 + (salt * 37 + i * 13) % 240 for i in range(n))

    def request(self, prompt: tuple[int, ...], max_tokens: int, outputs: tuple[int, ...] = (),
                **sampling) -> GenerationRequest:
        spec = SamplingSpec(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0),
                            ignore_eos=True, **sampling)
        return GenerationRequest(f"contract-{next(_ids)}", self.model_name, prompt, spec,
                                 output_token_ids=outputs)

    async def collect(self, engine: Engine, request: GenerationRequest) -> list[TokenDelta]:
        async def run() -> list[TokenDelta]:
            return [d async for d in engine.generate(request)]
        return await asyncio.wait_for(run(), TIMEOUT_S)

    async def generated(self, engine: Engine, prompt: tuple[int, ...],
                        max_tokens: int) -> list[int]:
        deltas = await self.collect(engine, self.request(prompt, max_tokens))
        return assert_well_formed(deltas)

    # ---- streams -------------------------------------------------------------------

    async def test_stream_is_well_formed_and_honours_max_tokens(self, engine):
        deltas = await self.collect(engine, self.request(self.prompt_ids(20), max_tokens=9))
        tokens = assert_well_formed(deltas)
        assert len(tokens) == 9
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert all(d.request_id == deltas[0].request_id for d in deltas)
        assert deltas[0].num_prompt_tokens == 20

    async def test_greedy_is_deterministic(self, engine):
        prompt = self.prompt_ids(24, salt=1)
        assert await self.generated(engine, prompt, 12) == await self.generated(engine, prompt, 12)

    async def test_resume_continues_exactly_after_the_last_emitted_token(self, engine):
        prompt, k = self.prompt_ids(30, salt=2), 5
        full = await self.generated(engine, prompt, 12)
        resumed = self.request(prompt, 12, outputs=tuple(full[:k]))
        deltas = await self.collect(engine, resumed)
        assert assert_well_formed(deltas, first_index=k) == full[k:]
        assert deltas[-1].finish_reason is FinishReason.LENGTH

    async def test_concurrent_requests_all_complete(self, engine):
        prompts = [self.prompt_ids(16 + 3 * i, salt=10 + i) for i in range(5)]
        prompts.append(prompts[0])  # a twin: greedy, so the same output
        requests = [self.request(p, max_tokens=8 + i) for i, p in enumerate(prompts[:5])]
        requests.append(self.request(prompts[0], max_tokens=8))
        results = await asyncio.gather(*(self.collect(engine, r) for r in requests))
        outputs = [assert_well_formed(deltas) for deltas in results]
        assert [len(o) for o in outputs] == [8, 9, 10, 11, 12, 8]
        assert outputs[5] == outputs[0]

    # ---- snapshot, abort, early exit -----------------------------------------------

    async def test_snapshot_of_a_running_request(self, engine):
        request = self.request(self.prompt_ids(40, salt=3), max_tokens=200)
        stream = engine.generate(request)
        received: list[int] = []
        try:
            async for delta in stream:
                assert not delta.finished, "finished before it could be snapshotted"
                received += delta.token_ids
                if len(received) >= 3:
                    snap = engine.snapshot(request.request_id)
                    break
        finally:
            await engine.abort(request.request_id)
            await stream.aclose()
        outputs = snap.request.output_token_ids
        assert outputs[: len(received)] == tuple(received)  # it may be ahead of the consumer
        assert (snap.request.prompt_token_ids, snap.request.sampling) == (request.prompt_token_ids,
                                                                          request.sampling)
        block_size = engine.stats().block_size
        context = request.prompt_token_ids + outputs
        assert len(snap.block_hashes) >= 40 // block_size
        assert snap.block_hashes == block_hashes(context, block_size, self.model_name)[
            : len(snap.block_hashes)]

    async def test_abort_mid_stream_ends_it_with_abort_and_frees_the_kv(self, engine):
        request = self.request(self.prompt_ids(32, salt=4), max_tokens=300)
        deltas: list[TokenDelta] = []

        async def consume():
            async for delta in engine.generate(request):
                deltas.append(delta)
                if len(deltas) == 1:
                    assert await engine.abort(request.request_id)

        await asyncio.wait_for(consume(), TIMEOUT_S)
        assert_well_formed(deltas)
        assert deltas[-1].finish_reason is FinishReason.ABORT
        stats = await wait_until(engine, idle, "KV freed after abort")
        assert stats.aborted_requests >= 1
        assert not await engine.abort(request.request_id)

    async def test_closing_the_stream_early_aborts_the_request(self, engine):
        before = engine.stats()
        request = self.request(self.prompt_ids(32, salt=5), max_tokens=300)
        stream = engine.generate(request)
        first = await asyncio.wait_for(stream.__anext__(), TIMEOUT_S)
        assert first.finish_reason is None
        await stream.aclose()
        await wait_until(engine, lambda s: idle(s) and s.aborted_requests > before.aborted_requests,
                         "the request aborted and its KV freed after the consumer closed")
        with pytest.raises(UnknownRequest):
            engine.snapshot(request.request_id)

    async def test_cancelling_the_consumer_aborts_the_request(self, engine):
        before = engine.stats()
        request = self.request(self.prompt_ids(32, salt=6), max_tokens=300)
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), TIMEOUT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(engine, lambda s: idle(s) and s.aborted_requests > before.aborted_requests,
                         "the request aborted and its KV freed after the consumer was cancelled")

    async def test_unknown_requests(self, engine):
        assert not await engine.abort("contract-never-sent")
        with pytest.raises(UnknownRequest):
            engine.snapshot("contract-never-sent")

    # ---- refusals and load ---------------------------------------------------------

    async def test_a_context_longer_than_max_model_len_is_a_bad_request(self, engine):
        request = self.request(self.prompt_ids(self.max_model_len + 1), max_tokens=4)
        with pytest.raises(EngineError) as info:
            await self.collect(engine, request)
        assert info.value.code == "bad_request"

    async def test_stats_are_sane(self, engine):
        before = engine.stats()
        prompt = self.prompt_ids(20, salt=7)
        await self.generated(engine, prompt, 5)
        stats = await wait_until(engine, lambda s: s.finished_requests > before.finished_requests,
                                 "the finished request counted")
        assert stats.kv_blocks_total > 0 and stats.block_size > 0
        assert 0 <= stats.kv_blocks_used <= stats.kv_blocks_total
        assert 0.0 <= stats.kv_usage <= 1.0
        assert stats.running >= 0 and stats.waiting >= 0 and stats.waiting_prompt_tokens >= 0
        assert stats.tokens_per_s >= 0 and stats.batch_size >= 0
        prefilled = stats.computed_prompt_tokens + stats.cached_prompt_tokens
        prefilled_before = before.computed_prompt_tokens + before.cached_prompt_tokens
        assert prefilled - prefilled_before >= len(prompt) - stats.block_size
        assert stats.observed_at >= before.observed_at > 0

    async def test_stats_list_the_requests_held(self, engine):
        request = replace(self.request(self.prompt_ids(24, salt=9), max_tokens=300), priority=7,
                          slo_class="batch")
        seen = []

        async def consume():
            async for delta in engine.generate(request):
                seen.extend(delta.token_ids)
                if len(seen) == len(delta.token_ids):  # the first delta: surely still decoding
                    held = {r.request_id: r for r in engine.stats().requests}
                    status = held[request.request_id]
                    assert (status.priority, status.slo_class, status.prompt_tokens) == (7, "batch", 24)
                    assert status.output_tokens >= len(seen) and status.max_tokens == 300
                    assert status.running and status.arrived_at > 0
                    assert await engine.abort(request.request_id)

        await asyncio.wait_for(consume(), TIMEOUT_S)
        stats = await wait_until(engine, lambda s: not s.requests, "no request held after the abort")
        assert stats.requests == ()

    async def test_pause_holds_requests_in_place_and_resume_continues_them(self, engine):
        request = self.request(self.prompt_ids(24, salt=11), max_tokens=200)
        stream = engine.generate(request)
        first = await asyncio.wait_for(anext(stream), TIMEOUT_S)
        await engine.pause()
        paused_at = engine.stats().output_tokens_total
        assert request.request_id in {r.request_id for r in engine.stats().requests}  # held, not dropped
        await engine.resume()
        deltas = [first] + [d async for d in stream]
        assert len(assert_well_formed(deltas)) == 200
        assert engine.stats().output_tokens_total >= paused_at + 1

    async def test_a_repeated_prompt_is_served_from_the_prefix_cache(self, engine):
        block_size = engine.stats().block_size
        prompt = self.prompt_ids(4 * block_size + 3, salt=8)
        await self.generated(engine, prompt, 2)
        held = engine.stats().cached_block_hashes
        assert set(block_hashes(prompt, block_size, self.model_name)) <= held
        again = await self.collect(engine, self.request(prompt, 2))
        assert again[0].num_cached_tokens >= block_size
