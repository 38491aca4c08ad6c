"""Packing replicas onto nodes: memory, zones, keeping what runs, new and idle nodes, power."""

from __future__ import annotations

import pytest

from policies.packing import (
    CurrentReplica,
    NodeShape,
    NodeSnapshot,
    ReplicaShape,
    pack,
    replica_shape,
)
from policies.transformer_spec import MODEL_PRESETS

GIB = 2**30
H100 = 80 * GIB


def nodes(*specs) -> list[NodeSnapshot]:
    """(node_id, gpu_type, gpus, zone) tuples."""
    return [NodeSnapshot(n, t, g, H100 if t == "H100" else 24 * GIB, z) for n, t, g, z in specs]


FULL = ReplicaShape("big", "H100", 1, 72 * GIB)  # one per GPU
HALF = ReplicaShape("small", "H100", 1, 30 * GIB)  # two per GPU
TP2 = ReplicaShape("tp2", "H100", 2, 60 * GIB)
H100_NODE = NodeShape("H100", 2, H100, group="h100-workers")


def test_replicas_spread_across_zones():
    fleet = nodes(("a1", "H100", 2, "a"), ("a2", "H100", 2, "a"), ("b1", "H100", 2, "b"))
    plan = pack({"big": 4}, {"big": FULL}, fleet)
    zones = [p.node_id[0] for p in plan.placements]
    assert sorted(zones) == ["a", "a", "b", "b"] and plan.complete
    assert plan.missing_nodes == () and plan.idle_nodes == ("a2",)  # zone a packed onto a1


def test_small_replicas_share_a_gpu_and_pack_tightly():
    fleet = nodes(("n1", "H100", 2, ""), ("n2", "H100", 2, ""))
    plan = pack({"small": 4}, {"small": HALF}, fleet)
    assert {p.node_id for p in plan.placements} == {"n1"}  # 4 × 30 GiB on two 80 GiB GPUs
    assert plan.idle_nodes == ("n2",)
    assert plan.power_watts == 2 * 700


def test_multi_gpu_replicas_take_whole_gpus():
    fleet = nodes(("n1", "H100", 4, ""))
    plan = pack({"tp2": 2}, {"tp2": TP2}, fleet)
    used = [set(p.gpu_indices) for p in plan.placements]
    assert len(used) == 2 and used[0].isdisjoint(used[1]) and all(len(u) == 2 for u in used)


def test_current_replicas_stay_and_a_shrinking_pool_frees_whole_nodes():
    fleet = nodes(("a1", "H100", 2, "a"), ("a2", "H100", 2, "a"), ("b1", "H100", 2, "b"))
    current = [CurrentReplica("r1", "big", "a1"), CurrentReplica("r2", "big", "a1"),
               CurrentReplica("r3", "big", "a2"), CurrentReplica("r4", "big", "b1")]
    plan = pack({"big": 2}, {"big": FULL}, fleet, current)
    # zone a holds three: its emptiest node (a2) loses its replica first, then a1 one
    assert plan.remove[0] == "r3" and len(plan.remove) == 2
    kept = {p.replica for p in plan.placements}
    assert "r4" in kept and not any(p.new for p in plan.placements)
    assert "a2" in plan.idle_nodes


def test_growing_pool_keeps_current_and_adds_new():
    fleet = nodes(("a1", "H100", 2, "a"), ("b1", "H100", 2, "b"))
    plan = pack({"big": 3}, {"big": FULL}, fleet, [CurrentReplica("r1", "big", "a1")])
    assert [p.replica for p in plan.placements if not p.new] == ["r1"]
    new = [p for p in plan.placements if p.new]
    assert len(new) == 2 and new[0].node_id == "b1"  # zone b had none


def test_replicas_on_vanished_nodes_or_dropped_pools_are_removed():
    fleet = nodes(("a1", "H100", 2, "a"))
    current = [CurrentReplica("gone", "big", "dead-node"), CurrentReplica("old", "other", "a1")]
    plan = pack({"big": 1}, {"big": FULL}, fleet, current)
    assert set(plan.remove) == {"gone", "old"}
    assert plan.placements[0].new


def test_missing_nodes_are_requested_by_shape():
    fleet = nodes(("n1", "H100", 2, ""))
    plan = pack({"big": 5}, {"big": FULL}, fleet, node_shapes={"H100": H100_NODE})
    assert plan.complete
    assert [(r.shape.group, r.count) for r in plan.missing_nodes] == [("h100-workers", 2)]
    assert sum(p.node_id.startswith("new:") for p in plan.placements) == 3


def test_without_a_node_shape_the_rest_is_unplaced_with_the_reason():
    plan = pack({"big": 3}, {"big": FULL}, nodes(("n1", "H100", 2, "")))
    [unplaced] = plan.unplaced
    assert unplaced.count == 1 and "no NodeShape" in unplaced.reason


def test_replica_too_big_for_any_node_is_explained():
    huge = ReplicaShape("huge", "L4", 1, 30 * GIB)
    plan = pack({"huge": 1}, {"huge": huge}, nodes(("l", "L4", 4, "")),
                node_shapes={"L4": NodeShape("L4", 4, 24 * GIB)})
    assert "new L4 node has 4 of" in plan.unplaced[0].reason


def test_power_budget_leaves_replicas_unplaced():
    fleet = nodes(("n1", "H100", 2, ""), ("n2", "H100", 2, ""))
    plan = pack({"big": 3}, {"big": FULL}, fleet, power_budget_watts=1500)
    assert len(plan.placements) == 2 and plan.power_watts == 1400
    assert plan.unplaced[0].count == 1 and "power budget 1500 W" in plan.unplaced[0].reason


def test_resource_bundles_one_per_replica():
    fleet = nodes(("n1", "H100", 4, ""))
    plan = pack({"tp2": 1, "small": 2}, {"tp2": TP2, "small": HALF}, fleet)
    bundles = sorted(plan.resource_bundles(), key=lambda b: b["GPU"])
    assert bundles[0] == {"GPU": 0.5, "accelerator_type:H100": 0.001}
    assert bundles[-1]["GPU"] == 2


def test_replica_shape_from_the_model():
    spec = MODEL_PRESETS["llama-2-7b"]
    shape = replica_shape("p", spec, "H100", 1, kv_budget_tokens=10_000)
    assert shape.memory_bytes_per_gpu == spec.weight_bytes + 10_000 * spec.kv_bytes_per_token
    default = replica_shape("p", spec, "H100", 1)
    assert default.memory_bytes_per_gpu == int(0.9 * 81559 * 2**20)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown GPU type 'V100'"):
        ReplicaShape("p", "V100", 1, GIB)
    with pytest.raises(ValueError, match="no ReplicaShape for pool"):
        pack({"x": 1}, {}, [])
