"""Table tests of the bucket scheme and the workload characterisation."""

from __future__ import annotations

import pytest

from policies.workload import (
    BucketScheme,
    RequestRecord,
    WorkloadProfile,
    characterise,
    characterise_span,
    sliding_windows,
)

SCHEME = BucketScheme((1, 100, 1000), (1, 10, 100))  # 2 × 2 buckets


def test_log_spaced_default_edges():
    scheme = BucketScheme.log_spaced()
    assert scheme.input_edges[:3] == (1, 32, 64) and scheme.input_edges[-1] == 32768
    assert scheme.output_edges[:3] == (1, 16, 32) and scheme.output_edges[-1] == 4096
    assert len(scheme) == 11 * 9


@pytest.mark.parametrize("prompt, output, index", [
    (1, 1, 0), (99, 9, 0), (99, 10, 1), (100, 9, 2), (999, 99, 3),
    (0, 0, 0),  # below the first edges: clamped into the first bucket
    (5000, 500, 3),  # above the last: clamped into the last
])
def test_bucket_index(prompt, output, index):
    assert SCHEME.index(prompt, output) == index


def test_bucket_label_and_representative():
    bucket = SCHEME.buckets[3]
    assert bucket.label == "in[100,1000) out[10,100)"
    prompt, output = bucket.representative
    assert 100 <= prompt < 1000 and 10 <= output < 100


@pytest.mark.parametrize("edges", [(1,), (1, 1), (5, 3), (-1, 4)])
def test_bad_edges_are_refused(edges):
    with pytest.raises(ValueError, match="input_edges"):
        BucketScheme(edges, (1, 10))


def test_characterise_counts_the_window_only():
    records = [RequestRecord(t, 50, 5) for t in (0.0, 5.0, 9.0, 10.0)] + [
        RequestRecord(9.5, 500, 50), RequestRecord(11.0, 50, 5)]  # 11.0 is after now
    profile = characterise(records, now=10.0, window_s=5.0, scheme=SCHEME, model="m")
    # (5, 10]: 9.0, 10.0 in bucket 0 and 9.5 in bucket 3; 5.0 is on the open edge
    assert profile.rates == (2 / 5, 0.0, 0.0, 1 / 5)
    assert profile.requests == 3 and profile.end_s == 10.0 and profile.window_s == 5.0
    assert profile.total_rate == pytest.approx(0.6)
    assert [i for i, _, _ in profile.active()] == [0, 3]


def test_characterise_counts_clamped_requests():
    records = [RequestRecord(1.0, 5000, 5), RequestRecord(2.0, 50, 5)]
    profile = characterise(records, now=2.0, window_s=10.0, scheme=SCHEME, model="m")
    assert profile.clamped == 1 and profile.requests == 2


def test_empty_window_is_a_profile_of_rate_zero():
    profile = characterise([], now=100.0, window_s=60.0, scheme=SCHEME, model="m")
    assert profile.total_rate == 0 and list(profile.active()) == []


def test_characterise_span_uses_the_trace_span():
    records = [RequestRecord(t, 50, 5) for t in (10.0, 20.0, 30.0)]
    profile = characterise_span(records, scheme=SCHEME, model="m")
    assert profile.window_s == 20.0 and profile.rates[0] == pytest.approx(3 / 20)
    with pytest.raises(ValueError, match="two records"):
        characterise_span(records[:1], scheme=SCHEME, model="m")


def test_sliding_windows_follow_a_shift_in_the_mix():
    short = [RequestRecord(float(t), 50, 5) for t in range(0, 100)]
    long = [RequestRecord(float(t), 500, 50) for t in range(100, 200)]
    windows = sliding_windows(short + long, window_s=50.0, step_s=50.0, scheme=SCHEME, model="m")
    assert [w.end_s for w in windows] == [50.0, 100.0, 150.0, 200.0]
    assert windows[0].rates[0] > 0 and windows[0].rates[3] == 0
    assert windows[-1].rates[0] == 0 and windows[-1].rates[3] == pytest.approx(49 / 50)  # 151 … 199


def test_from_rates_and_scaled():
    profile = WorkloadProfile.from_rates("m", SCHEME, [(50, 5, 2.0), (60, 6, 1.0), (500, 50, 0.5)])
    assert profile.rates == (3.0, 0.0, 0.0, 0.5)
    assert profile.scaled(2).rates == (6.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="rates"):
        WorkloadProfile("m", SCHEME, (1.0,), 1.0)
    with pytest.raises(ValueError, match="finite"):
        WorkloadProfile("m", SCHEME, (-1.0, 0, 0, 0), 1.0)
