"""Calibration, small: the same 30 s trace slice through the live system (Ray Serve over
HTTP, sim engines sleeping their modelled step times) and through the simulator. Loose
bounds on side-by-side ratios: the live path adds per-request and per-token overhead
the simulator does not model, measured here and reported by `bench.calibration`."""

from __future__ import annotations

import pytest

from bench import calibration
from bench.simulator.scenario import load_scenarios
from bench.simulator.simulation import Simulation

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_simulated_latencies_track_the_live_system():
    scenario = calibration.with_window(next(iter(load_scenarios(calibration.SCENARIO).values())), 30.0)
    plan = calibration.plan_of(scenario)
    live, overhead = calibration.replay_live(scenario, plan, progress=lambda _: None)
    table = calibration.compare(live, Simulation(scenario).run(), overhead)
    assert table["requests"] == {"live_ok": len(plan), "live_sent": len(plan), "sim_ok": len(plan)}
    assert abs(table["tpot_p50"]["diff_pct"]) < 35
    assert overhead.ttft_s > 0  # the live path costs something; the simulator leaves it out
    assert abs(table["ttft_p50"]["diff_with_overhead_pct"]) < 60
