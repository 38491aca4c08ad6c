"""Power in the simulator: per-replica power states, the draw of bulk decode runs, caps that
slow a replica from the next step, and the power hook holding a budget that the same
fleet without it exceeds."""

from __future__ import annotations

import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.engines.sim_core import SimScheduler
from actors.power import PowerState, SimPowerBackend
from bench.simulator.metrics import summarize
from bench.simulator.power import PowerKind, ReplicaPowerTimer
from bench.simulator.simulation import Simulation
from policies.perfmodel import MODEL_PRESETS, StepTimeModel, gpu_spec
from policies.power_model import capped_step
from tests.simulator.conftest import scenario

H100 = StepTimeModel(gpu_spec("H100"), MODEL_PRESETS["llama-2-7b"])
LOAD = [(600, 120), (1500, 40), (900, 300), (2000, 80), (300, 200), (1200, 150)]  # (prompt, output) tokens


def requests():
    return [GenerationRequest(f"r{i}", "m", tuple(range(7 + i, 7 + i + p)), SamplingSpec(max_tokens=n))
            for i, (p, n) in enumerate(LOAD)]


class ExactTimer:
    """Every step timed by the power model one by one, its energy summed."""

    def __init__(self):
        self.joules = 0.0

    def step_time(self, batch):
        step = capped_step(H100, batch)
        self.joules += step.seconds * step.watts
        return step.seconds


def virtual_replica():
    core = SimScheduler(H100, "m", num_blocks=4096, block_size=16)
    state = PowerState(H100, clock=lambda: core.clock_s, window_s=0.5)
    timer = ReplicaPowerTimer(PowerKind(H100, 4096), state, lambda: core.clock_s)
    core.use_virtual_time(timer)
    for r in requests():
        core.add(r)
    return core, timer


def run_virtual(core, timer, until, dt=0.37) -> float:
    """Advance in host-sized chunks, accounting each, as a simulated replica does; the busy seconds."""
    t, busy = core.clock_s, 0.0
    while t < until and core.has_work:
        t += dt
        progress = core.advance(t)
        timer.account(progress, core.has_work, t)
        busy += progress.busy_s
    return busy


def test_bulk_decode_runs_draw_what_their_steps_would_one_by_one():
    exact = ExactTimer()
    live = SimScheduler(exact, "m", num_blocks=4096, block_size=16)
    for r in requests():
        live.add(r)
    while live.has_work:
        live.step()
    core, timer = virtual_replica()
    assert run_virtual(core, timer, until=60.0) == pytest.approx(live.clock_s, rel=1e-9)  # the same steps
    assert timer.busy_j == pytest.approx(exact.joules, rel=0.01)  # decode draw taken at 1k tokens/seq


def test_a_cap_slows_the_steps_after_it_and_lowers_the_draw_at_once():
    free_core, free_timer = virtual_replica()
    free_busy = run_virtual(free_core, free_timer, until=60.0)
    core, timer = virtual_replica()
    busy = run_virtual(core, timer, until=0.74)
    before = timer.state.draw_w()
    SimPowerBackend(timer.state).set_power_limit(0, 250)
    core.replan()  # the decode run planned uncapped is dropped
    busy += run_virtual(core, timer, until=1.48)
    assert timer.state.draw_w() < 0.6 * before
    busy += run_virtual(core, timer, until=60.0)
    assert busy > 1.02 * free_busy
    assert timer.busy_j < 0.9 * free_timer.busy_j  # less energy, spread over a longer time


def test_without_replan_a_decode_run_keeps_its_uncapped_pace():
    free_core, free_timer = virtual_replica()
    run_virtual(free_core, free_timer, until=0.5)
    core, timer = virtual_replica()
    run_virtual(core, timer, until=0.5)
    SimPowerBackend(timer.state).set_power_limit(0, 250)
    assert core.next_change_s() == free_core.next_change_s()  # why apply_power replans


FLEET = {
    "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 4, "max_replicas": 4}],
    "controller": {"control_period_s": 0.5},
    "power": {"cluster_budget_w": 1900, "oversubscription": 1.5, "high_priority_cap_fraction": 0.6},
}
CODE = {"trace": {"name": "code", "window_s": [0, 300], "speedup": 6}, "slo_mix": {"interactive": 0.7, "batch": 0.3}}


def test_the_power_hook_holds_a_budget_the_uncapped_fleet_exceeds():
    uncapped = summarize(Simulation(scenario(fleet=FLEET, workload=CODE)).run())["power"]
    sim = Simulation(scenario(fleet=FLEET, workload=CODE, hooks=[{"name": "power"}]))
    capped = summarize(sim.run())["power"]
    assert uncapped["time_above_budget_s"] > 1.0
    assert capped["above_budget_beyond_one_period_s"] < uncapped["above_budget_beyond_one_period_s"]
    assert capped["time_above_budget_s"] < uncapped["time_above_budget_s"] / 2
    assert [level for _, _, level in sim.hooks[0].escalations].count("cap") >= 1


def test_a_power_event_lowers_the_budget_the_hook_defends():
    timeline = [{"at": 20, "power": {"budget_watts": 1000}}]
    sim = Simulation(scenario(fleet=FLEET, workload=CODE, timeline=timeline, hooks=[{"name": "power"}]))
    result = sim.run()
    assert {s.budget_w for s in result.samples if s.t >= 20} == {1000}
    assert sim.hooks[0].budgets[("cluster", "")] == 1000
    late = [s.power_w for s in result.samples if s.t >= 25]
    assert max(late) < max(s.power_w for s in result.samples if s.t < 20)
