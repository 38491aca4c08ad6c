"""`bench.time_scale.slowed`: the live benchmarks' slow-motion fleet (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.simulator.scenario import load_scenarios
from bench.time_scale import slowed

SCENARIO = Path(__file__).resolve().parents[2] / "bench" / "scenarios" / "migration_trace.yaml"


def test_engines_run_slower_and_request_durations_grow_as_much():
    fleet = load_scenarios(SCENARIO)["migration-on"].fleet
    slow = slowed(fleet, 4.0)
    assert [pool.engine_args["time_scale"] for pool in slow.pools] == [4.0] * len(fleet.pools)
    assert slow.server.admission_timeout_s == 4 * fleet.server.admission_timeout_s
    assert slow.migration.cooldown_s == 4 * fleet.migration.cooldown_s
    assert slow.migration.timeout_s == 4 * fleet.migration.timeout_s
    # how stale the controller's and the routers' view is, in the GPU's seconds, stays the scenario's
    assert slow.controller.control_period_s == 4 * fleet.controller.control_period_s
    assert slow.power.control_period_s == 4 * fleet.power.control_period_s  # the tick is the shorter
    assert slow.routing.share_interval_s == 4 * fleet.routing.share_interval_s
    assert slow.routing.booking_ttl_s == 4 * fleet.routing.booking_ttl_s
    # durations about this machine, not the fleet, stay
    assert slow.controller.stats_timeout_s == fleet.controller.stats_timeout_s
    assert slow.controller.replica_start_timeout_s == fleet.controller.replica_start_timeout_s
    assert slow.routing.weights == fleet.routing.weights
    assert all("time_scale" not in pool.engine_args for pool in fleet.pools)  # the original is untouched


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_a_scale_that_is_not_positive_is_refused(scale):
    fleet = load_scenarios(SCENARIO)["migration-on"].fleet
    with pytest.raises(ValueError, match="time_scale"):
        slowed(fleet, scale)
