"""The admin API's placement routes (and the CLI's rendering of them) against a real controller
(in-process, fake replicas): two H100s and one L4 serving short requests that one L4 carries."""

from __future__ import annotations

import pytest

from orchestrator.cli._plan_api import render
from orchestrator.request_log import FinishedRequest
from orchestrator.workload_window import WorkloadWindow
from tests.unit.test_admin_api import VIEWER, Fleet


@pytest.fixture
async def fleet():
    f = Fleet()
    await f.settle()
    placement = f.actor.controller.placement
    placement.clock = f.clock  # as the replicas' (the actor's clock is the wall clock)
    placement.window = WorkloadWindow(["m"], started_at=f.clock.now)
    f.clock.now += 300  # a whole window (placement.window_s) of traffic: 64 + 64 tokens at 2 req/s
    placement.record(FinishedRequest("m", f.clock.now - 300 + (i + 1) / 2, 64, 64) for i in range(600))
    yield f
    await f.http.aclose()


async def test_the_plan_explains_the_mix_and_the_move(fleet):
    r = await fleet.call("GET", "/placement/plan", token=VIEWER)
    assert r.status_code == 200, r.text
    plan = r.json()
    assert {p["pool"]: (p["current"], p["planned"]) for p in plan["pools"]} == {"h100": (2, 0), "l4": (1, 1)}
    assert plan["workloads"][0]["requests"] == 600 and plan["workloads"][0]["total_rate"] == pytest.approx(2.2)
    [share] = plan["assignments"]
    assert share["bucket"] == "in[64,128) out[64,128)" and share["pool"] == "l4"
    assert share["reason"] == "fills spare l4 capacity (cheapest per req/s: h100)"  # one L4 is enough
    decision = plan["decision"]
    assert decision["action"] == "change" and decision["reason"].startswith("saves $13.76/h")
    assert decision["drain"] == [{"pool": "h100", "current": 2, "target": 0}] and decision["scale_out"] == []
    assert plan["nodes"]["idle"] == ["node-H100", "node-H100-b", "node-L4-b"]
    text = render(plan)
    assert "decision: change — saves $13.76/h" in text and "then drain: h100 2 -> 0" in text
    assert "in[64,128) out[64,128)" in text and "re-planning off" in text


async def test_apply_moves_the_fleet_once_and_a_retry_replays_the_answer(fleet):
    key = {"Idempotency-Key": "move-to-l4"}
    first = await fleet.call("POST", "/placement/apply", json={}, headers=dict(key))
    assert first.status_code == 200, first.text
    move = first.json()["transition"]
    assert (move["trigger"], move["state"]) == ("operator", "draining")  # the L4 is already up: drains at once
    assert sorted(move["drained"]) == fleet.replica_ids("h100")
    retry = await fleet.call("POST", "/placement/apply", json={}, headers=dict(key))
    assert retry.status_code == 200 and retry.json() == first.json()
    busy = await fleet.call("POST", "/placement/apply", json={})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "placement_in_progress"
    await fleet.settle(2)
    live = [r for r in (await fleet.call("GET", "/replicas", token=VIEWER)).json() if r["state"] == "ready"]
    assert [r["pool"] for r in live] == ["l4"]
    done = (await fleet.call("GET", "/placement/plan", token=VIEWER)).json()
    assert done["transition"]["state"] == "done" and done["decision"]["action"] == "keep"


async def test_no_feasible_plan_is_a_409_naming_the_constraint(fleet):
    r = await fleet.call("GET", "/placement/plan?rate=m:64:64:2000", token=VIEWER)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "placement_infeasible"
    assert error["message"].startswith("no feasible plan: pool limits are too small to meet the SLO: h100 needs")
    r = await fleet.call("GET", "/placement/plan?rate=nope:64:64:2", token=VIEWER)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    r = await fleet.call("POST", "/placement/apply", json={"rate_scale": 1000})
    assert r.status_code == 409 and "h100 needs" in r.json()["error"]["message"]
