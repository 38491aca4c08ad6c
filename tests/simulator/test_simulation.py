"""Whole simulations: determinism, request accounting, faults and recovery, the control
hooks' actions, every routing policy, admission limits, and the CLI's outputs."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from bench.simulator.hooks import Actions, Tick
from bench.simulator.metrics import summarize
from bench.simulator.simulation import Simulation
from orchestrator.cli import main as flotilla
from tests.simulator.conftest import scenario


def run(s, hooks=()):
    result = Simulation(s, hooks=hooks).run()
    return result, summarize(result)


def columns(result, *names):
    return {n: result.records.column(n) for n in names}


def test_a_run_is_a_pure_function_of_its_scenario():
    first, _ = run(scenario())
    again, _ = run(scenario())
    for name in ("number", "ttft_s", "tpot_s", "e2e_s", "cached_tokens", "replica"):
        assert np.array_equal(first.records.column(name), again.records.column(name), equal_nan=True)
    other, _ = run(scenario(simulation={"seed": 6, "replica_start_s": 10}))
    assert not np.array_equal(first.records.labelled("slo_class"), other.records.labelled("slo_class"))


def test_a_run_leaves_the_garbage_collector_as_it_found_it():
    before = gc.get_threshold(), gc.get_freeze_count()
    run(scenario())
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_every_request_ends_once_with_sane_latencies():
    result, summary = run(scenario())
    n = sum(1 for _ in Simulation(scenario()).workload.arrivals())
    numbers = np.sort(result.records.column("number"))
    assert np.array_equal(numbers, np.arange(n))
    assert summary["requests"]["completed"] == n
    c = columns(result, "ttft_s", "e2e_s", "queue_s", "tpot_s")
    assert (c["ttft_s"] > 0).all() and (c["e2e_s"] >= c["ttft_s"]).all() and (c["queue_s"] >= 0).all()
    lat = summary["latency_s"]["tpot"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] < 0.5
    assert summary["cost"]["usd"] > 0 and summary["energy"]["kwh"] > 0
    assert summary["simulator"]["engine_steps"] > summary["simulator"]["events"] / 10


def test_a_killed_replica_s_requests_resume_elsewhere_and_the_pool_recovers():
    s = scenario(timeline=[{"at": 5, "kill_replica": "h100-0"}],
                 simulation={"seed": 5, "replica_start_s": 3})
    result, summary = run(s)
    (fault,) = summary["disruptions"]["faults"]
    assert fault["replicas_lost"] == ["h100-0"] and fault["requests_interrupted"] > 0
    assert fault["resumed"] == fault["requests_interrupted"] and fault["failed"] == 0
    assert 0 < fault["requests_recovered_after_s"] < 5
    assert 3 <= fault["pools_restored_after_s"] <= 4  # launched at the next tick, up 3 s later
    assert summary["requests"]["completed"] == summary["requests"]["total"]
    c = columns(result, "resumes", "stall_s")
    assert c["resumes"].sum() == fault["requests_interrupted"] and (c["stall_s"][c["resumes"] > 0] > 0).all()
    assert "h100-4" not in result.records.labels("replica") and "h100-2" in result.records.labels("replica")


def test_a_node_death_takes_its_replicas_and_is_noticed_after_detect_s():
    s = scenario(timeline=[{"at": 8, "kill_node": "h100-node-0", "detect_s": 2.0}],
                 simulation={"seed": 5, "replica_start_s": 10, "gpus_per_node": 2})
    result, summary = run(s)
    (fault,) = summary["disruptions"]["faults"]
    assert sorted(fault["replicas_lost"]) == ["h100-0", "h100-1"] and fault["requests_interrupted"] > 0
    assert fault["requests_recovered_after_s"] >= 2.0
    assert summary["requests"]["failed"] == 0


def test_scaling_and_draining_on_the_timeline():
    s = scenario(timeline=[{"at": 5, "set_replicas": {"pool": "a40", "replicas": 4}},
                           {"at": 6, "drain": "h100-1"}])
    result, summary = run(s)
    sim_pools = {u.pool: u for u in result.usage}
    assert sim_pools["a40"].gpu_hours > sim_pools["h100"].gpu_hours  # two more A40s from ~15 s on
    assert summary["requests"]["completed"] == summary["requests"]["total"]


class Mover:
    """A test hook: at one tick, moves the first running request it sees to another replica,
    scales a pool and drains a replica; records what it observed."""

    observes_requests = True

    def __init__(self):
        self.moved: list[tuple[str, str, bool]] = []
        self.events: list[str] = []
        self.ticks = 0

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        self.ticks += 1
        if self.moved or tick.now < 4:
            return
        held = tick.requests()
        source = next(rid for rid, reqs in held.items() if any(r.running for r in reqs))
        request = next(r for r in held[source] if r.running)
        target = next(r.replica_id for r in tick.view.replicas if r.replica_id != source)
        self.moved.append((request.request_id, target, actions.migrate(request.request_id, target)))
        assert not actions.migrate("no-such-request", target)
        actions.set_replicas("a40", 3)
        actions.drain(source)

    def on_event(self, event, tick: Tick, actions: Actions) -> None:
        self.events.append(event.kind)


def test_hooks_see_ticks_and_events_and_act_through_actions():
    hook = Mover()
    s = scenario(timeline=[{"at": 7, "power": {"budget_watts": 2000}}])
    result, summary = run(s, hooks=[hook])
    (request_id, target, moved), = hook.moved
    assert moved and hook.events == ["power"] and hook.ticks > 10
    number = int(request_id[1:])
    row = int(np.flatnonzero(result.records.column("number") == number)[0])
    assert result.records.column("migrations")[row] == 1
    assert result.records.labelled("replica")[row] == target
    assert summary["disruptions"]["migrations"] == 1
    assert summary["requests"]["completed"] == summary["requests"]["total"]


class CopyMover:
    """A test hook: at one tick, moves the longest running request, copying its KV for
    `copy_s` first (None: the naive, immediate move)."""

    observes_requests = True

    def __init__(self, copy_s: float | None):
        self.copy_s = copy_s
        self.moved: list[tuple[str, str, bool]] = []

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        if self.moved or tick.now < 4:
            return
        source, request = max(((rid, r) for rid, reqs in tick.requests().items() for r in reqs if r.running),
                              key=lambda p: (p[1].prompt_tokens + p[1].output_tokens, p[1].request_id))
        target = next(r.replica_id for r in tick.view.replicas if r.replica_id != source and r.pool == "h100")
        self.moved.append((request.request_id, target, actions.migrate(request.request_id, target, self.copy_s)))

    def on_event(self, event, tick: Tick, actions: Actions) -> None:
        """No timeline events in its scenario."""


def test_a_kv_copy_move_stalls_its_stream_less_than_recomputing_the_context():
    stalls = {}
    for copy_s in (None, 0.2):
        hook = CopyMover(copy_s)
        result, summary = run(scenario(), hooks=[hook])
        (request_id, target, moved), = hook.moved
        row = int(np.flatnonzero(result.records.column("number") == int(request_id[1:]))[0])
        assert moved and result.records.column("migrations")[row] == 1
        assert result.records.labelled("replica")[row] == target
        assert summary["requests"]["completed"] == summary["requests"]["total"]
        stalls[copy_s] = result.records.column("stall_s")[row]
    assert 0 < stalls[0.2] < stalls[None]  # the copied blocks are loaded, not recomputed


def test_the_migration_hook_names_an_unknown_mechanism():
    from bench.simulator.migration import MigrationHook
    from orchestrator.config import parse_config

    config = parse_config({"models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte"}],
                           "pools": [{"name": "p", "gpu_type": "H100", "model": "m"}]})
    with pytest.raises(ValueError, match="mechanism must be one of"):
        MigrationHook({"mechanism": "teleport"}, config)


@pytest.mark.parametrize("routing", [None, {"weights": {"load": 1}}, {"weights": {"kv": 1}},
                                     {"weights": {"slo_fit": 1}}, {"weights": {"prefix": 1}},
                                     {"weights": {"round_robin": 1}, "load_guard": 1.0},
                                     {"weights": {"random": 1}, "load_guard": 1.0}])
def test_every_routing_policy_serves_the_workload(routing):
    workload = {"synthetic": {"rate": 15, "duration_s": 20, "prompt": {"median": 600, "sigma": 0.5, "max": 2000},
                              "output": {"median": 60, "sigma": 0.5, "max": 300}},
                "prefixes": {"groups": 3, "tokens": 512, "share": 0.9}}
    result, summary = run(scenario(workload=workload, **({"routing": routing} if routing else {})))
    assert summary["requests"]["completed"] == summary["requests"]["total"] > 200
    used = set(result.records.labelled("replica"))
    if routing is not None and ("round_robin" in routing["weights"] or "random" in routing["weights"]):
        assert len(used) == 4  # blind to speed: the A40s get their share
    if routing is None or "prefix" in routing["weights"]:
        assert summary["prefix_cache_hit"] > 0.3


def test_round_robin_takes_turns_over_the_replicas():
    result, _ = run(scenario(routing={"weights": {"round_robin": 1}, "load_guard": 1.0}))
    order = np.argsort(result.records.column("number"))
    replicas = result.records.labelled("replica")[order][:40]
    assert all(replicas[i] != replicas[i + 1] for i in range(len(replicas) - 1))


def test_a_full_fleet_rejects_after_the_admission_timeout():
    fleet = {"models": [{"name": "m", "arch": "llama-2-7b", "max_model_len": 1024}],
             "pools": [{"name": "l4", "gpu_type": "L4", "model": "m", "replicas": 1, "max_queue": 2,
                        "engine_args": {"max_num_seqs": 2, "kv_scale": 0.1}}],
             "server": {"admission_timeout_s": 0.5}}
    workload = {"synthetic": {"rate": 40, "duration_s": 3, "prompt": {"median": 200, "sigma": 0.1, "max": 800},
                              "output": {"median": 200, "sigma": 0.1, "max": 300}}}
    result, summary = run(scenario(fleet=fleet, workload=workload))
    assert summary["requests"]["rejected"] > 0 and summary["requests"]["completed"] > 0
    rejected = result.records.labelled("status") == "rejected"
    assert np.isnan(result.records.column("ttft_s")[rejected]).all()
    waited = result.records.column("e2e_s")  # NaN for rejected ones: they never ran
    assert np.isnan(waited[rejected]).all()


def test_flotilla_simulate_writes_records_summary_and_plots(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(scenario().model_dump(mode="json") | {
        "variants": {"a": {}, "b": {"routing": {"weights": {"random": 1}, "load_guard": 1.0}}}}))
    assert flotilla(["simulate", str(path), "--out", str(tmp_path / "out"), "--variant", "b"]) == 0
    out = tmp_path / "out" / "test"
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "records-b.csv", "summary.json",
                                                     "summary.png", "timeline.png"]
    (summary,) = json.loads((out / "summary.json").read_text())
    rows = (out / "records-b.csv").read_text().splitlines()
    assert len(rows) == summary["requests"]["total"] + 1 and rows[0].startswith("number,arrival_s")
    assert "[b]" in capsys.readouterr().out
    assert flotilla(["simulate", str(path), "--variant", "c"]) == 2


def test_naming_blocks_lazily_changes_no_result(monkeypatch):
    """Without shared prefixes the engines name their blocks lazily (`unique_prompts`, for
    speed); a small KV cache forces preemptions, which must publish what they hold. Every
    record must equal the eager run's."""
    from bench.simulator import fleet as sim_fleet

    tight = scenario(fleet={
        "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096}],
        "pools": [{"name": "a40", "gpu_type": "A40", "model": "m", "replicas": 1, "max_replicas": 1,
                   "engine_args": {"num_blocks": 300}}],
        "routing": {"weights": {"load": 1}},
        "controller": {"control_period_s": 0.5},
    })
    lazy = Simulation(tight)
    assert lazy.fleet.unique_prompts
    lazy_result = lazy.run()
    eager_only = property(lambda self: False, lambda self, value: None)
    monkeypatch.setattr(sim_fleet.SimFleet, "unique_prompts", eager_only, raising=False)
    eager = Simulation(tight)
    assert not eager.fleet.unique_prompts
    eager_result = eager.run()
    assert summarize(lazy_result)["disruptions"]["preemptions"] > 0
    for name in ("number", "ttft_s", "tpot_s", "e2e_s", "cached_tokens", "replica"):
        assert np.array_equal(lazy_result.records.column(name), eager_result.records.column(name), equal_nan=True)
