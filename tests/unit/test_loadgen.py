"""bench.loadgen and bench.report: arrivals, plans, SSE reading, records and their figures.

No server is started: the sender is driven through httpx's MockTransport.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from bench.loadgen import (
    DONE,
    LoadSpec,
    PlannedRequest,
    build_plan,
    gamma_arrivals,
    poisson_arrivals,
    prompt_vocabulary,
    read_event,
    run_load,
    trace_window,
)
from bench.report import (
    RequestRecord,
    cpu_delta,
    distribution,
    overhead,
    percentile,
    pool,
    process_name,
    summarize,
    token_rate_series,
)
from bench.traces import TraceRequest

TRACE = tuple(TraceRequest(float(t), p, o) for t, p, o in
              [(0, 100, 10), (1, 2000, 20), (2, 300, 900), (3, 50, 5), (5, 700, 70)])
VOCAB = np.arange(6, 40)


# arrivals -------------------------------------------------------------------------------

def test_poisson_arrivals_are_sorted_in_range_and_at_the_rate():
    times = poisson_arrivals(rate=50.0, duration_s=200.0, rng=np.random.default_rng(1))
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < 200.0
    assert len(times) == pytest.approx(10_000, rel=0.03)
    gaps = np.diff(times)
    assert np.var(gaps) / np.mean(gaps) ** 2 == pytest.approx(1.0, rel=0.05)  # exponential: CV^2 = 1


def test_bursty_arrivals_keep_the_rate_and_raise_the_variance():
    times = gamma_arrivals(rate=50.0, duration_s=200.0, rng=np.random.default_rng(1), burstiness=4.0)
    gaps = np.diff(times)
    assert len(times) == pytest.approx(10_000, rel=0.06)
    assert np.var(gaps) / np.mean(gaps) ** 2 == pytest.approx(4.0, rel=0.15)


def test_arrivals_are_reproducible_and_refuse_bad_input():
    a = poisson_arrivals(3.0, 10.0, np.random.default_rng(5))
    assert np.array_equal(a, poisson_arrivals(3.0, 10.0, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 10.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="burstiness"):
        gamma_arrivals(1.0, 10.0, np.random.default_rng(0), burstiness=0.0)


def test_trace_window_compresses_to_the_rate():
    # mean rate of TRACE: 4 arrivals after the first in 5 s = 0.8/s; at 1.6/s twice as fast
    picked = trace_window(TRACE, duration_s=1.5, rate=1.6, start_s=1.0)
    assert [(r.arrival_s, r.prompt_tokens) for r in picked] == [(0.0, 2000), (0.5, 300), (1.0, 50)]
    assert trace_window(TRACE, duration_s=2.0, rate=None)[-1].arrival_s == 1.0  # own pace
    with pytest.raises(ValueError, match="no trace requests"):
        trace_window(TRACE, duration_s=1.0, rate=None, start_s=100.0)


# the plan ---------------------------------------------------------------------------------

def test_plan_is_a_function_of_the_seed():
    spec = LoadSpec("poisson", rate=2.0, duration_s=20.0, max_model_len=1024, seed=3)
    a, b = build_plan(spec, TRACE, VOCAB), build_plan(spec, TRACE, VOCAB)
    assert a == b
    assert a != build_plan(LoadSpec("poisson", 2.0, 20.0, max_model_len=1024, seed=4), TRACE, VOCAB)


def test_plan_fits_the_context_and_draws_prompts_from_the_vocabulary():
    plan = build_plan(LoadSpec("bursty", rate=5.0, duration_s=30.0, max_model_len=1024, seed=0), TRACE, VOCAB)
    assert len(plan.requests) > 50
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 1024 for r in plan.requests)
    assert all(set(r.prompt_token_ids) <= set(VOCAB.tolist()) for r in plan.requests)
    # rows (1, 2000, 20) and (2, 300, 900) do not fit 1024; each draw of them is clipped
    long_rows = sum((len(r.prompt_token_ids), r.max_tokens) in {(1004, 20), (124, 900)} for r in plan.requests)
    assert plan.clipped == long_rows > 0
    assert [r.index for r in plan.requests] == list(range(len(plan.requests)))


def test_trace_plan_uses_the_trace_rows_in_order():
    plan = build_plan(LoadSpec("trace", rate=None, duration_s=4.0, max_model_len=4096), TRACE, VOCAB)
    assert [(r.at_s, len(r.prompt_token_ids), r.max_tokens) for r in plan.requests] == [
        (0.0, 100, 10), (1.0, 2000, 20), (2.0, 300, 900), (3.0, 50, 5)]
    assert plan.clipped == 0


def test_spec_refuses_unknown_arrivals_and_missing_rate():
    with pytest.raises(ValueError, match="arrivals"):
        LoadSpec("uniform")
    with pytest.raises(ValueError, match="needs a rate"):
        LoadSpec("poisson", rate=None)


def test_prompt_vocabulary_leaves_out_special_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 0}, {"id": 1}, {"id": 5}]}))
    assert prompt_vocabulary(tmp_path).tolist() == [2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="vocabulary"):
        prompt_vocabulary(tmp_path / "missing")


# the sender ---------------------------------------------------------------------------------

def test_read_event():
    assert read_event('data: {"choices": []}') == {"choices": []}
    assert read_event("data: [DONE]") == DONE
    assert read_event("") is None and read_event(": keep-alive") is None


def sse(*payloads: object) -> bytes:
    return b"".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads)


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


async def test_run_load_records_chunks_usage_and_errors():
    seen: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if body["max_tokens"] == 2:
            return httpx.Response(429, json={"error": {"message": "busy"}})
        if body["max_tokens"] == 4:
            return httpx.Response(200, content=sse(chunk("a"), {"error": {"code": "stream_failed"}}, DONE))
        return httpx.Response(200, content=sse(chunk("a"), chunk("b"), chunk("c", "length"),
                                               {"choices": [], "usage": {"completion_tokens": 3}}, DONE))

    plan = [PlannedRequest(0, 0.0, (7, 8, 9), 3), PlannedRequest(1, 0.01, (7,), 2),
            PlannedRequest(2, 0.02, (9, 9), 4)]
    records = await run_load("http://test/v1", "m", plan, transport=httpx.MockTransport(server))
    ok, refused, broken = records
    assert (ok.ok, ok.output_tokens, len(ok.chunk_times_s), ok.status) == (True, 3, 3, 200)
    assert ok.ttft_s is not None and ok.ttft_s >= 0 and ok.done_s >= ok.chunk_times_s[-1]
    assert (refused.ok, refused.status, refused.error) == (False, 429, "HTTP 429")
    assert (broken.ok, broken.error) == (False, "stream error: stream_failed")
    assert seen[0]["prompt"] == [7, 8, 9] and seen[0]["ignore_eos"] is True and seen[0]["stream"] is True
    assert summarize(records).errors == {"HTTP 429": 1, "stream error: stream_failed": 1}


# records and their figures --------------------------------------------------------------------

def record(index: int, sent: float, chunks: tuple[float, ...], tokens: int, done: float,
           error: str | None = None, max_tokens: int | None = None) -> RequestRecord:
    return RequestRecord(index=index, scheduled_s=sent, sent_s=sent, prompt_tokens=10,
                         max_tokens=max_tokens or tokens, chunk_times_s=chunks, output_tokens=tokens,
                         done_s=done, status=None if error else 200, error=error)


def test_percentile_interpolates_linearly():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    assert distribution([]) is None


def test_record_latencies():
    r = record(0, sent=1.0, chunks=(1.5, 1.7, 1.9, 2.1), tokens=5, done=2.2)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.15)  # 0.6 s over the 4 tokens after the first
    assert r.e2e_s == pytest.approx(1.2)
    assert record(1, 0.0, (0.3,), 1, 0.4).tpot_s is None


def test_summarize_literal_run():
    records = [
        record(0, sent=0.0, chunks=(0.1, 0.2, 0.3), tokens=3, done=0.3),
        record(1, sent=1.0, chunks=(1.3, 1.5), tokens=2, done=1.5),
        record(2, sent=2.0, chunks=(), tokens=0, done=2.5, error="HTTP 429"),
        record(3, sent=3.0, chunks=(3.2, 3.3, 3.4, 3.5), tokens=4, done=4.0, max_tokens=6),
    ]
    s = summarize(records)
    assert (s.sent, s.ok, s.short, s.errors) == (4, 3, 1, {"HTTP 429": 1})
    assert s.duration_s == 4.0
    assert s.request_throughput == 0.75 and s.output_token_throughput == 2.25
    assert s.ttft.p50 == pytest.approx(0.2) and s.ttft.n == 3
    assert s.tpot.p50 == pytest.approx(0.1) and s.tpot.p99 == pytest.approx(0.198)
    assert s.e2e.p50 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no records"):
        summarize([])


def test_token_rate_series_bins_tokens_by_chunk_time():
    records = [record(0, 0.0, (0.2, 0.4, 1.5), 3, 1.5), record(1, 0.0, (1.1, 2.9), 4, 3.0),
               record(2, 0.0, (), 0, 0.5, error="timeout")]
    starts, rates = token_rate_series(records, bin_s=1.0)
    assert starts.tolist() == [0.0, 1.0, 2.0]
    assert rates.tolist() == [2.0, 3.0, 2.0]  # request 1 carries 2 tokens per chunk


@pytest.mark.parametrize("cmdline, name", [
    ([b"ray::ModelReplica.generate", b""], "ray::ModelReplica"),  # a task's method is not part of the name
    ([b"ray::ServeReplica:flotilla:flotilla-ingress"], "ray::ServeReplica:flotilla:flotilla-ingress"),
    ([b"VLLM::EngineCore"], "VLLM::EngineCore"),
    ([b"/v/bin/python", b"-m", b"vllm.entrypoints.openai.api_server", b"--model", b"m"], "vllm api_server"),
    ([b"/v/bin/python3", b"/v/bin/flotilla", b"up"], "flotilla"),
    ([b"/v/ray/core/src/ray/gcs/gcs_server", b"--log_dir=/tmp"], "gcs_server"),
    ([b""], "?"),
])
def test_process_name(cmdline, name):
    assert process_name(cmdline) == name


def test_cpu_delta_sums_by_name_and_counts_new_processes_from_zero():
    before = {1: ("ray::RouterAgent", 10.0), 2: ("ray::RouterAgent", 4.0), 3: ("gone", 9.0)}
    after = {1: ("ray::RouterAgent", 10.5), 2: ("ray::RouterAgent", 5.0), 4: ("VLLM::Worker", 2.0)}
    assert cpu_delta(before, after) == {"ray::RouterAgent": 1.5, "VLLM::Worker": 2.0}


def test_pool_and_overhead_of_literal_runs():
    run_a = [record(0, 0.0, (0.1, 0.2, 0.3), 3, 1.0), record(1, 1.0, (1.2, 1.4), 2, 2.0)]
    run_b = [record(0, 0.0, (0.3, 0.4, 0.5), 3, 2.0), record(1, 1.0, (), 0, 1.5, error="HTTP 429")]
    direct = pool("direct", 2.0, [(summarize(run_a), run_a)], load_average=1.0)
    flotilla = pool("flotilla", 2.0, [(summarize(run_a), run_a), (summarize(run_b), run_b)], load_average=3.0)
    assert direct.output_token_throughput == 2.5  # 5 tokens over 2 s
    assert flotilla.output_token_throughput == 2.0  # 8 tokens over 2 s + 2 s
    assert (flotilla.runs, flotilla.errors, flotilla.load_average) == (2, 1, 3.0)
    assert flotilla.ttft_p50_s == pytest.approx(0.2)  # TTFTs 0.1, 0.2, 0.3
    assert flotilla.ttft_p50_spread_s == pytest.approx(0.15)  # run p50s 0.15 and 0.3
    o = overhead(direct, flotilla)
    assert (o.system, o.rate, o.throughput_ratio) == ("flotilla", 2.0, 0.8)
    assert o.added_ttft_p50_ms == pytest.approx(50.0)  # 0.2 s against 0.15 s
    assert o.tpot_p50_ratio == pytest.approx(2 / 3)  # p50 of 0.1, 0.2, 0.1 against p50 of 0.1, 0.2
    with pytest.raises(ValueError, match="no request succeeded"):
        pool("x", 1.0, [(summarize(run_b[1:]), run_b[1:])])
