"""`flotilla bench`: lists every benchmark module with its one-line purpose, refuses unknown ones."""

from orchestrator.cli import main
from orchestrator.cli.bench import benchmarks


def test_every_benchmark_is_listed_with_what_it_measures(capsys):
    known = benchmarks()
    assert {"serving_overhead", "chaos", "migration_downtime", "kvstore_ttft", "placement_cost",
            "power_oversubscription", "calibration"} <= known.keys()
    assert all(what for what in known.values())  # each states its purpose
    assert "loadgen" not in known and "time_scale" not in known  # helpers are not benchmarks
    assert main(["bench"]) == 0
    assert "routing_decision_time" in capsys.readouterr().out


def test_an_unknown_benchmark_is_refused_by_name(capsys):
    assert main(["bench", "nope"]) == 2
    assert "no benchmark 'nope'" in capsys.readouterr().err
