"""Routing with the KV-cache stores' index: the prefix scorer counts blocks a replica could
load from its own node's store, at `store_hit_weight`, after those in its own cache."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from policies.block_hash import block_hashes
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, StoreSnapshot
from policies.routing import Router, RoutingTable
from policies.scorers import ScoringContext, prefix

BASE = ReplicaSnapshot(replica_id="r", model="m", pool="p", gpu_type="H100", node_id="n0",
                       state=ReplicaState.READY, kv_blocks_total=1000, block_size=16, max_queue=8,
                       max_batch_tokens_per_s=1000.0)
PROMPT = tuple(range(160))  # 10 full blocks
HASHES = block_hashes(PROMPT, 16, "m")
REQUEST = RoutingRequest("q", "m", prompt_tokens=160, max_tokens=16, block_hashes=HASHES)


def view(replicas, stores=(), weight=0.5) -> FleetView:
    return FleetView(1, 0.0, tuple(replicas), stores=tuple(stores), store_hit_weight=weight)


def scores(v: FleetView, request: RoutingRequest = REQUEST) -> np.ndarray:
    table = RoutingTable.from_view(v)
    rows = np.arange(len(table))
    ctx = ScoringContext(request, table, rows, np.zeros(rows.size), np.zeros(rows.size), None, 0.0)
    return prefix(ctx)


def replica(rid: str, node: str, held: int) -> ReplicaSnapshot:
    return replace(BASE, replica_id=rid, node_id=node, cached_block_hashes=frozenset(HASHES[:held]))


def store(node: str, held: int) -> StoreSnapshot:
    return StoreSnapshot(f"kvstore-{node}", node, frozenset(HASHES[:held]))


@pytest.mark.parametrize("replicas, stores, weight, expected", [
    # own cache only: leading blocks held / blocks
    ([replica("a", "n0", 4), replica("b", "n1", 0)], [], 0.5, [0.4, 0.0]),
    # the store on b's node holds 8 blocks: b could load them, at half weight
    ([replica("a", "n0", 4), replica("b", "n1", 0)], [store("n1", 8)], 0.5, [0.4, 0.4]),
    # a's own 4 count in full, the 4 more its node's store holds at half weight
    ([replica("a", "n0", 4), replica("b", "n1", 0)], [store("n0", 8)], 0.5, [0.6, 0.0]),
    # a store holding less than the replica adds nothing
    ([replica("a", "n0", 6)], [store("n0", 3)], 0.5, [0.6]),
    # another node's store is not counted (loading from it crosses the network)
    ([replica("a", "n0", 0)], [store("n1", 10)], 0.5, [0.0]),
    # weight 0 ignores the stores; weight 1 counts them as the replica's own cache
    ([replica("a", "n0", 2)], [store("n0", 10)], 0.0, [0.2]),
    ([replica("a", "n0", 2)], [store("n0", 10)], 1.0, [1.0]),
])
def test_prefix_scorer_counts_own_hits_then_same_node_store_hits(replicas, stores, weight, expected):
    assert scores(view(replicas, stores, weight)).tolist() == pytest.approx(expected)


def test_a_request_without_full_blocks_scores_zero_with_stores_too():
    v = view([replica("a", "n0", 0)], [store("n0", 10)])
    assert scores(v, replace(REQUEST, block_hashes=())).tolist() == [0.0]


def test_the_router_prefers_the_replica_beside_a_store_holding_the_prefix():
    replicas = [replica("a", "n0", 0), replica("b", "n1", 0)]
    pick = Router({"prefix": 3.0, "load": 1.0}).pick(REQUEST, RoutingTable.from_view(view(replicas, [store("n1", 10)])),
                                                    None, 0.0)
    assert pick.replica_id == "b" and pick.scores["prefix"] == pytest.approx(0.5)


def test_a_weight_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="store_hit_weight"):
        RoutingTable.from_view(view([replica("a", "n0", 0)], [store("n0", 1)], weight=1.5))
