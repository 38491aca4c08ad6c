"""bench.traces: reading the Azure CSVs, windows, time compression, context clipping, sampling."""

from __future__ import annotations

import io

import numpy as np
import pytest

from bench.traces import (
    TraceRequest,
    clip_to_context,
    compress,
    mean_rate,
    read_trace,
    sample_lengths,
    span_s,
    window,
)

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:46.1805900,879,0
2023-11-16 18:15:52.6805900,91,16
"""


def reqs(*rows: tuple[float, int, int]) -> tuple[TraceRequest, ...]:
    return tuple(TraceRequest(*row) for row in rows)


def test_read_trace_sorts_rebases_and_keeps_sub_second_times():
    trace = read_trace(io.StringIO(CSV))
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.5, 4.8145789, 6.5])
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(879, 1), (374, 44), (396, 109), (91, 16)]


def test_read_trace_names_a_missing_column_and_a_bad_row():
    with pytest.raises(ValueError, match="GeneratedTokens"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n"))
    with pytest.raises(ValueError, match="line 3"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                               "2023-11-16 18:15:46,3,4\n2023-11-16 18:15:47,lots,4\n"))


def test_span_and_mean_rate():
    trace = reqs((0.0, 1, 1), (1.0, 1, 1), (2.0, 1, 1), (4.0, 1, 1))
    assert span_s(trace) == 4.0
    assert mean_rate(trace) == 0.75  # three arrivals after the first, in 4 s
    with pytest.raises(ValueError, match="two requests"):
        mean_rate(reqs((3.0, 1, 1)))


def test_window_is_half_open_and_rebased():
    trace = reqs((0.0, 1, 1), (10.0, 2, 2), (15.0, 3, 3), (20.0, 4, 4))
    assert window(trace, 10.0, 20.0) == reqs((0.0, 2, 2), (5.0, 3, 3))
    with pytest.raises(ValueError, match="empty window"):
        window(trace, 5.0, 5.0)


def test_compress_divides_arrival_times():
    assert compress(reqs((0.0, 5, 6), (3.0, 7, 8)), speedup=2.0) == reqs((0.0, 5, 6), (1.5, 7, 8))
    with pytest.raises(ValueError, match="speedup"):
        compress(reqs((0.0, 1, 1)), 0.0)


@pytest.mark.parametrize("prompt, output, fitted", [
    (100, 50, (100, 50)),       # fits: untouched
    (1000, 24, (1000, 24)),     # exactly max_model_len
    (7433, 14, (1010, 14)),     # long prompt: cut the prompt, keep the answer
    (500, 600, (424, 600)),     # both moderate: still only the prompt is cut
    (300, 2000, (1, 1023)),     # the answer alone is too long: prompt down to 1 token, then the answer
])
def test_clip_cuts_the_prompt_first(prompt, output, fitted):
    result = clip_to_context(reqs((0.0, prompt, output)), max_model_len=1024)
    assert (result.requests[0].prompt_tokens, result.requests[0].output_tokens) == fitted
    assert result.clipped == (fitted != (prompt, output))


def test_clip_counts_and_keeps_arrivals():
    result = clip_to_context(reqs((0.0, 10, 10), (1.0, 30, 10), (2.0, 5, 100)), max_model_len=32,
                             min_prompt_tokens=4)
    assert result.requests == reqs((0.0, 10, 10), (1.0, 22, 10), (2.0, 4, 28))
    assert result.clipped == 2
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        clip_to_context((), max_model_len=8, min_prompt_tokens=8)


def test_sample_lengths_draws_whole_rows_reproducibly():
    trace = reqs((0.0, 10, 1), (1.0, 20, 2), (2.0, 30, 3))
    a = sample_lengths(trace, 50, np.random.default_rng(7))
    b = sample_lengths(trace, 50, np.random.default_rng(7))
    assert a.shape == (50, 2) and np.array_equal(a, b)
    assert {tuple(row) for row in a} <= {(10, 1), (20, 2), (30, 3)}  # pairs stay together
    assert len({tuple(row) for row in a}) == 3
    with pytest.raises(ValueError, match="empty"):
        sample_lengths((), 3, np.random.default_rng(0))


def test_trace_request_refuses_nonsense():
    with pytest.raises(ValueError, match="arrival_s"):
        TraceRequest(-1.0, 5, 5)
    with pytest.raises(ValueError, match="prompt_tokens"):
        TraceRequest(0.0, 0, 5)
