"""The live trace benchmark's bookkeeping: the migrations counter read off /metrics and
pooled per configuration (no fleet: the exposition text and the records are literal)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from bench.migration_fleet import counter_series, series_value
from bench.migration_trace_report import (
    LiveRun,
    SlowRequest,
    live_runs,
    main,
    ratio_interval,
    slowest,
    summarize_live,
    ttft_interval,
)
from bench.report import RequestRecord

EXPOSITION = """\
# HELP flotilla_migrations_total Migrations that ended.
# TYPE flotilla_migrations_total counter
flotilla_migrations_total{outcome="done",reason="balance"} 39.0
flotilla_migrations_total{reason="defragment",outcome="done"} 31.0
flotilla_migrations_total{outcome="request_ended",reason="defragment"} 3.0
flotilla_migrations_created{outcome="done",reason="balance"} 1.7e9
"""


def test_counter_series_keys_by_label_name_whatever_the_exposition_order():
    assert counter_series(EXPOSITION, "flotilla_migrations_total", ("reason", "outcome")) == {
        "balance/done": 39.0, "defragment/done": 31.0, "defragment/request_ended": 3.0}


def test_series_value_reads_one_histogram_series_and_zero_before_any():
    histogram = """\
# HELP flotilla_migration_downtime_seconds Stall the client saw.
# TYPE flotilla_migration_downtime_seconds histogram
flotilla_migration_downtime_seconds_bucket{mechanism="kv",le="0.05"} 3.0
flotilla_migration_downtime_seconds_bucket{mechanism="kv",le="+Inf"} 4.0
flotilla_migration_downtime_seconds_count{mechanism="kv"} 4.0
flotilla_migration_downtime_seconds_sum{mechanism="kv"} 0.25
"""
    assert series_value(histogram, "flotilla_migration_downtime_seconds_sum", {"mechanism": "kv"}) == 0.25
    assert series_value(histogram, "flotilla_migration_downtime_seconds_count", {"mechanism": "kv"}) == 4
    assert series_value(histogram, "flotilla_migration_downtime_seconds_sum", {"mechanism": "recompute"}) == 0.0


def test_a_configuration_counts_the_migrations_that_ended_done():
    record = RequestRecord(0, 0.0, 0.0, 8, 2, (0.4, 0.5), 2, 0.5, 200)
    moves = counter_series(EXPOSITION, "flotilla_migrations_total", ("reason", "outcome"))
    run = LiveRun("migration-on", 1, 4.0, (record,), 0, moves, 0.8, 0.5, 10.0, 1.0, ())
    (row,) = summarize_live([run])
    assert row["migrations_done"] == 70
    assert row["ttft_p99_s"] == 0.1  # 0.4 s measured at time scale 4


def run_of(name: str, ttfts, scale: float = 4.0, run: int = 1) -> LiveRun:
    records = tuple(RequestRecord(i, 0.0, 0.0, 8, 2, (t, t + 0.1), 2, t + 0.1, 200) for i, t in enumerate(ttfts))
    return LiveRun(name, run, scale, records, 0, {}, 0.8, 0.5, 10.0, 1.0, ({"t": 0.0},))


def test_the_p99_ratio_interval_brackets_the_ratio_and_is_repeatable():
    on = np.random.default_rng(1).exponential(1.0, 300)
    low, high = ratio_interval(3 * on, on)
    assert low < 3 < high and high / low < 3  # a real interval, not a point, and not everything
    assert ratio_interval(3 * on, on) == (low, high)  # seeded
    with pytest.raises(ValueError, match="both configurations"):
        ratio_interval([], on)


def test_live_runs_come_back_from_json_and_pool_across_files(tmp_path, capsys):
    runs = [run_of("migration-on", [0.4] * 99 + [4.0]), run_of("migration-off", [0.4] * 99 + [12.0])]
    result = {"live": {"runs": [{**asdict(r), "records": [asdict(x) for x in r.records]} for r in runs]}}
    assert live_runs(json.loads(json.dumps(result))) == runs
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(result))
    second.write_text(json.dumps(result))
    assert main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "200/200" in out and "95% bootstrap interval" in out
    assert ttft_interval(runs + runs) is not None and ttft_interval(runs[:1]) is None


def test_pooling_refuses_runs_at_different_time_scales(tmp_path):
    for name, scale in (("a", 4.0), ("b", 8.0)):
        run = run_of("migration-on", [0.4] * 10, scale)
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"live": {"runs": [{**asdict(run), "records": [asdict(x) for x in run.records]}]}}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_slowest_lists_the_longest_ttfts_first_in_the_simulated_gpu_s_seconds():
    records = tuple(RequestRecord(i, 2.0 * i, 2.0 * i, 100 + i, 2, (2.0 * i + t, 2.0 * i + t + 0.1), 2,
                                  2.0 * i + t + 0.1, 200) for i, t in enumerate([0.5, 8.0, 0.5, 4.0, 4.0]))
    failed = RequestRecord(5, 10.0, 10.0, 105, 2, (), 0, 10.0, None, error="timeout")
    run = LiveRun("migration-on", 1, 4.0, records + (failed,), 0, {}, 0.8, 0.5, 10.0, 1.0, ())
    # request 1 agrees with the simulator's prompt length, request 3 does not: no comparison there
    simulated = {1: (101, 1.5), 3: (999, 0.2)}
    assert slowest(run, 3, simulated) == [
        SlowRequest(1, 0.5, 101, 2.0, 1.5),  # 8 s measured at time scale 4, sent at 2 s -> 0.5 s
        SlowRequest(3, 1.5, 103, 1.0, None),
        SlowRequest(4, 2.0, 104, 1.0, None),  # a tie goes to the earlier request
    ]
    assert [r.index for r in slowest(run, 10)] == [1, 3, 4, 0, 2]  # the failed request has no TTFT


def test_the_report_names_a_missing_or_foreign_file(tmp_path, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"live": {"runs": [{"name": "migration-on"}]}}))
    for path, message in ((tmp_path / "absent.json", "absent.json: No such file or directory"),
                          (foreign, "foreign.json: not a bench.migration_trace result")):
        with pytest.raises(SystemExit):
            main([str(path)])
        assert message in capsys.readouterr().err
