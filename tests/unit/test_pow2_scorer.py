"""Table tests of the `power_of_two` scorer: two candidates drawn from the request's id,
the one with fewer queued requests taken."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np

from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest
from policies.routing import Router, RoutingTable
from policies.scorers import SCORERS, ScoringContext, power_of_two

BASE = ReplicaSnapshot(
    replica_id="r", model="m", pool="h100", gpu_type="H100", node_id="n0", state=ReplicaState.READY,
    kv_blocks_total=100, block_size=16, max_queue=16, prefill_tokens_per_s=1000.0, decode_step_s=0.02,
    max_batch_tokens_per_s=1000.0,
)
REQUEST = RoutingRequest("q", "m", prompt_tokens=64, max_tokens=16)
POW2 = Router({"power_of_two": 1.0}, load_guard=1.0)


def fleet(*overrides: dict) -> tuple[ReplicaSnapshot, ...]:
    return tuple(replace(BASE, replica_id=f"r{i}", **o) for i, o in enumerate(overrides))


def context(replicas, booked_tokens=None, request_id: str = "q") -> ScoringContext:
    t = RoutingTable.from_view(FleetView(1, 0.0, tuple(replicas)))
    rows = np.arange(len(t))
    booked = np.zeros(rows.size) if booked_tokens is None else np.asarray(booked_tokens, dtype=float)
    return ScoringContext(replace(REQUEST, request_id=request_id), t, rows, np.zeros(rows.size), booked,
                          None, 0.0)


def test_registered_under_its_name():
    assert SCORERS["power_of_two"] is power_of_two


def test_a_lone_candidate_is_taken():
    assert power_of_two(context(fleet({"running": 9}))).tolist() == [1.0]


def test_of_two_the_one_with_fewer_running_plus_waiting_wins():
    assert power_of_two(context(fleet({"running": 5, "waiting": 2}, {"running": 6}))).tolist() == [0.0, 1.0]
    assert power_of_two(context(fleet({"running": 1, "waiting": 3}, {"running": 2, "waiting": 3}))).tolist() \
        == [1.0, 0.0]


def test_a_queue_tie_goes_to_fewer_booked_tokens_and_a_full_tie_to_both():
    two = fleet({"running": 3}, {"waiting": 3})
    assert power_of_two(context(two, booked_tokens=[128, 64])).tolist() == [0.0, 1.0]
    assert power_of_two(context(two, booked_tokens=[64, 64])).tolist() == [1.0, 1.0]


def test_the_pair_is_a_function_of_the_request_id_only():
    replicas = fleet(*({"running": i} for i in range(6)))
    for rid in ("a", "b", "c"):
        first = power_of_two(context(replicas, request_id=rid))
        assert first.tolist() == power_of_two(context(replicas, request_id=rid)).tolist()
        assert first.sum() == 1.0  # distinct queues: exactly one of the pair wins


def test_pairs_are_close_to_uniform_over_request_ids():
    # six replicas with equal queues and bookings: both of the sampled pair score 1
    replicas = fleet(*({} for _ in range(6)))
    pairs = Counter(tuple(np.flatnonzero(power_of_two(context(replicas, request_id=f"cmpl-{i}"))))
                    for i in range(3000))
    assert set(pairs) == set(itertools.combinations(range(6), 2))
    assert max(pairs.values()) / min(pairs.values()) < 1.6  # 15 pairs, 200 each expected


def test_the_longest_queue_is_never_picked_and_the_shortest_always_when_drawn():
    t = RoutingTable.from_view(FleetView(1, 0.0, fleet({"running": 4}, {"running": 1}, {"running": 9},
                                                       {"running": 2, "waiting": 1})))
    picks = Counter(POW2.pick(replace(REQUEST, request_id=f"id-{i}"), t, None, 0.0).replica_id
                    for i in range(600))
    assert "r2" not in picks
    assert picks["r1"] > picks["r3"] > picks["r0"]  # drawn in half the pairs, wins every time: ~300
    assert 240 < picks["r1"] < 360
