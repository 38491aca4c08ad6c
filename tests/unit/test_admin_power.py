"""The admin API's power routes against a real controller (in-process, fake replicas)."""

from __future__ import annotations

import pytest

from tests.unit.test_admin_api import VIEWER, Fleet


@pytest.fixture
async def fleet():
    f = Fleet()
    f.actor.controller.power.clock = f.clock  # the fake replicas stamp their readings with it
    await f.settle()
    f.clock.now += 1.0  # a power control period is due, now that the replicas serve
    await f.settle(1)
    yield f
    await f.http.aclose()


async def test_power_shows_every_gpu_and_budget(fleet):
    power = (await fleet.call("GET", "/power", token=VIEWER)).json()
    assert power["level"] == "normal" and power["backend"] == "sim"
    assert sorted(g["gpu_type"] for g in power["gpus"]) == ["H100", "H100", "L4"]
    h100 = next(g for g in power["gpus"] if g["gpu_type"] == "H100")
    assert h100["draw_w"] == 70 and h100["limit_w"] == 700 and h100["headroom_w"] == 630
    assert power["budgets"] == [] and (await fleet.call("GET", "/power/budget", token=VIEWER)).json() == []


async def test_a_budget_the_fleet_cannot_fit_is_refused_with_the_reason(fleet):
    r = await fleet.call("PUT", "/power/budget", json={"watts": 100})
    assert r.status_code == 409  # the body is valid; the fleet deployed now cannot fit it
    assert r.json()["error"]["code"] == "power_budget_refused"
    assert "below the idle draw of its 3 GPUs (156 W)" in r.json()["error"]["message"]
    r = await fleet.call("PUT", "/power/budget", json={"watts": 2000})
    assert r.status_code == 200 and r.json()["budget_w"] == 2000 and r.json()["source"] == "operator"
    r = await fleet.call("PUT", "/power/budget", json={"watts": 1400, "kind": "node", "name": "node-H100"})
    assert r.status_code == 200 and r.json()["scope"] == "node:node-H100"
    r = await fleet.call("PUT", "/power/budget", json={"watts": 900, "kind": "cluster", "name": "x"})
    assert r.status_code == 422
    budgets = (await fleet.call("GET", "/power/budget", token=VIEWER)).json()
    assert [(b["scope"], b["budget_w"]) for b in budgets] == [("cluster", 2000), ("node:node-H100", 1400)]


async def test_a_cap_outside_the_gpus_range_is_refused_naming_the_range(fleet):
    replica = fleet.replica_ids("h100")[0]
    r = await fleet.call("PUT", f"/replicas/{replica}/power-cap", json={"watts": 100})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "power limit 100 W is outside H100's supported range 200-700 W"
    r = await fleet.call("PUT", f"/replicas/{replica}/power-cap", json={"watts": 300})
    assert r.status_code == 200 and r.json()["pinned_limit_w"] == 300
    assert r.json()["limit_range_w"] == [200, 700]
    r = await fleet.call("DELETE", f"/replicas/{replica}/power-cap")
    assert r.status_code == 200 and r.json()["pinned_limit_w"] is None
    assert (await fleet.call("PUT", "/replicas/h100-nope/power-cap", json={"watts": 300})).status_code == 404
