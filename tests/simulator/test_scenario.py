"""Scenario files: every bundled one loads, bad ones are refused naming the field, and
variants merge into the base (sections merge; lists and open maps replace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.simulator.scenario import ScenarioError, load_scenarios, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"

BASE = {
    "name": "t",
    "fleet": {
        "models": [{"name": "m", "arch": "llama-2-7b", "max_model_len": 2048}],
        "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2}],
    },
    "workload": {"trace": {"name": "conv", "window_s": [0, 10]}},
}


def with_(path: str, value) -> dict:
    """BASE with the value at a dotted path (list indices as ints) replaced."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[last] = value
    if path == "fleet.pools.0.engine":  # a vllm pool needs a checkpoint path to be a valid fleet
        data["fleet"]["models"][0]["path"] = "/nonexistent/checkpoint"
    return data


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_scenario_loads(path):
    assert load_scenarios(path)


@pytest.mark.parametrize("path, value, message", [
    ("fleet.pools.0.gpu_type", "B300", "fleet.pools[0].gpu_type: unknown GPU type 'B300'"),
    ("fleet.pools.0.engine", "vllm", "fleet.pools[0].engine: the simulator runs sim engines only"),
    ("workload.trace.name", "nope", "workload.trace.name: unknown trace 'nope'"),
    ("workload.trace.speedup", 0, "workload.trace.speedup: Input should be greater than 0"),
    ("workload.trace.jitter_s", -0.01, "workload.trace.jitter_s: Input should be greater than or equal to 0"),
    ("workload.model", "other", "workload.model: no model 'other'"),
    ("workload.slo_mix", {"gold": 1.0}, "workload.slo_mix: unknown SLO class(es) ['gold']"),
    ("routing", {"weights": {"psychic": 1}}, "routing.weights: Value error, unknown scorer(s) ['psychic']"),
    ("hooks", [{"name": "telepathy"}], "hooks[0].name: Value error, no hook named 'telepathy'"),
    ("timeline", [{"at": 5, "kill_replica": "l4-0"}], "timeline[0].kill_replica: no pool 'l4'"),
    ("timeline", [{"at": 5, "kill_replica": "h100-0", "drain": "h100-1"}], "does exactly one thing"),
    ("simulation.gpus_per_node", 0, "simulation.gpus_per_node: Input should be greater than or equal to 1"),
    ("surprise", 1, "surprise: Extra inputs are not permitted"),
])
def test_bad_scenarios_are_refused_naming_the_field(path, value, message):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(with_(path, value))
    assert message.replace("Value error, ", "") in str(info.value)


def test_variants_merge_sections_and_replace_lists_and_weights(tmp_path):
    data = dict(BASE, routing={"weights": {"prefix": 3, "load": 2}},
                variants={"same": {}, "rr": {"routing": {"weights": {"round_robin": 1}, "load_guard": 1.0}},
                          "bigger": {"fleet": {"pools": [{"name": "a40", "gpu_type": "A40", "model": "m",
                                                          "replicas": 3, "max_replicas": 3}]}}})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    scenarios = load_scenarios(path)
    assert list(scenarios) == ["same", "rr", "bigger"]
    assert scenarios["same"].routing.weights == {"prefix": 3, "load": 2}
    assert scenarios["rr"].routing.weights == {"round_robin": 1} and scenarios["rr"].routing.load_guard == 1.0
    assert [p.name for p in scenarios["bigger"].fleet.pools] == ["a40"]
    assert scenarios["bigger"].fleet.models == scenarios["same"].fleet.models


def test_a_bad_variant_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, variants={"broken": {"simulation": {"seed": "x"}}})))
    with pytest.raises(ScenarioError, match=r"variant broken.*\n  simulation.seed"):
        load_scenarios(path)
