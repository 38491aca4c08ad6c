"""The session fleet's KV-cache stores: one per node, started and restarted by the
controller, indexed in the fleet view, shown by the admin API and the metrics, and
shared by the sim replicas (a prefix prefilled on one is loaded by another)."""

from __future__ import annotations

import httpx
import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.kvstore_client import KVStoreClient
from actors.replica_client import ReplicaClient
from policies.block_hash import block_hashes
from tests.integration.conftest import VIEWER_TOKEN, run_async, wait_for

pytestmark = pytest.mark.ray

MODEL = "sim-llama-7b"
PROMPT = tuple(range(32, 32 + 200)) * 5  # 1,000 byte tokens: 62 full blocks of 16


def kvstores(fleet) -> list[dict]:
    r = httpx.get(f"{fleet.base_url}/admin/v1/kvstores", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def alive_nodes(fleet) -> set[str]:
    return {n.node_id for n in fleet.status().nodes if n.alive}


def generate(replica_id: str, fleet, rid: str, prompt: tuple[int, ...]) -> list[int]:
    client = ReplicaClient.lookup(replica_id, fleet.config.namespace)
    request = GenerationRequest(rid, MODEL, prompt, SamplingSpec(max_tokens=8, temperature=0.0))

    async def run():
        return [t async for d in client.generate(request) for t in d.token_ids]
    return run_async(run())


def stats(replica_id: str, fleet):
    return run_async(ReplicaClient.lookup(replica_id, fleet.config.namespace).stats(timeout_s=30))


def test_every_alive_node_has_a_store_listed_by_the_admin_api(fleet):
    def all_alive():
        listed = kvstores(fleet)
        return listed if {s["node_id"] for s in listed if s["alive"]} >= alive_nodes(fleet) else None

    listed = wait_for(all_alive, timeout_s=120, what="a live store on every node")
    store = listed[0]
    assert store["capacity_bytes"] == fleet.config.kv_store.capacity_bytes and store["store_id"].startswith("kvstore-")
    assert set(store) >= {"used_bytes", "blocks", "hits", "misses", "hit_rate", "evictions", "restarts"}


def test_a_prefix_prefilled_on_one_replica_is_loaded_by_another_on_another_node(fleet):
    h100, l4 = fleet.replicas("h100")[0], fleet.replicas("l4")[0]
    assert h100.node_id != l4.node_id
    first = generate(h100.replica_id, fleet, "kv-fleet-1", PROMPT)
    hashes = block_hashes(PROMPT, 16, MODEL)
    store = KVStoreClient.lookup(h100.node_id, fleet.config.namespace)
    wait_for(lambda: run_async(store.contains(MODEL, hashes, timeout_s=10)) == len(hashes), timeout_s=60,
             what="the prefix in the H100 node's store")
    before = stats(l4.replica_id, fleet)
    assert generate(l4.replica_id, fleet, "kv-fleet-2", PROMPT) == first
    after = stats(l4.replica_id, fleet)
    # every full block loaded (the last token is in a partial block, computed)
    assert after.loaded_prompt_tokens - before.loaded_prompt_tokens == len(hashes) * 16
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == len(PROMPT) - len(hashes) * 16
    view = wait_for(lambda: (v := run_async(fleet.controller.fleet_view())) and any(
        set(hashes) <= s.cached_block_hashes for s in v.stores if s.node_id == h100.node_id) and v,
        timeout_s=30, what="the prefix in the fleet view's store index")
    assert view.store_hit_weight == fleet.config.kv_store.store_hit_weight


def test_store_metrics_are_exported(fleet):
    def scraped():
        text = httpx.get(fleet.metrics_url, timeout=30).text
        return text if "flotilla_kvstore_used_bytes{" in text and "flotilla_kvstore_hits_total{" in text else None
    text = wait_for(scraped, timeout_s=60, what="the store gauges")
    assert 'tier="memory"' in text and "flotilla_kvstore_capacity_bytes" in text


def test_a_killed_store_loses_its_index_and_the_controller_starts_a_new_one(fleet):
    l4 = fleet.replicas("l4")[0]
    prompt = tuple(range(40, 40 + 200)) * 3  # a prefix no other test uses
    generate(l4.replica_id, fleet, "kv-fleet-3", prompt)
    old = KVStoreClient.lookup(l4.node_id, fleet.config.namespace)
    wait_for(lambda: run_async(old.contains(MODEL, block_hashes(prompt, 16, MODEL)[:1], timeout_s=10)) == 1,
             timeout_s=60, what="the prefix in the L4 node's store")
    restarts = next(s["restarts"] for s in kvstores(fleet) if s["node_id"] == l4.node_id)
    old.kill()
    wait_for(lambda: any(s["node_id"] == l4.node_id and s["alive"] and s["restarts"] > restarts
                         for s in kvstores(fleet)), timeout_s=120, what="a new store on the L4 node")
    new = KVStoreClient.lookup(l4.node_id, fleet.config.namespace)
    assert run_async(new.contains(MODEL, block_hashes(prompt, 16, MODEL), timeout_s=10)) == 0  # only cache was lost
    assert generate(l4.replica_id, fleet, "kv-fleet-4", prompt)  # requests carry on, recomputing
