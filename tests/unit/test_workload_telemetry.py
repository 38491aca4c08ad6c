"""Finished requests from the ingress to the controller's window: batching, bounds, coverage."""

from __future__ import annotations

import pytest

from orchestrator.request_log import FinishedRequest, RequestLog
from orchestrator.workload_window import WorkloadWindow
from policies.workload import BucketScheme

SCHEME = BucketScheme.log_spaced()


def test_the_log_ships_one_batch_per_flush_and_drops_the_oldest_beyond_its_bound():
    sent = []
    log = RequestLog(sent.append, max_records=3)
    assert log.flush() == 0 and sent == []  # nothing to ship: no call
    for i in range(5):
        log.add(FinishedRequest("m", 100.0 + i, 10, 20))
    assert log.flush() == 3 and log.dropped == 2
    assert [r.arrival_s for r in sent[0]] == [102.0, 103.0, 104.0]
    assert log.flush() == 0 and len(sent) == 1


def test_bad_records_and_settings_are_refused():
    with pytest.raises(ValueError, match="must not be negative"):
        FinishedRequest("m", 1.0, -1, 3)
    with pytest.raises(ValueError, match="max_records >= 1"):
        RequestLog(print, max_records=0)


def test_the_window_keeps_the_last_seconds_of_served_models_only():
    window = WorkloadWindow(["m"], started_at=0.0)
    window.add([FinishedRequest("m", t, 100, 50) for t in (10.0, 50.0, 95.0)]
               + [FinishedRequest("other", 95.0, 1, 1)], now=100.0, window_s=60)
    assert [r.arrival_s for r in window.records("m")] == [50.0, 95.0]
    assert window.ignored == 1 and window.records("other") == ()
    window.prune(now=120.0, window_s=60)
    assert [r.arrival_s for r in window.records("m")] == [95.0]


def test_rates_are_measured_over_the_span_the_window_covers():
    window = WorkloadWindow(["m"], started_at=1000.0)
    window.add([FinishedRequest("m", 1000.0 + t, 100, 50) for t in range(1, 21)], now=1020.0, window_s=300)
    assert window.observed_s("m", 1020.0, 300) == 20.0  # started 20 s ago: not 300 s of traffic
    profile = window.profile("m", 1020.0, 300, SCHEME)
    assert profile.total_rate == pytest.approx(1.0) and profile.window_s == 20.0
    assert window.observed_s("m", 2000.0, 300) == 300.0


def test_a_model_over_its_bound_keeps_its_latest_records_and_says_how_far_they_reach():
    window = WorkloadWindow(["m"], started_at=0.0, max_per_model=10)
    window.add([FinishedRequest("m", float(t), 100, 50) for t in range(1, 101)], now=100.0, window_s=300)
    assert len(window.records("m")) == 10 and window.observed_s("m", 100.0, 300) == 10.0
    assert window.profile("m", 100.0, 300, SCHEME).total_rate == pytest.approx(1.0)  # not 10 / 100 s
