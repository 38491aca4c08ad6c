"""Fault recovery on the session's multi-node fleet, one detection path per test.

Each test breaks one thing for real (a replica actor, an engine, a router agent, the
controller, a whole node) and checks what the client saw (the stream, token for token,
against the fault-free run) and what the fleet did (the fault log, the replacement).
They run after every other test (`chaos` marker, see conftest): the node test removes
a node of the session's cluster.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray

from actors.replica_spec import replica_actor_name
from actors.router_client import RouterClient
from orchestrator.controller_client import CONTROLLER_NAME
from tests.integration.conftest import OPERATOR_TOKEN, run_async, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.chaos]

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
# long enough to live through a fault on either GPU type (H100 is the fast one)
SIM_BODY = {"model": "sim-llama-7b", "prompt": "fault tolerant " * 20, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True}


def admin(fleet, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{fleet.base_url}/admin/v1{path}", headers=ADMIN, timeout=30, **kwargs)


def listing(fleet, path: str) -> list[dict]:
    """GET a list from the admin API; empty while it answers 503 (its controller is busy
    or restarting and says to retry), so a `wait_for` over it tries again."""
    r = admin(fleet, "GET", path)
    if r.status_code == 503:
        return []
    assert r.status_code == 200, r.text
    return r.json()


def whole_text(fleet, body: dict) -> str:
    r = httpx.post(f"{fleet.base_url}/v1/completions", json={**body, "stream": False}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_through(fleet, body: dict, fault) -> tuple[str, str, str]:
    """Stream `body`; once its first chunk is in and its replica known, call `fault(replica_id)`.

    Returns the whole streamed text, the request id and the replica that served it first.
    Every chunk must be a completion chunk: an error event fails the test.
    """
    chunks: list[dict] = []
    with httpx.stream("POST", f"{fleet.base_url}/v1/completions", json={**body, "stream": True},
                      timeout=300) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line.startswith("data: {"))
        chunks.append(json.loads(next(lines)[6:]))
        request_id = chunks[0]["id"]
        listed = wait_for(lambda: [r for r in listing(fleet, "/requests")
                                   if r["request_id"] == request_id], timeout_s=20, what="the request to be listed")
        source = listed[0]["replica_id"]
        fault(source)
        chunks += [json.loads(line[6:]) for line in lines]
    assert all("error" not in c for c in chunks), [c for c in chunks if "error" in c]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks), request_id, source


def fault_of(fleet, target: str, cause: str | None = None, since: float = 0.0,
             component: str | None = None) -> dict | None:
    """The first fault of `target` (of `cause`, of `component`) detected at or after `since`
    (wall-clock seconds). A node's id names both its node fault and its KV store's."""
    return next((f for f in listing(fleet, "/faults") if f["target"] == target
                 and (cause is None or f["cause"] == cause) and (component is None or f["component"] == component)
                 and f["detected_at"] >= since), None)


def ready_ids(fleet, pool: str | None = None) -> set[str]:
    return {r.replica_id for r in fleet.replicas(pool)}


def test_a_replica_killed_mid_stream_resumes_elsewhere_and_is_replaced(fleet):
    expected = whole_text(fleet, SIM_BODY)

    def kill(replica_id: str) -> None:
        ray.kill(ray.get_actor(replica_actor_name(replica_id), namespace=fleet.config.namespace), no_restart=True)

    text, request_id, victim = stream_through(fleet, SIM_BODY, kill)
    assert text == expected  # no gap, no duplicate, no restart
    fault = wait_for(lambda: fault_of(fleet, victim), timeout_s=30, what="the death in the fault log")
    assert (fault["component"], fault["cause"]) == ("replica", "died")
    assert request_id in fault["affected_requests"]
    mended = wait_for(lambda: (f := fault_of(fleet, victim)) and f["replaced_by"] and f, timeout_s=120,
                      what="a replacement")
    assert mended["replaced_by"] in ready_ids(fleet, victim.rsplit("-", 1)[0])


def test_a_hung_replica_is_caught_by_the_watchdog_and_its_stream_resumes(fleet):
    expected = whole_text(fleet, SIM_BODY)

    def hang(replica_id: str) -> None:
        r = admin(fleet, "POST", "/faults/inject", json={"kind": "hang_replica", "target": replica_id})
        assert r.status_code == 200, r.text

    text, request_id, victim = stream_through(fleet, SIM_BODY, hang)
    assert text == expected
    fault = wait_for(lambda: fault_of(fleet, victim, "hung"), timeout_s=fleet.config.recovery.hang_timeout_s + 30,
                     what="the watchdog")
    assert fault["component"] == "replica" and "no token for" in fault["detail"]
    assert request_id in fault["affected_requests"]
    wait_for(lambda: (f := fault_of(fleet, victim, "hung")) and f["replaced_by"], timeout_s=120,
             what="a replacement")


def test_a_crashed_router_agent_is_failed_over_and_comes_back_with_the_view(fleet):
    agent, crashed_at = "agent-0", time.time()
    r = admin(fleet, "POST", "/faults/inject", json={"kind": "kill_router", "target": agent})
    assert r.status_code == 200, r.text
    body = {"model": "sim-llama-7b", "prompt": "route around it", "max_tokens": 8, "temperature": 0}
    for _ in range(6):  # round robin over the agents: half of them ask the crashed one first
        assert httpx.post(f"{fleet.base_url}/v1/completions", json=body, timeout=60).status_code == 200
    fault = wait_for(lambda: fault_of(fleet, agent, since=crashed_at), timeout_s=30, what="the agent's fault")
    assert fault["component"] == "router"
    wait_for(lambda: (f := fault_of(fleet, agent, since=crashed_at)) and f["recovered_at"], timeout_s=60,
             what="the agent back")
    info = run_async(RouterClient.lookup(agent, fleet.config.namespace).info())
    assert info.view_version > 0 and info.replicas > 0  # it holds the fleet view again
    assert info.peers == fleet.config.routing.agents - 1  # and knows its peers


def test_the_data_path_outlives_the_controller_which_comes_back_with_its_replicas_and_settings(fleet):
    patched = admin(fleet, "PATCH", "/config", json={"routing": {"load_guard": 0.85}})
    assert patched.status_code == 200, patched.text
    before = ready_ids(fleet)
    wait_for(lambda: admin(fleet, "GET", "/config").json()["routing"]["load_guard"] == 0.85, what="the patch")
    killed_at = time.time()
    ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=fleet.config.namespace), no_restart=False)
    body = {"model": "sim-llama-7b", "prompt": "no controller needed", "max_tokens": 16, "temperature": 0}
    for _ in range(4):  # while it restarts: nothing on the data path asks it
        assert httpx.post(f"{fleet.base_url}/v1/completions", json=body, timeout=60).status_code == 200
    restarted = wait_for(lambda: _restart_after(fleet, killed_at), timeout_s=120, what="the controller back")
    assert restarted["component"] == "controller"
    wait_for(lambda: ready_ids(fleet) == before, timeout_s=120, what="the same replicas ready again")
    live = [r for r in fleet.status().replicas if r.state not in ("dead", "stopped")]
    assert sorted(r.replica_id for r in live) == sorted(before)  # re-adopted: no duplicate, none lost
    assert admin(fleet, "GET", "/config").json()["routing"]["load_guard"] == 0.85  # its settings survived
    assert admin(fleet, "PATCH", "/config", json={"routing": {"load_guard": None}}).status_code == 200


def test_a_dead_node_takes_its_replicas_which_are_replaced_on_the_other_node(fleet, ray_cluster):
    spare = _spare_h100(ray_cluster)
    _put_an_h100_replica_on(fleet, spare)
    victims = {r.replica_id for r in fleet.replicas("h100") if r.node_id == spare}
    assert victims
    node = next(n for n in ray_cluster.cluster.worker_nodes if n.node_id == spare)
    ray_cluster.cluster.remove_node(node, allow_graceful=False)
    fault = wait_for(lambda: fault_of(fleet, spare, component="node"), timeout_s=60, what="the node's death")
    assert (fault["component"], fault["cause"]) == ("node", "died")
    ended = {r.replica_id: r.state for r in fleet.status().replicas if r.replica_id in victims}
    assert set(ended.values()) == {"dead"}, ended  # declared dead with their node (or by their failed poll)
    wait_for(lambda: len(fleet.replicas("h100")) == fleet.config.pool("h100").replicas, timeout_s=120,
             what="the h100 pool whole again")
    assert all(r.node_id != spare for r in fleet.replicas("h100"))


# helpers of the node test --------------------------------------------------------------

def _spare_h100(ray_cluster) -> str:
    """The H100 node without CPUs: only sim replicas and 0-CPU actors live there, never the ingress."""
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "accelerator_type:H100" in n["Resources"]
                and "CPU" not in n["Resources"] and ray_cluster.kind_of(n["NodeID"]) == "H100")


def _put_an_h100_replica_on(fleet, spare: str) -> None:
    """Make sure an h100 replica runs on `spare`: if none does, cordon the other H100 node and
    drain one replica there, so that its replacement can only land on the spare."""
    if any(r.node_id == spare for r in fleet.replicas("h100")):
        return
    other = fleet.replicas("h100")[0].node_id
    assert admin(fleet, "POST", f"/nodes/{other}/cordon").status_code == 200
    try:
        victim = fleet.replicas("h100")[0].replica_id
        assert admin(fleet, "POST", f"/replicas/{victim}/drain", json={"replace": True}).status_code == 200
        wait_for(lambda: any(r.node_id == spare for r in fleet.replicas("h100")), timeout_s=120,
                 what="an h100 replica on the spare node")
    finally:
        assert admin(fleet, "POST", f"/nodes/{other}/uncordon").status_code == 200


def _restart_after(fleet, killed_at: float) -> dict | None:
    try:
        faults = admin(fleet, "GET", "/faults")
    except httpx.HTTPError:
        return None
    if faults.status_code != 200:
        return None
    return next((f for f in faults.json() if f["cause"] == "restarted" and f["detected_at"] >= killed_at), None)
