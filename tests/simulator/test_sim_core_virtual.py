"""SimScheduler in virtual time (`advance`/`next_change_s`) against stepping it one
step at a time as the live engine does: the same admissions, first tokens, finishes,
preemptions and times, with decode runs applied in one call each."""

from __future__ import annotations

import heapq
import random

import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.engines.sim_core import SimScheduler
from bench.simulator.timing import LinearDecodeTimer
from policies.perfmodel import MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec


class LinearTimer:
    """A cheap performance model, linear in every field; its decode line is exact."""

    def step_time(self, b: BatchShape) -> float:
        return (0.004 + 2e-5 * b.prefill_tokens + 1e-9 * b.prefill_attention_pairs
                + 1e-4 * b.decode_seqs + 3e-7 * b.decode_context_tokens)

    def decode_line(self, n: int) -> tuple[float, float]:
        return 0.004 + 1e-4 * n, 3e-7


H100 = StepTimeModel(gpu_spec("H100"), MODEL_PRESETS["llama-2-7b"])
SETTINGS = {  # (engine settings, timer): roomy, tight KV (preemptions), tight budget
    "roomy": (dict(num_blocks=2000, max_model_len=4096), LinearTimer()),
    "tight-kv": (dict(num_blocks=60, max_model_len=600, max_num_seqs=32, max_num_batched_tokens=512),
                 LinearTimer()),
    "small-batches": (dict(num_blocks=120, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256),
                      LinearTimer()),
    "h100-model": (dict(num_blocks=4000, max_model_len=2048), H100),
}


def workload(seed: int, n: int = 250) -> list[tuple[float, GenerationRequest]]:
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(8.0)
        shared = tuple(range(1000, 1064)) if rng.random() < 0.3 else ()  # a common prefix
        prompt = shared + tuple(rng.randint(0, 255) for _ in range(rng.randint(1, 200)))
        out.append((t, GenerationRequest(f"r{i}", "m", prompt, SamplingSpec(max_tokens=rng.randint(1, 120), seed=i))))
    return out


def stepped(requests, settings, timer):
    """The live engine's way: requests join the first step starting at or after them."""
    core = SimScheduler(timer, "m", block_size=16, **settings)
    first, finished, preempted, pending = {}, {}, [], list(requests)
    core.step_tokens = []  # (end, tokens) of every step, for the rate window's check
    while pending or core.has_work:
        if not core.has_work:
            core.idle(max(0.0, pending[0][0] - core.clock_s))
        while pending and pending[0][0] <= core.clock_s:
            core.add(pending.pop(0)[1])
        start = core.clock_s
        result = core.step()
        first.update({t.request_id: core.clock_s for t in result.tokens if t.index == 0})
        core.step_tokens.append((core.clock_s, len(result.tokens)))
        finished.update({rid: core.clock_s for rid, _ in result.finished})
        preempted += [(rid, start) for rid in result.preempted]
    return first, finished, preempted, core


def virtual(requests, settings, timer, pokes=()):
    """The simulator's way: events at arrivals and pokes (stats reads), wakes when told."""
    core = SimScheduler(timer, "m", block_size=16, **settings)
    core.use_virtual_time(timer if isinstance(timer, (LinearTimer, LinearDecodeTimer))
                          else LinearDecodeTimer(timer, settings["max_model_len"]))
    first, finished, preempted, calls = {}, {}, [], 0
    core.rates = []  # (clock, tokens_per_s) at each poke
    events = [(t, 0, i, "add", r) for i, (t, r) in enumerate(requests)]
    events += [(t, 0, 10**6 + i, "poke", None) for i, t in enumerate(pokes)]
    heapq.heapify(events)
    order, wake = 10**7, None
    while events:
        t, _, key, kind, request = heapq.heappop(events)
        if kind == "wake" and key != wake:
            continue
        progress = core.advance(t)
        calls += 1
        first.update(dict(progress.first_tokens))
        finished.update({rid: at for rid, _, at in progress.finished})
        preempted += list(progress.preempted)
        if kind == "add":
            core.add(request)
        if kind == "poke":
            core.rates.append((core.clock_s, core.stats(t).tokens_per_s))
        order += 1
        wake = order
        if kind in ("add", "poke"):  # plan once everything at this instant has landed
            heapq.heappush(events, (t, 1, order, "wake", None))
        elif (when := core.next_change_s()) is not None:
            heapq.heappush(events, (when, 1, order, "wake", None))
    return first, finished, preempted, core, calls


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_virtual_time_reproduces_stepping(name, seed):
    settings, timer = SETTINGS[name]
    requests = workload(seed)
    pokes = sorted(random.Random(seed).uniform(0, 40) for _ in range(150))
    first, finished, preempted, live = stepped(requests, settings, timer)
    v_first, v_finished, v_preempted, core, calls = virtual(requests, settings, timer, pokes)
    submitted = {r.request_id for _, r in requests}
    assert v_first.keys() == first.keys() and v_finished.keys() == finished.keys() == submitted
    for ours, theirs in ((v_first, first), (v_finished, finished)):
        assert all(ours[rid] == pytest.approx(theirs[rid], rel=1e-9, abs=1e-12) for rid in theirs)
    assert [rid for rid, _ in v_preempted] == [rid for rid, _ in preempted]
    assert [at for _, at in v_preempted] == pytest.approx([at for _, at in preempted], rel=1e-9)
    assert core.stats(0).computed_prompt_tokens == live.stats(0).computed_prompt_tokens
    assert core.stats(0).cached_prompt_tokens == live.stats(0).cached_prompt_tokens
    if name == "tight-kv":
        assert preempted, "this setting is meant to preempt"
    for clock, rate in core.rates:  # the rate window counts decode runs step by step
        tokens = sum(n for end, n in live.step_tokens if clock - core.rate_window_s < end <= clock)
        assert rate == pytest.approx(tokens / min(core.rate_window_s, clock), rel=1e-9)


