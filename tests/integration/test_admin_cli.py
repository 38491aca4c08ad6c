"""The `flotilla` CLI through the admin API of a running fleet on a multi-node Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.integration.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, wait_for

pytestmark = pytest.mark.ray


def flotilla(fleet, *args: str, token: str = OPERATOR_TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--url", fleet.base_url, "--token", token],
                          capture_output=True, text=True, timeout=120)


def test_the_admin_api_is_served_with_its_spec(fleet):
    spec = httpx.get(f"{fleet.base_url}/admin/v1/openapi.json", timeout=30).json()
    assert "/replicas/{replica_id}/drain" in spec["paths"]
    r = httpx.get(f"{fleet.base_url}/admin/v1/fleet", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_status_and_replicas_as_json_and_as_tables(fleet):
    status = json.loads(flotilla(fleet, "status", "--json", token=VIEWER_TOKEN).stdout)
    assert {p["name"]: p["ready"] for p in status["fleet"]["pools"]} == {"cpu": 2, "h100": 2, "l4": 2, "slow": 1}
    table = flotilla(fleet, "status", token=VIEWER_TOKEN).stdout
    assert "POOL" in table and "h100" in table and "$/H" in table
    replicas = json.loads(flotilla(fleet, "replicas", "--pool", "h100", "--json").stdout)
    assert [r["gpu_type"] for r in replicas if r["state"] == "ready"] == ["H100", "H100"]


def test_requests_in_flight_are_listed(fleet):
    with httpx.stream("POST", f"{fleet.base_url}/v1/completions", timeout=120, json={
            "model": "sim-llama-7b", "prompt": "a long one", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}) as stream:
        lines = stream.iter_lines()  # held: a dropped iterator closes the response, and the server aborts
        next(line for line in lines if line.startswith("data:"))
        listed = wait_for(lambda: json.loads(flotilla(fleet, "requests", "--json").stdout), timeout_s=30,
                          what="the request to be listed")
    [request] = [r for r in listed if r["max_tokens"] == 2000]
    assert request["running"] and request["replica_id"].startswith(("h100", "l4"))


def test_viewer_cannot_act_and_errors_are_clear(fleet):
    denied = flotilla(fleet, "drain", "nope", token=VIEWER_TOKEN)
    assert denied.returncode == 1 and "403 forbidden" in denied.stderr
    missing = flotilla(fleet, "drain", "nope")
    assert missing.returncode == 1 and "404 not_found: no live replica 'nope'" in missing.stderr


def test_the_migration_plan_is_shown(fleet):
    plan = json.loads(flotilla(fleet, "migrate", "--plan", "--json", token=VIEWER_TOKEN).stdout)
    assert plan["planned_at"] is not None and plan["moves_started"] <= plan["moves_planned"]
    shown = flotilla(fleet, "migrate", "--plan", token=VIEWER_TOKEN)
    assert shown.returncode == 0 and "move(s) planned" in shown.stdout  # a table for a person


def test_drain_replaces_a_replica_and_cordon_round_trips(fleet):
    victim = fleet.replicas("l4")[0]
    drained = json.loads(flotilla(fleet, "drain", victim.replica_id, "--json").stdout)
    assert drained["state"] == "draining"
    wait_for(lambda: len(fleet.replicas("l4")) == 2 and victim.replica_id not in
             {r.replica_id for r in fleet.replicas("l4")}, timeout_s=60, what="a replacement for the drained replica")
    node = victim.node_id
    cordoned = json.loads(flotilla(fleet, "cordon", node, "--json").stdout)
    assert cordoned["cordoned"] is True
    assert json.loads(flotilla(fleet, "uncordon", node, "--json").stdout)["cordoned"] is False
