"""The migration trace benchmarks' simulator side (a two-replica fleet, 10 s of the trace):
`bench.migration_trace_windows`, windows replayed several times with their arrivals
jittered, migration on against off; and `bench.migration_trace_report --slowest`, a live
run's slowest requests next to the simulator's TTFT for them."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from bench import migration_trace_report as report
from bench.migration_trace_report import LiveRun, simulated_ttfts
from bench.migration_trace_windows import in_window, main, run_window
from bench.report import RequestRecord
from bench.simulator.metrics import summarize
from bench.simulator.scenario import load_scenarios
from bench.simulator.simulation import Simulation

SMALL = """\
name: small
fleet:
  models: [{name: m, arch: llama-2-7b, tokenizer: byte, max_model_len: 8192}]
  pools: [{name: l4, gpu_type: L4, model: m, replicas: 2, min_replicas: 2, max_replicas: 2}]
  server: {admission_timeout_s: 120}
  controller: {control_period_s: 0.5}
workload: {trace: {name: conv, window_s: [1500, 1510], speedup: 0.33}}
simulation: {seed: 7, replica_start_s: 0}
variants:
  migration-on: {hooks: [{name: migration}]}
  migration-off: {fleet: {migration: {enabled: false}}}
"""


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("windows") / "small.yaml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def scenarios(small_path):
    return load_scenarios(small_path)


def test_one_replay_is_the_window_as_the_scenario_plays_it(scenarios):
    row = run_window(scenarios, ["migration-on", "migration-off"], 1500, 10)
    for name in ("migration-on", "migration-off"):
        summary = summarize(Simulation(in_window(scenarios[name], 1500, 10), name).run())
        assert row[name]["ttft_p99_s"] == summary["latency_s"]["ttft"]["p99"]
        assert row[name]["pooled_ttft_p99_s"] == pytest.approx(summary["latency_s"]["ttft"]["p99"])
    assert row["p99_ratio"]["migration-on"] == pytest.approx(
        row["migration-off"]["ttft_p99_s"] / row["migration-on"]["ttft_p99_s"])


def test_jittered_replays_differ_and_their_ratios_are_summarised(scenarios):
    row = run_window(scenarios, ["migration-on", "migration-off"], 1500, 10, draws=3, jitter_s=0.05)
    ratios = row["p99_ratios"]["migration-on"]
    off, on = row["migration-off"], row["migration-on"]
    assert len(ratios) == 3 and len(set(off["ttft_p99s_s"] + on["ttft_p99s_s"])) > 1  # the replays differ
    assert row["p99_ratio"]["migration-on"] == pytest.approx(np.median(ratios))
    assert on["ttft_p99_s"] == pytest.approx(np.median(on["ttft_p99s_s"]))
    assert row["pooled_ratio"]["migration-on"] == pytest.approx(off["pooled_ttft_p99_s"] / on["pooled_ttft_p99_s"])
    # the pooled p99 is a p99 of the mixture: between the replays' own (up to interpolation)
    assert 0.95 * min(on["ttft_p99s_s"]) <= on["pooled_ttft_p99_s"] <= 1.05 * max(on["ttft_p99s_s"])
    # a replay is a pure function of its number
    again = run_window(scenarios, ["migration-on", "migration-off"], 1500, 10, draws=3, jitter_s=0.05)
    assert again["p99_ratios"] == row["p99_ratios"]


def test_the_command_refuses_bad_replay_settings():
    for args in (["--draws", "0"], ["--draws", "2", "--jitter-s", "-1"]):
        with pytest.raises(SystemExit):
            main(args)


def test_the_report_lists_each_run_s_slowest_next_to_the_simulator_s_ttft(small_path, scenarios, tmp_path, capsys):
    simulated = simulated_ttfts(scenarios["migration-on"], "migration-on")
    assert simulated and all(prompt > 0 and ttft > 0 for prompt, ttft in simulated.values())
    # a live run of the same requests whose request 0 took longest: 9 s at time scale 4
    records = tuple(RequestRecord(n, 0.0, 0.0, prompt, 2, (9.0 if n == 0 else 0.4, 9.5), 2, 9.5, 200)
                    for n, (prompt, _) in sorted(simulated.items()))
    run = LiveRun("migration-on", 1, 4.0, records, 0, {}, 0.8, 0.5, 10.0, 1.0, ())
    result = tmp_path / "run.json"
    result.write_text(json.dumps({"live": {"runs": [asdict(run)]}}))
    assert report.main([str(result), "--slowest", "2", "--scenario", str(small_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    title = lines.index("migration-on #1: the 2 slowest requests (seconds of the simulated GPU)")
    first = lines[title + 2].split()
    assert first[0] == "0" and first[3] == "2.25s" and first[4] == f"{simulated[0][1]:.2f}s"
    with pytest.raises(SystemExit):
        report.main([str(result), "--slowest", "-1"])
