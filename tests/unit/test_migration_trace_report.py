"""The live trace benchmark's bookkeeping: the migrations counter read off /metrics and
pooled per configuration (no fleet: the exposition text and the records are literal)."""

from __future__ import annotations

from bench.migration_fleet import counter_series
from bench.migration_trace_report import LiveRun, summarize_live
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


def test_a_configuration_counts_the_migrations_that_ended_done():
    record = RequestRecord(0, 0.0, 0.0, 8, 2, (0.4, 0.5), 2, 0.5, 200)
    moves = counter_series(EXPOSITION, "flotilla_migrations_total", ("reason", "outcome"))
    run = LiveRun("migration-on", 1, 4.0, (record,), 0, moves, 0.8, 0.5, 10.0, 1.0, ())
    (row,) = summarize_live([run])
    assert row["migrations_done"] == 70
    assert row["ttft_p99_s"] == 0.1  # 0.4 s measured at time scale 4
