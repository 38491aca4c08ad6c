"""`VllmEngine` against real vLLM on the CPU, with the project's tiny Llama.

All tests share the session's engine (see conftest.py) and so run on the session loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio

from actors.engines.base import (
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
)
from actors.engines.vllm_engine import VllmEngine, resume_seed
from actors.engines.vllm_stats import VllmStatsCollector
from orchestrator.local_model import DEFAULT_MODEL_NAME
from policies.block_hash import block_hashes
from tests.contract.engine_contract import EngineContract, idle, wait_until
from tests.e2e.conftest import E2E_BLOCK_SIZE, E2E_MAX_MODEL_LEN, E2E_MAX_NUM_SEQS, E2E_MAX_WAITING

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

TEXT = (
    "Return a new list containing all items from the iterable in ascending order. "
    "A custom key function can be supplied to customize the sort order, and the "
    "reverse flag can be set to request the result in descending order."
)


@pytest.fixture(scope="session")
def encode(local_model_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(local_model_dir) / "tokenizer.json"))
    return lambda text: tuple(tokenizer.encode(text).ids)


def request(engine, rid, prompt, *, output=(), **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 32)
    return GenerationRequest(rid, engine.model_name, tuple(prompt), SamplingSpec(**sampling),
                             output_token_ids=tuple(output))


async def run(engine, req):
    return [delta async for delta in engine.generate(req)]


def tokens_of(deltas) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


class TestVllmEngineContract(EngineContract):
    """The engine contract, on the session's vLLM engine."""

    model_name = DEFAULT_MODEL_NAME
    max_model_len = E2E_MAX_MODEL_LEN

    @pytest_asyncio.fixture(loop_scope="session")
    async def engine(self, vllm_engine):
        assert vllm_engine.model_name == self.model_name
        yield vllm_engine

    # The contract's own version runs on the default (per-test) loop, where vLLM's
    # output handler, bound to the session loop, never runs: its stats would freeze.
    @pytest_asyncio.fixture(autouse=True, loop_scope="session")
    async def _leaves_engine_idle(self, engine):
        yield
        await wait_until(engine, idle, "idle after the test")


# ---------------------------------------------------------------- tokens


REFERENCE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams, TokensPrompt

    if __name__ == "__main__":
        args = json.loads(sys.argv[1])
        llm = LLM(model=args["model"], served_model_name=args["name"], dtype=args["dtype"],
                  max_model_len=args["max_model_len"], block_size=args["block_size"],
                  enforce_eager=True)
        params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0)
        out = llm.generate(TokensPrompt(prompt_token_ids=args["prompt"]), params)[0].outputs[0]
        print("RESULT " + json.dumps({"tokens": list(out.token_ids), "text": out.text,
                                      "finish": out.finish_reason}))
