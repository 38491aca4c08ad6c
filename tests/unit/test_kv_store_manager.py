"""The controller's `StoreManager`, stepped by hand: one store per alive node, the cluster
index in the fleet view, dead stores forgotten and restarted, metrics and replica settings."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace

import pytest

from actors.kv_link import ENV_VAR
from actors.kvstore import StoreReport, StoreSettings
from actors.kvstore_client import KVStoreUnavailable, store_id_of
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.fleet_state import NodeObservation
from tests.fakes import FakeClock, FakeReplica, FakeRouter

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 1}],
    "routing": {"agents": 1},
    "kv_store": {"enabled": True, "capacity_bytes": 1000, "store_hit_weight": 0.25},
}


def report(node_id: str, version: int, hashes=None, added=(), removed=(), started_at=1.0, **counts) -> StoreReport:
    fields = dict(capacity_bytes=1000, used_bytes=100, blocks=2, spill_capacity_bytes=0, spill_used_bytes=0,
                  spill_blocks=0, pinned_blocks=0, hits=0, misses=0, evictions=0, refused=0, corrupt=0, reowned=0,
                  saved_bytes=0, loaded_bytes=0, save_latencies_s=(), load_latencies_s=())
    fields.update(counts)
    return StoreReport(store_id_of(node_id), node_id, started_at, version=version,
                       hashes=None if hashes is None else frozenset(hashes), added=tuple(added),
                       removed=tuple(removed), **fields)


@dataclass
class FakeStore:
    node_id: str
    settings: StoreSettings
    reports: list = field(default_factory=list)  # StoreReport or exception, one per poll (last repeats)
    asked: list[int] = field(default_factory=list)  # since_version of each poll
    killed: bool = False

    @property
    def store_id(self) -> str:
        return store_id_of(self.node_id)

    async def report(self, since_version: int = -1, timeout_s: float = 2.0) -> StoreReport:
        self.asked.append(since_version)
        answer = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def harness():
    clock = FakeClock()
    stores: dict[str, list[FakeStore]] = {}
    replicas: dict[str, FakeReplica] = {}
    nodes = [NodeObservation("n1", "10.0.0.1", True, (("CPU", 8.0),), is_head=True),
             NodeObservation("n2", "10.0.0.2", True, (("CPU", 8.0), ("GPU", 8.0), ("accelerator_type:H100", 1.0)))]

    def launch_store(node_id, settings):
        store = FakeStore(node_id, settings, [report(node_id, 1, hashes={node_id.__hash__() & 0xFFFF})])
        stores.setdefault(node_id, []).append(store)
        return store

    def launch(spec, placement):
        replicas[spec.replica_id] = FakeReplica(spec, placement, clock)
        return replicas[spec.replica_id]

    controller = Controller(parse_config(CONFIG), launcher=launch, router_launcher=FakeRouter,
                            node_source=lambda: nodes, clock=clock, store_launcher=launch_store)
    return controller, stores, replicas, nodes


async def tick(controller: Controller, n: int = 1) -> None:
    for _ in range(n):
        await controller.step()
        await asyncio.sleep(0)


async def test_every_alive_node_gets_one_store_with_the_configured_capacity(harness):
    controller, stores, _, _ = harness
    await tick(controller, 2)
    assert sorted(stores) == ["n1", "n2"] and all(len(s) == 1 for s in stores.values())
    assert stores["n1"][0].settings == StoreSettings(capacity_bytes=1000)
    assert [s.node_id for s in controller.view.stores] == ["n1", "n2"]
    assert controller.view.store_hit_weight == 0.25


async def test_the_index_follows_each_stores_changes(harness):
    controller, stores, _, _ = harness
    await tick(controller)
    store = stores["n1"][0]
    store.reports = [report("n1", 1, hashes={10, 11}), report("n1", 3, added=(12,), removed=(10,))]
    await tick(controller, 2)
    assert store.asked[-2:] == [1, 1]  # incremental since the version it last saw
    view_store = next(s for s in controller.view.stores if s.node_id == "n1")
    assert view_store.cached_block_hashes == {11, 12}


async def test_a_dead_store_loses_its_index_and_a_new_one_starts_on_its_node(harness):
    controller, stores, _, _ = harness
    await tick(controller)
    stores["n2"][0].reports = [KVStoreUnavailable("kvstore-n2", "actor died", dead=True)]
    await tick(controller)
    assert stores["n2"][0].killed
    assert [s.node_id for s in controller.view.stores] == ["n1"]  # its blocks left the index at once
    await tick(controller)
    assert len(stores["n2"]) == 2 and "n2" in [s.node_id for s in controller.view.stores]
    n2 = next(s for s in controller.kv_stores() if s.node_id == "n2")
    assert n2.restarts == 1 and n2.alive
    assert controller.metrics["flotilla_kvstore_restarts_total"].labels("n2")._value.get() == 1
    [fault] = [f for f in controller.faults.records if f.component == "kvstore"]
    assert (fault.target, fault.cause) == ("n2", "died") and fault.recovered_at is not None


async def test_a_store_ray_restarted_between_polls_is_a_fault_too(harness):
    controller, stores, _, _ = harness
    await tick(controller)
    stores["n1"][0].reports = [report("n1", 1, hashes={7}, started_at=2.0)]  # a new incarnation
    await tick(controller)
    [fault] = [f for f in controller.faults.records if f.component == "kvstore"]
    assert (fault.target, fault.cause) == ("n1", "restarted") and fault.recovered_at is not None


async def test_a_store_of_a_dead_node_is_forgotten(harness):
    controller, stores, _, nodes = harness
    await tick(controller)
    nodes[1] = replace(nodes[1], alive=False)
    await tick(controller)
    assert [s.node_id for s in controller.kv_stores()] == ["n1"]
    assert len(stores["n2"]) == 1  # nothing to restart on a dead node


async def test_status_and_counters_come_from_the_reports(harness):
    controller, stores, _, _ = harness
    await tick(controller)
    stores["n1"][0].reports = [report("n1", 2, hits=30, misses=10, loaded_bytes=4096, load_latencies_s=(0.01,))]
    await tick(controller)
    stores["n1"][0].reports = [report("n1", 2, hits=35, misses=10, loaded_bytes=4096)]
    await tick(controller)
    status = next(s for s in controller.kv_stores() if s.node_id == "n1")
    assert (status.hits, status.misses, status.hit_rate, status.capacity_bytes) == (35, 10, 35 / 45, 1000)
    m, labels = controller.metrics, ("kvstore-n1", "n1")
    assert m["flotilla_kvstore_hits_total"].labels(*labels)._value.get() == 35
    assert m["flotilla_kvstore_load_bytes_total"].labels(*labels)._value.get() == 4096
    assert m["flotilla_kvstore_used_bytes"].labels(*labels, "memory")._value.get() == 100


async def test_replicas_are_told_how_to_reach_the_stores(harness):
    controller, _, replicas, _ = harness
    await tick(controller, 2)
    [replica] = replicas.values()
    settings = json.loads(dict(replica.placement.env)[ENV_VAR])
    assert settings["namespace"] == "flotilla" and settings["checksum"] is True


async def test_without_stores_in_the_config_nothing_changes():
    clock = FakeClock()
    replicas: dict[str, FakeReplica] = {}

    def launch(spec, placement):
        replicas[spec.replica_id] = FakeReplica(spec, placement, clock)
        return replicas[spec.replica_id]

    config = parse_config({k: v for k, v in CONFIG.items() if k != "kv_store"})
    controller = Controller(config, launcher=launch, router_launcher=FakeRouter, clock=clock,
                            store_launcher=lambda node, settings: pytest.fail("no store may start"))
    await tick(controller, 2)
    assert controller.view.stores == () and controller.kv_stores() == ()
    assert all(ENV_VAR not in dict(r.placement.env) for r in replicas.values())


async def test_a_store_never_claims_more_than_its_share_of_the_nodes_object_store(harness):
    controller, stores, _, nodes = harness
    nodes[1] = replace(nodes[1], resources=nodes[1].resources + (("object_store_memory", 1000.0),))
    await tick(controller)
    assert stores["n1"][0].settings.capacity_bytes == 1000  # no object store size reported: as configured
    assert stores["n2"][0].settings.capacity_bytes == 800
