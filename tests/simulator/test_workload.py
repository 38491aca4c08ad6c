"""Workloads: trace replay (window, speed-up, looping, clipping), bursty Poisson arrivals,
shared prefixes and SLO mixes, all fixed by the seed; synthetic prompt names."""

from __future__ import annotations

import numpy as np
import pytest

from bench import traces
from bench.simulator.prompts import PromptNamer
from bench.simulator.workload import Arrival, LogNormal, PrefixGroups, SyntheticWorkload, TraceWorkload


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_a_trace_window_plays_once_at_its_own_pace_and_sped_up():
    rows = traces.window(traces.load_trace("conv"), 0, 120)
    plain = list(TraceWorkload("conv", max_model_len=100_000, rng=rng(), window_s=(0, 120)).arrivals())
    fast = list(TraceWorkload("conv", max_model_len=100_000, rng=rng(), window_s=(0, 120), speedup=4).arrivals())
    assert [a.time_s for a in plain] == pytest.approx([r.arrival_s for r in rows])
    assert [a.prompt_tokens for a in plain] == [r.prompt_tokens for r in rows]
    assert [a.time_s for a in fast] == pytest.approx([a.time_s / 4 for a in plain])
    assert [a.number for a in plain] == list(range(len(rows)))


def test_a_trace_loops_back_to_back_up_to_max_requests():
    window = TraceWorkload("conv", max_model_len=4096, rng=rng(), window_s=(0, 60))
    n = window.times.size
    looped = list(TraceWorkload("conv", max_model_len=4096, rng=rng(), window_s=(0, 60),
                                max_requests=2 * n + 5).arrivals())
    times = [a.time_s for a in looped]
    assert len(looped) == 2 * n + 5 and times == sorted(times)
    assert times[n] == pytest.approx(times[0] + window.period_s)
    assert [a.output_tokens for a in looped[n:2 * n]] == [a.output_tokens for a in looped[:n]]


def test_jitter_moves_each_arrival_a_little_seeded_and_nothing_without_it():
    plain = list(TraceWorkload("conv", max_model_len=100_000, rng=rng(), window_s=(0, 120)).arrivals())
    assert list(TraceWorkload("conv", max_model_len=100_000, rng=rng(), window_s=(0, 120),
                              jitter_s=0.0).arrivals()) == plain  # draws nothing: the same requests
    jittered = [list(TraceWorkload("conv", max_model_len=100_000, rng=rng(seed), window_s=(0, 120),
                                   jitter_s=0.5).arrivals()) for seed in (0, 0, 1)]
    assert jittered[0] == jittered[1] and jittered[0] != jittered[2]  # a pure function of the seed
    times = [a.time_s for a in jittered[0]]
    assert times == sorted(times) and min(times) >= 0 and [a.number for a in jittered[0]] == list(range(len(plain)))
    assert sorted(times) != pytest.approx(sorted(a.time_s for a in plain))
    # every request keeps its lengths; moving each by at most 0.5 s moves each order statistic as little
    assert sorted((a.prompt_tokens, a.output_tokens) for a in jittered[0]) == sorted(
        (a.prompt_tokens, a.output_tokens) for a in plain)
    assert np.all(np.abs(np.array(times) - np.array([a.time_s for a in plain])) <= 0.5 + 1e-9)
    # looped, each copy still starts after the last one's jittered end, however large the jitter
    looped = [a.time_s for a in TraceWorkload("conv", max_model_len=100_000, rng=rng(), window_s=(0, 60),
                                              jitter_s=5.0, max_requests=300).arrivals()]
    assert len(looped) == 300 and looped == sorted(looped)
    with pytest.raises(ValueError, match="jitter_s must not be negative"):
        TraceWorkload("conv", max_model_len=4096, rng=rng(), window_s=(0, 60), jitter_s=-1.0)