""")


async def test_greedy_output_equals_vllm_llm_generate(vllm_engine, local_model_dir, encode,
                                                      tmp_path):
    """Same model, prompt and greedy sampling through `vllm.LLM` (its own process)."""
    prompt = encode(TEXT)
    deltas = await run(vllm_engine, request(vllm_engine, "ref", prompt, max_tokens=48,
                                            temperature=0.0))
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE)
    config = json.loads((Path(local_model_dir) / "config.json").read_text())
    args = {"model": str(local_model_dir), "name": vllm_engine.model_name,
            "dtype": config.get("dtype") or config["torch_dtype"],
            "max_model_len": E2E_MAX_MODEL_LEN, "block_size": E2E_BLOCK_SIZE, "max_tokens": 48,
            "prompt": list(prompt)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script), json.dumps(args)], capture_output=True,
        text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    reference = json.loads(lines[-1].removeprefix("RESULT "))
    assert tokens_of(deltas) == reference["tokens"]
    assert "".join(delta.text for delta in deltas) == reference["text"]
    assert deltas[-1].finish_reason.value == reference["finish"]


async def test_stream_indexes_are_contiguous_and_only_the_last_delta_finishes(vllm_engine,
                                                                             encode):
    deltas = await run(vllm_engine, request(vllm_engine, "idx", encode(TEXT), max_tokens=20,
                                            temperature=0.0, ignore_eos=True))
    assert [d.index for d in deltas] == [sum(len(d.token_ids) for d in deltas[:i])
                                         for i in range(len(deltas))]
    assert len(tokens_of(deltas)) == 20
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [FinishReason.LENGTH]


async def test_greedy_resume_continues_exactly(vllm_engine, encode):
    prompt = encode(TEXT)
    first = await run(vllm_engine, request(vllm_engine, "g-full", prompt, max_tokens=40,
                                           temperature=0.0, ignore_eos=True))
    full = tokens_of(first)
    resumed = await run(vllm_engine, request(vllm_engine, "g-resumed", prompt, max_tokens=40,
                                             temperature=0.0, ignore_eos=True, output=full[:13]))
    assert resumed[0].index == 13
    assert tokens_of(resumed) == full[13:]
    assert resumed[-1].finish_reason is FinishReason.LENGTH
    # The text continues too: vLLM detokenizes the resumed tokens against the whole context.
    text_before = "".join(d.text for d in first if d.index < 13)
    assert 13 in {d.index for d in first}  # a delta starts exactly where the resume does
    assert text_before + "".join(d.text for d in resumed) == "".join(d.text for d in first)


async def test_seeded_resume_is_reproducible_with_a_seed_of_its_own(vllm_engine, encode):
    prompt = encode(TEXT)
    spec = {"max_tokens": 30, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    first = tokens_of(await run(vllm_engine, request(vllm_engine, "s-1", prompt, **spec)))
    again = tokens_of(await run(vllm_engine, request(vllm_engine, "s-2", prompt, **spec)))
    assert first == again  # seeded sampling is a function of the seed
    tails = [tokens_of(await run(vllm_engine, request(vllm_engine, f"s-r{i}", prompt,
                                                      output=first[:10], **spec)))
             for i in range(2)]
    assert tails[0] == tails[1] and len(tails[0]) == 20
    # The continuation is a fresh seeded sample of the longer context, under a seed of its
    # own, not the original seed's draws replayed from position 0.
    fresh = tokens_of(await run(vllm_engine, request(
        vllm_engine, "s-fresh", prompt + tuple(first[:10]), max_tokens=20, temperature=1.0,
        seed=resume_seed(7, 10), ignore_eos=True)))
    assert fresh == tails[0]
    assert resume_seed(7, 0) == 7 and resume_seed(7, 10) not in (7, resume_seed(7, 11))


# ---------------------------------------------------------------- prefix cache and stats


async def test_repeated_long_prompt_is_served_from_the_prefix_cache(vllm_engine, encode):
    prompt = encode("Only the prefix-cache test starts with this sentence. " + " ".join([TEXT] * 6))
    before = vllm_engine.stats()
    first = await run(vllm_engine, request(vllm_engine, "pc-1", prompt, max_tokens=4))
    second = await run(vllm_engine, request(vllm_engine, "pc-2", prompt, max_tokens=4))
    # vLLM always recomputes the last prompt token, so the hit stops at the block before it.
    reusable = (len(prompt) - 1) // E2E_BLOCK_SIZE * E2E_BLOCK_SIZE
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == reusable > 0
    after = await wait_until(
        vllm_engine, lambda s: s.cached_prompt_tokens >= before.cached_prompt_tokens + reusable,
        "the second run's cache hits counted")
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == \
        2 * len(prompt) - reusable
    hashes = block_hashes(prompt, E2E_BLOCK_SIZE, vllm_engine.model_name)
    assert set(hashes) <= after.cached_block_hashes


async def test_stats_track_running_and_kv_then_return_to_zero_after_abort(vllm_engine, encode):
    prompt = encode(TEXT)
    rids = [f"ab-{i}" for i in range(3)]
    streams = [vllm_engine.generate(request(vllm_engine, rid, prompt, max_tokens=900,
                                            ignore_eos=True, seed=i))
               for i, rid in enumerate(rids)]
    firsts = await asyncio.gather(*(anext(stream) for stream in streams))
    assert all(delta.index == 0 for delta in firsts)
    busy = await wait_until(vllm_engine, lambda s: s.running == 3, "three requests running")
    # each request holds at least its prompt's blocks (shared prefix blocks count once)
    assert busy.kv_blocks_used >= -(-len(prompt) // E2E_BLOCK_SIZE)
    assert busy.tokens_per_s > 0 and busy.batch_size >= 1
    snapshot = vllm_engine.snapshot("ab-0")
    emitted = snapshot.request.output_token_ids
    assert snapshot.request.prompt_token_ids == prompt and emitted[:1] == firsts[0].token_ids[:1]
    assert snapshot.block_hashes == block_hashes(prompt + emitted, E2E_BLOCK_SIZE,
                                                 vllm_engine.model_name)

    assert [await vllm_engine.abort(rid) for rid in rids] == [True] * 3
    tails = [[delta async for delta in stream] for stream in streams]
    assert all(tail[-1].finish_reason is FinishReason.ABORT for tail in tails)
    await wait_until(vllm_engine, idle, "KV freed after the aborts")
    assert await vllm_engine.abort("ab-0") is False
    assert vllm_engine.stats().aborted_requests >= 3


async def test_an_abort_right_after_submission_still_ends_the_stream(vllm_engine, encode):
    stream = vllm_engine.generate(request(vllm_engine, "early", encode(TEXT), max_tokens=900,
                                          ignore_eos=True))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # one turn of the loop: the stream is admitted and submitting
    assert await vllm_engine.abort("early")
    deltas = [await first] + [delta async for delta in stream]
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert len(tokens_of(deltas)) < 900


async def test_closing_the_stream_aborts_the_request_in_vllm(vllm_engine, encode):
    aborted = vllm_engine.stats().aborted_requests
    stream = vllm_engine.generate(request(vllm_engine, "close", encode(TEXT), max_tokens=900,
                                          ignore_eos=True))
    async for delta in stream:
        if delta.index >= 3:
            break
    await stream.aclose()
    assert vllm_engine.stats().aborted_requests == aborted + 1
    await wait_until(vllm_engine, idle, "KV freed after the consumer closed")


# ---------------------------------------------------------------- refusals


async def test_the_context_must_leave_room_for_one_token(vllm_engine):
    with pytest.raises(EngineError) as refused:
        await run(vllm_engine, request(vllm_engine, "full", [5] * E2E_MAX_MODEL_LEN))
    assert refused.value.code == "bad_request" and "max_model_len" in str(refused.value)
    deltas = await run(vllm_engine, request(vllm_engine, "fits", [5] * (E2E_MAX_MODEL_LEN - 1),
                                            max_tokens=8, ignore_eos=True))
    assert len(tokens_of(deltas)) == 1 and deltas[-1].finish_reason is FinishReason.LENGTH


async def test_more_than_max_waiting_is_refused_as_overloaded(vllm_engine, encode):
    prompt = encode(TEXT)
    capacity = E2E_MAX_NUM_SEQS + E2E_MAX_WAITING
    streams = [vllm_engine.generate(request(vllm_engine, f"ov-{i}", prompt, max_tokens=900,
                                            ignore_eos=True, seed=i))
               for i in range(capacity + 1)]
    # Each stream is admitted or refused synchronously at its first step, and these
    # first steps all run in one turn of the loop, before vLLM has answered any of them.
    pending = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        await asyncio.wait(pending[-1:])
        assert isinstance(pending[-1].exception(), EngineOverloaded)
        await wait_until(vllm_engine, lambda s: (s.running, s.waiting)
                         == (E2E_MAX_NUM_SEQS, E2E_MAX_WAITING), "the engine full, per vLLM")
        assert not any(future.done() and future.exception() for future in pending[:capacity])
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
    await wait_until(vllm_engine, idle, "idle after the overload")


async def test_bad_arguments_are_refused_by_name_before_loading(local_model_dir):
    with pytest.raises(ValueError, match="engine_args may not set"):
        VllmEngine("m", str(local_model_dir), engine_args={"block_size": 64})
    with pytest.raises(ValueError, match="model_path"):
        VllmEngine("m", str(local_model_dir / "missing"))


async def test_a_block_size_the_cpu_kernel_cannot_run_is_refused_before_loading(local_model_dir):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the block-size limit is the CPU attention kernel's")
    with pytest.raises(ValueError, match="block_size 16 .*CPU"):
        await VllmEngine("m", str(local_model_dir), block_size=16).start()


async def test_stats_collector_reads_vllms_step_reports():
    from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

    now = [100.0]
    collector = VllmStatsCollector(clock=lambda: now[0], rate_window_s=10.0)
    step = IterationStats()
    step.num_generation_tokens = 3
    step.prompt_token_stats.computed, step.prompt_token_stats.cached_tokens = 40, 64
    step.time_to_first_tokens_iter, step.inter_token_latencies_iter = [0.1], [0.01, 0.02]
    collector.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2,
                                    num_skipped_waiting_reqs=1, kv_cache_usage=0.25,
                                    prefix_cache_stats=PrefixCacheStats(queries=104, hits=64)),
                     step)
    assert (collector.running, collector.waiting, collector.kv_cache_usage) == (3, 3, 0.25)
    assert (collector.computed_prompt_tokens, collector.cached_prompt_tokens) == (40, 64)
    assert (collector.prefix_cache_queries, collector.prefix_cache_hits) == (104, 64)
    assert collector.batch_size == 3 and collector.tokens_per_s() == 0.3
    now[0] += 10.5  # the step leaves the window
    collector.record(SchedulerStats(), None)  # the empty step after the last request ends
    assert (collector.running, collector.batch_size, collector.tokens_per_s()) == (0, 0, 0.0)
    assert collector.computed_prompt_tokens == 40  # cumulative
