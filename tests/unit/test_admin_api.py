"""The admin API against a real controller (in-process, fake replicas): auth, errors, idempotency, audit."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fastapi.routing import APIRoute

from actors.engines.base import RequestStatus
from orchestrator.admin.api import PUBLIC_PATHS, build_admin_app
from orchestrator.admin.audit import Audit
from orchestrator.admin.auth import Role, TokenStore
from orchestrator.admin.backend import LocalBackend
from orchestrator.config import AdminConfig
from orchestrator.controller_actor import ControllerActor
from orchestrator.durable_state import DurableState, MemoryKeyValue
from tests.fakes import FakeClock, FakeReplica, FakeRouter, nodes_for

VIEWER, OPERATOR = "viewer-token-0123456789", "operator-token-0123456789"

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [
        {"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2, "max_replicas": 4},
        {"name": "l4", "gpu_type": "L4", "model": "m", "replicas": 1, "max_replicas": 2},
    ],
    "admin": {"tokens": [{"name": "ann", "role": "viewer", "token": VIEWER},
                         {"name": "ops", "role": "operator", "token": OPERATOR}]},
    "controller": {"metrics_port": 0},
}


class Fleet:
    """A ControllerActor over fake replicas, and the admin app serving it."""

    def __init__(self):
        self.clock = FakeClock()
        self.replicas: dict[str, FakeReplica] = {}
        self.routers: dict[str, FakeRouter] = {}
        self.actor = ControllerActor(CONFIG, launcher=self._launch, router_launcher=self._launch_router,
                                     node_source=lambda: nodes_for("H100", "L4"),
                                     durable=DurableState(MemoryKeyValue()))
        self.counted: list[tuple[str, str, str]] = []
        self.app = build_admin_app()
        self.app.state.backend = LocalBackend(self.actor)
        self.app.state.tokens = TokenStore.from_config(self.actor.config.admin)
        self.app.state.audit = Audit(lambda *labels: self.counted.append(labels))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://admin")

    def _launch(self, spec, placement):
        self.replicas[spec.replica_id] = FakeReplica(spec, placement, self.clock)
        return self.replicas[spec.replica_id]

    def _launch_router(self, agent_id, settings):
        self.routers[agent_id] = FakeRouter(agent_id)
        return self.routers[agent_id]

    async def settle(self, ticks: int = 2) -> None:
        for _ in range(ticks):
            await self.actor.controller.step()
            await asyncio.sleep(0)

    async def call(self, method: str, path: str, token: str | None = OPERATOR, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return await self.http.request(method, path, headers=headers, **kwargs)

    def replica_ids(self, pool: str) -> list[str]:
        return sorted(r for r, fake in self.replicas.items() if fake.spec.pool == pool and not fake.killed)


@pytest.fixture
async def fleet():
    f = Fleet()
    await f.settle()
    yield f
    await f.http.aclose()


def _concrete(path: str, fleet: Fleet) -> str:
    return (path.replace("{replica_id}", fleet.replica_ids("h100")[0]).replace("{node_id}", "node-H100")
            .replace("{name}", "h100"))


def _routes(app) -> list[tuple[str, str]]:
    return [(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.path not in PUBLIC_PATHS
            for m in r.methods]


async def test_every_route_requires_a_token_and_mutations_require_an_operator(fleet):
    routes = _routes(fleet.app)
    assert len(routes) >= 14  # a new route is covered automatically
    for method, path in routes:
        url = _concrete(path, fleet)
        anonymous = await fleet.call(method, url, token=None, json={})
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.json()["error"]["code"] == "unauthorized"
        wrong = await fleet.call(method, url, token="not-a-token-at-all-xx", json={})
        assert wrong.status_code == 401, (method, path)
        as_viewer = await fleet.call(method, url, token=VIEWER, json={})
        if method == "GET":
            assert as_viewer.status_code == 200, (method, path, as_viewer.text)
        else:
            assert as_viewer.status_code == 403, (method, path)
            assert as_viewer.json()["error"] == {"code": "forbidden", "status": 403,
                                                 "message": "role viewer may not do this; it needs operator"}


async def test_reads_show_the_fleet(fleet):
    summary = (await fleet.call("GET", "/fleet", token=VIEWER)).json()
    assert summary["replicas_by_state"] == {"ready": 3} and summary["nodes"] == 5
    assert summary["cost_per_hour"] > 0 and [m["name"] for m in summary["models"]] == ["m"]
    nodes = (await fleet.call("GET", "/nodes", token=VIEWER)).json()
    assert {n["gpu_type"] for n in nodes} == {None, "H100", "L4"}
    replicas = (await fleet.call("GET", "/replicas?pool=l4", token=VIEWER)).json()
    assert [r["pool"] for r in replicas] == ["l4"] and replicas[0]["engine"] == "sim"


async def test_the_migration_plan_says_why_a_drain_cannot_finish(fleet):
    quiet = (await fleet.call("GET", "/migrations/plan", token=VIEWER)).json()
    assert quiet["planned_at"] is not None and quiet["moves_planned"] == 0 and quiet["notes"] == []
    victim = fleet.replicas[fleet.replica_ids("h100")[0]]
    victim.running = 1  # 5 tokens left: too close to finishing to move, so the drain waits for it
    victim.requests = (RequestStatus("last-words", 0, "interactive", 100, 195, 200, True, 0.0),)
    await fleet.settle(1)
    assert (await fleet.call("POST", f"/replicas/{victim.spec.replica_id}/drain")).status_code == 200
    await fleet.settle(1)
    plan = (await fleet.call("GET", "/migrations/plan", token=VIEWER)).json()
    assert plan["moves_planned"] == plan["moves_started"] == 0
    assert plan["notes"] == [f"drain {victim.spec.replica_id}: 1 request(s) stay: about to finish"]


async def test_unknown_ids_are_404_and_conflicts_are_409(fleet):
    missing = await fleet.call("POST", "/replicas/nope/drain")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (await fleet.call("GET", "/nodes/nope")).status_code == 404
    victim = fleet.replica_ids("h100")[0]
    fleet.replicas[victim].running = 1  # busy: it stays draining
    await fleet.settle(1)
    assert (await fleet.call("POST", f"/replicas/{victim}/drain")).json()["state"] == "draining"
    again = await fleet.call("POST", f"/replicas/{victim}/drain")
    assert again.status_code == 409 and again.json()["error"]["code"] == "replica_draining"


async def test_invalid_bodies_are_422_naming_the_field(fleet):
    r = await fleet.call("PUT", "/pools/h100/replicas", json={"replicas": -1})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body.replicas:")
    r = await fleet.call("PUT", "/pools/h100/replicas", json={"replicas": 9})
    assert r.status_code == 422 and "outside [0, 4]" in r.json()["error"]["message"]
    r = await fleet.call("POST", "/nodes/node-L4/cordon", json={"drain": "maybe"})
    assert r.status_code == 422 and "body.drain" in r.json()["error"]["message"]


async def test_an_idempotency_key_replays_the_first_answer(fleet):
    victim = fleet.replica_ids("h100")[0]
    fleet.replicas[victim].running = 1
    await fleet.settle(1)
    headers = {"Idempotency-Key": "drain-once"}
    first = await fleet.call("POST", f"/replicas/{victim}/drain", headers=dict(headers))
    retry = await fleet.call("POST", f"/replicas/{victim}/drain", headers=dict(headers))
    assert first.status_code == retry.status_code == 200 and first.json() == retry.json()
    other = await fleet.call("POST", "/nodes/node-L4/cordon", headers=dict(headers))
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_cordon_keeps_new_replicas_off_the_node_and_drain_moves_them(fleet):
    on_node = [r for r, f in fleet.replicas.items() if f.node_id == "node-L4"]
    r = await fleet.call("POST", "/nodes/node-L4/cordon", json={"drain": True})
    assert r.status_code == 200 and r.json()["cordoned"]
    await fleet.settle(3)
    replacements = [f for r, f in fleet.replicas.items() if f.spec.pool == "l4" and r not in on_node]
    assert replacements and all(f.node_id == "node-L4-b" for f in replacements)
    assert all(fleet.replicas[r].shut_down for r in on_node)  # idle: drained and stopped
    assert (await fleet.call("POST", "/nodes/node-L4/uncordon")).json()["cordoned"] is False


async def test_scaling_a_pool(fleet):
    r = await fleet.call("PUT", "/pools/l4/replicas", json={"replicas": 2})
    assert r.status_code == 200 and r.json()["desired"] == 2
    await fleet.settle(2)
    assert len(fleet.replica_ids("l4")) == 2


async def test_runtime_settings_change_and_the_rest_is_refused(fleet):
    r = await fleet.call("PATCH", "/config", json={"routing": {"load_guard": 0.75, "weights": {"kv": None}}})
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["load_guard"] == 0.75 and "kv" not in r.json()["routing"]["weights"]
    await fleet.settle(1)
    assert all(router.settings["load_guard"] == 0.75 for router in fleet.routers.values())
    refused = await fleet.call("PATCH", "/config", json={"pools": []})
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("body.pools:")
    bad = await fleet.call("PATCH", "/config", json={"routing": {"load_guard": 7}})
    assert bad.status_code == 422 and "body.routing.load_guard" in bad.json()["error"]["message"]
    none_left = await fleet.call("PATCH", "/config", json={"routing": {"weights": {"prefix": 0, "load": 0,
                                                                                  "slo_fit": 0}}})
    assert none_left.status_code == 422 and "routing.weights" in none_left.json()["error"]["message"]


async def test_config_reads_hide_secrets(fleet):
    config = (await fleet.call("GET", "/config", token=VIEWER)).json()
    assert {t["token"] for t in config["admin"]["tokens"]} == {"***"}
    assert OPERATOR not in json.dumps(config)


async def test_requests_in_flight_are_listed(fleet):
    from actors.engines.base import RequestStatus

    replica = fleet.replica_ids("h100")[0]
    fleet.replicas[replica].requests = (RequestStatus("req-1", 10, "interactive", 40, 7, 100, True,
                                                      fleet.clock.now - 3.0),)
    await fleet.settle(1)
    [listed] = (await fleet.call("GET", "/requests", token=VIEWER)).json()
    assert listed["request_id"] == "req-1" and listed["replica_id"] == replica
    assert listed["output_tokens"] == 7 and listed["priority"] == 10


async def test_every_mutation_is_audited(fleet, caplog):
    caplog.set_level(logging.INFO, logger="flotilla.audit")
    await fleet.call("POST", "/nodes/node-H100/cordon", json={})
    await fleet.call("POST", "/nodes/node-H100/cordon", token=VIEWER)
    await fleet.call("GET", "/nodes", token=VIEWER)  # reads are not audited
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "flotilla.audit"]
    assert [(line["who"], line["what"], line["outcome"]) for line in lines] == [
        ("ops", "POST /nodes/node-H100/cordon", "200"), ("ann", "POST /nodes/node-H100/cordon", "403")]
    assert all(line["when"].endswith("+00:00") for line in lines)
    assert fleet.counted == [("POST /nodes/{node_id}/cordon", "operator", "200"),
                             ("POST /nodes/{node_id}/cordon", "viewer", "403")]


def test_tokens_come_from_a_mounted_secret(tmp_path):
    (tmp_path / "viewer").write_text("v-token-aaaaaaaaaaaaa\n\nv-token-bbbbbbbbbbbbb\n")
    (tmp_path / "operator").write_text("o-token-ccccccccccccc\n")
    store = TokenStore.from_config(AdminConfig(tokens_dir=str(tmp_path)))
    assert store.authenticate("v-token-bbbbbbbbbbbbb").role is Role.VIEWER
    assert store.authenticate("o-token-ccccccccccccc").role is Role.OPERATOR
    assert store.authenticate("o-token-ccccccccccccd") is None and store.authenticate("") is None


async def test_no_configured_tokens_says_so():
    app = build_admin_app()
    app.state.tokens = TokenStore([])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as http:
        r = await http.get("/fleet", headers={"Authorization": "Bearer anything-at-all-here"})
    assert r.status_code == 401 and "no tokens configured" in r.json()["error"]["message"]


def test_the_committed_reference_is_current():
    from pathlib import Path

    from orchestrator.admin.reference import reference

    committed = (Path(__file__).resolve().parents[2] / "docs" / "admin-api.md").read_text()
    assert committed == reference(build_admin_app().openapi()), (
        "docs/admin-api.md is stale: python -m orchestrator.admin.reference > docs/admin-api.md")
