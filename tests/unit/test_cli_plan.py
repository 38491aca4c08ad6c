"""`flotilla plan` end to end on a small trace file: the table, JSON, bad input, no plan."""

from __future__ import annotations

import argparse
import json

import pytest

from orchestrator.cli import main
from orchestrator.cli.plan import gpu_choices, parse_slo


@pytest.fixture
def trace(tmp_path):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:00:{s:02d}.0000000,{200 if s % 3 else 6000},{150 if s % 3 else 20}"
             for s in range(60)]
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_plan_prints_the_mix_and_the_assignment(trace, capsys):
    code = main(["plan", "--trace", trace, "--slo", "ttft=2,tpot=0.1", "--gpus", "L4,A100-80GB,H100",
                 "--rate-scale", "20"])
    out = capsys.readouterr().out
    assert code == 0
    assert "status: optimal" in out and "total $" in out and "cheapest single GPU type" in out
    assert "in[4096,8192) out[16,32)" in out and "in[128,256) out[128,256)" in out


def test_plan_json_has_the_plan_and_the_workload(trace, capsys):
    assert main(["plan", "--trace", trace, "--slo", "ttft=2,tpot=0.1", "--gpus", "H100",
                 "--form", "sliced", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["form"] == "sliced" and doc["plan"]["status"] == "optimal"
    assert doc["workload"]["requests"] == 60 and doc["single_type"]["single_type"] == "H100"


def test_plan_without_a_feasible_mix_exits_1_and_names_the_bucket(trace, capsys):
    code = main(["plan", "--trace", trace, "--slo", "ttft=0.1,tpot=0.1", "--gpus", "L4"])
    out = capsys.readouterr().out
    assert code == 1
    assert "no plan meets the SLO" in out and "bucket in[4096,8192) out[16,32)" in out


def test_bad_arguments_are_named(trace, capsys):
    assert main(["plan", "--trace", trace, "--slo", "ttft=1,tpot=0.1", "--gpus", "V100"]) == 2
    assert "unknown GPU type 'V100'" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError, match="ttft=SECONDS"):
        parse_slo("ttft=1")
    assert gpu_choices("H100,A100-80GB:2") == [("H100", 1), ("A100-80GB", 2)]


def test_with_a_trace_the_slo_is_required_and_the_fleet_flags_are_refused(trace, capsys):
    assert main(["plan", "--trace", trace]) == 2
    assert main(["plan", "--trace", trace, "--slo", "ttft=1,tpot=0.1", "--apply"]) == 2
    assert "with --trace, --slo is required and --apply/--rate do not apply" in capsys.readouterr().err


def test_without_a_trace_it_asks_the_running_fleet(capsys):
    assert main(["plan", "--url", "http://127.0.0.1:9", "--token", "t" * 20]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