def test_requests_longer_than_the_context_are_clipped_prompt_first():
    workload = TraceWorkload("conv", max_model_len=512, rng=rng(), window_s=(0, 300))
    arrivals = list(workload.arrivals())
    assert all(a.prompt_tokens + a.output_tokens <= 512 and a.prompt_tokens >= 1 for a in arrivals)
    assert workload.clipped == sum(r.prompt_tokens + r.output_tokens > 512
                                   for r in traces.window(traces.load_trace("conv"), 0, 300))


def test_bursts_multiply_the_poisson_rate_inside_them():
    w = SyntheticWorkload(10.0, max_model_len=4096, rng=rng(1), duration_s=2000, burst_every_s=100,
                          burst_s=20, burst_factor=4, prompt=LogNormal(100, 0.5, 1000),
                          output=LogNormal(50, 0.5, 500))
    times = np.array([a.time_s for a in w.arrivals()])
    in_burst = np.mod(times, 100) < 20
    assert in_burst.sum() / (2000 * 0.2) == pytest.approx(40, rel=0.05)  # requests/s in bursts
    assert (~in_burst).sum() / (2000 * 0.8) == pytest.approx(10, rel=0.05)
    assert times.max() < 2000


def test_lengths_can_come_from_a_trace_and_every_draw_from_the_seed():
    def draw(seed):
        w = SyntheticWorkload(5.0, max_model_len=4096, rng=rng(seed), max_requests=300, lengths_trace="code",
                              prefixes=PrefixGroups((100, 400), 0.5), slo_mix={"a": 1, "b": 3})
        return list(w.arrivals())

    first = draw(3)
    assert len(first) == 300 and first == draw(3) and first != draw(4)
    rows = {(r.prompt_tokens, r.output_tokens) for r in traces.load_trace("code")}
    assert all((a.prompt_tokens, a.output_tokens) in rows for a in first if a.prompt_tokens + a.output_tokens < 4096)
    assert {a.slo_class for a in first} == {"a", "b"}
    shared = [a for a in first if a.prefix_group >= 0]
    assert 100 < len(shared) < 200
    assert all(a.prefix_tokens == min((100, 400)[a.prefix_group], a.prompt_tokens - 1) for a in shared)


LAW = LogNormal(100, 0.5, 1000)


@pytest.mark.parametrize("kwargs, problem", [
    (dict(rate=0.0, duration_s=1.0, lengths_trace="conv"), "rate must be positive"),
    (dict(rate=1.0, lengths_trace="conv"), "duration_s or max_requests"),
    (dict(rate=1.0, duration_s=1.0, lengths_trace="conv", prompt=LAW), "not both"),
    (dict(rate=1.0, duration_s=1.0, prompt=LAW), "both prompt and output"),
])
def test_bad_synthetic_workloads_are_refused(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        SyntheticWorkload(max_model_len=4096, rng=rng(), **kwargs)


def arrival(number, prompt, group=-1, shared=0):
    return Arrival(number, 0.0, prompt, 10, group, shared, "default")


def test_prompt_names_are_shared_exactly_over_a_common_prefix():
    namer = PromptNamer("m", 16)
    a, b = namer.hashes(arrival(1, 100, group=3, shared=70)), namer.hashes(arrival(2, 90, group=3, shared=70))
    c = namer.hashes(arrival(3, 100, group=4, shared=70))
    alone = namer.hashes(arrival(4, 100))
    assert len(a) == 100 // 16 and len(b) == 90 // 16
    assert a[:4] == b[:4] and a[4:] != b[4:5] + b[5:]  # 70 shared tokens: 4 whole blocks
    assert not set(a) & set(c) and not set(a) & set(alone)
    assert namer.hashes(arrival(1, 100, group=3, shared=70)) == a


def test_requests_carry_placeholder_ids_and_their_number_as_seed():
    request = PromptNamer("m", 16).request(arrival(7, 33))
    assert request.request_id == "r7" and len(request.prompt_token_ids) == 33
    assert request.sampling.seed == 7 and request.sampling.max_tokens == 10 and request.model == "m"
