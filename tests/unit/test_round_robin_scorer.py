"""Table tests of the `round_robin` scorer: turns kept by the bookings, load ignored."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from policies.bookings import Bookings
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest
from policies.routing import Router, RoutingTable
from policies.scorers import SCORERS, ScoringContext, round_robin

BASE = ReplicaSnapshot(
    replica_id="r", model="m", pool="h100", gpu_type="H100", node_id="n0", state=ReplicaState.READY,
    kv_blocks_total=100, block_size=16, max_queue=8, prefill_tokens_per_s=1000.0, decode_step_s=0.02,
    max_batch_tokens_per_s=1000.0,
)
REQUEST = RoutingRequest("q", "m", prompt_tokens=64, max_tokens=16)
ROUND_ROBIN = Router({"round_robin": 1.0}, load_guard=1.0)


def fleet(*overrides: dict) -> tuple[ReplicaSnapshot, ...]:
    return tuple(replace(BASE, replica_id=f"r{i}", **o) for i, o in enumerate(overrides))


def table(replicas, version: int = 4) -> RoutingTable:
    return RoutingTable.from_view(FleetView(version, 0.0, tuple(replicas)))


def context(t: RoutingTable, booked_tokens, candidates=None) -> ScoringContext:
    rows = np.arange(len(t)) if candidates is None else np.asarray(candidates)
    return ScoringContext(REQUEST, t, rows, np.zeros(rows.size), np.asarray(booked_tokens, dtype=float),
                          None, 0.0)


def test_registered_under_its_name():
    assert SCORERS["round_robin"] is round_robin


def test_a_fresh_view_starts_at_its_version_and_scores_one_hot():
    # version 4 over 3 replicas: the rotation starts at id rank 4 mod 3 = 1
    assert round_robin(context(table(fleet({}, {}, {}), version=4), [0, 0, 0])).tolist() == [0.0, 1.0, 0.0]
    assert round_robin(context(table(fleet({}, {}, {}), version=6), [0, 0, 0])).tolist() == [1.0, 0.0, 0.0]


def test_the_replica_sent_the_least_since_the_view_is_next():
    t = table(fleet({}, {}, {}), version=0)
    assert round_robin(context(t, [64, 0, 64])).tolist() == [0.0, 1.0, 0.0]
    assert round_robin(context(t, [64, 128, 32])).tolist() == [0.0, 0.0, 1.0]


def test_reported_load_is_ignored():
    busy = {"running": 40, "waiting": 7, "kv_blocks_used": 99, "tokens_per_s": 990.0}
    t = table(fleet(busy, {}, {}), version=0)
    assert round_robin(context(t, [0, 0, 0])).tolist() == [1.0, 0.0, 0.0]


def test_only_candidates_take_turns():
    t = table(fleet({}, {}, {}, {}), version=1)  # rotation from r1; r1 is filtered out
    assert round_robin(context(t, [0, 0, 0], candidates=[0, 2, 3])).tolist() == [0.0, 1.0, 0.0]


def test_requests_go_around_the_replicas_in_turn_through_the_router():
    t = table(fleet({}, {}, {}, {}), version=2)
    bookings = Bookings("agent")
    picks = []
    for i in range(9):
        decision = ROUND_ROBIN.pick(replace(REQUEST, request_id=f"q{i}"), t, bookings, now=1.0)
        bookings.book(decision.replica_id, REQUEST.prompt_tokens, now=1.0)
        picks.append(decision.replica_id)
    assert picks == ["r2", "r3", "r0", "r1", "r2", "r3", "r0", "r1", "r2"]