@pytest.mark.parametrize("emitted", [0, 3])
def test_a_first_token_due_in_the_step_that_begins_a_decode_run_is_reported(emitted):
    """A prompt whose last chunk is one token (65 tokens, a budget of 64) makes a step that
    times as a pure decode, so it can begin a decode run: the first token it emits must
    still be reported, for a fresh request and for one resumed with tokens already sent."""
    settings = dict(num_blocks=200, max_model_len=1024, max_num_batched_tokens=64)
    request = GenerationRequest("x", "m", tuple(range(65 - emitted)), SamplingSpec(max_tokens=10),
                                output_token_ids=tuple(range(emitted)))
    v_first, v_finished, *_ = virtual([(0.0, request)], settings, LinearTimer())
    assert v_first.keys() == v_finished.keys() == {"x"} and v_first["x"] < v_finished["x"]
    if not emitted:  # stepping one step at a time emits it at the same time
        first, _, _, live = stepped([(0.0, request)], settings, LinearTimer())
        assert v_first["x"] == pytest.approx(first["x"], rel=1e-9)


def test_decode_runs_are_applied_in_few_calls():
    settings, timer = SETTINGS["roomy"]
    requests = workload(3, n=40)
    *_, core, calls = virtual(requests, settings, timer)
    steps = sum(r.sampling.max_tokens for _, r in requests)  # at least one step per token of the longest
    assert calls < len(requests) * 6 < steps  # a handful of calls per request, not one per step


def test_snapshots_in_virtual_time_carry_the_exact_tokens():
    settings, timer = SETTINGS["roomy"]
    request = workload(5, n=1)[0][1]
    live = SimScheduler(timer, "m", block_size=16, **settings)
    live.add(request)
    for _ in range(10):
        live.step()
    core = SimScheduler(timer, "m", block_size=16, **settings)
    core.use_virtual_time(timer)
    core.add(request)
    core.next_change_s()
    core.advance(live.clock_s)
    assert core.snapshot(request.request_id).request == live.snapshot(request.request_id).request


def test_virtual_time_needs_an_empty_scheduler_and_a_step_in_flight_reads_true_stats():
    settings, timer = SETTINGS["roomy"]
    core = SimScheduler(timer, "m", block_size=16, **settings)
    core.add(workload(0, n=1)[0][1])
    with pytest.raises(ValueError, match="empty scheduler"):
        core.use_virtual_time(timer)
    assert core.stats(0, cached_hashes=False).cached_block_hashes == frozenset()


def test_real_model_through_the_memoising_timer_keeps_step_times():
    timer = LinearDecodeTimer(H100, max_context=2048)
    requests = workload(2, n=80)
    settings = SETTINGS["h100-model"][0]
    first, finished, *_ = stepped(requests, settings, H100)
    v_first, v_finished, *_ = virtual(requests, settings, timer)
    assert all(v_finished[rid] == pytest.approx(finished[rid], rel=1e-9) for rid in finished)
    assert timer.model_calls < 400  # most steps were decode runs or memoised prefills
