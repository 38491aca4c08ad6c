"""Table tests of the routing framework: table, filters, load guard, combine, pick."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.block_hash import block_hashes
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, SloClass
from policies.routing import (
    DEFAULT_ROUTING,
    Refusal,
    Router,
    RoutingTable,
    accepting,
    best_index,
    combine,
    fits_context,
    load_guard,
    not_excluded,
    serves_model,
)
from policies.scorers import SCORERS

BASE = ReplicaSnapshot(
    replica_id="r",
    model="m",
    pool="h100",
    gpu_type="H100",
    node_id="n0",
    state=ReplicaState.READY,
    kv_blocks_total=100,
    block_size=16,
    max_queue=4,
    prefill_tokens_per_s=1000.0,
    decode_step_s=0.02,
    max_batch_tokens_per_s=1000.0,
)
REQUEST = RoutingRequest("q", "m", prompt_tokens=64, max_tokens=16)
HASHES = block_hashes(list(range(16 * 4)), 16, "m")


def fleet(*overrides: dict) -> tuple[ReplicaSnapshot, ...]:
    return tuple(replace(BASE, replica_id=f"r{i}", **o) for i, o in enumerate(overrides))


def table(replicas, slo_classes=()) -> RoutingTable:
    return RoutingTable.from_view(FleetView(7, 0.0, tuple(replicas), tuple(slo_classes)))


# --- the table -----------------------------------------------------------------------


def test_table_columns_follow_the_view():
    t = table(fleet({"waiting": 2, "kv_blocks_used": 30}, {"model": "other"}))
    assert t.version == 7 and t.replica_ids == ("r0", "r1")
    assert t.index_of == {"r0": 0, "r1": 1}
    assert t.columns["waiting"].tolist() == [2.0, 0.0]
    assert t.columns["kv_blocks_used"].tolist() == [30.0, 0.0]
    assert t.kv_capacity_tokens.tolist() == [1600.0, 1600.0]
    assert t.prefix.rows == 2


def test_table_is_read_only():
    t = table(fleet({}))
    with pytest.raises(ValueError):
        t.columns["waiting"][0] = 5.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"prefill_tokens_per_s": 0.0},
            "replica 'r0': prefill_tokens_per_s must be finite and positive",
        ),
        ({"block_size": 0}, "replica 'r0': block_size must be finite and positive"),
        ({"waiting": -1}, "replica 'r0': waiting must be finite and >= 0"),
        ({"tokens_per_s": float("nan")}, "replica 'r0': tokens_per_s must be finite"),
        ({"cached_block_hashes": frozenset({-5})}, "unsigned 64-bit"),
    ],
)
def test_bad_snapshots_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        table(fleet(overrides))


def test_duplicate_replica_ids_are_refused():
    with pytest.raises(ValueError, match="replica_id 'r0' appears twice"):
        table([replace(BASE, replica_id="r0")] * 2)


# --- filters -------------------------------------------------------------------------


def test_serves_model():
    t = table(fleet({}, {"model": "other"}, {}))
    assert serves_model(REQUEST, t).tolist() == [True, False, True]
    assert serves_model(replace(REQUEST, model="nope"), t).tolist() == [False, False, False]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, True),
        ({"state": ReplicaState.STARTING}, False),
        ({"state": ReplicaState.DRAINING}, False),
        ({"state": ReplicaState.UNHEALTHY}, False),
        ({"state": ReplicaState.DEAD}, False),
        ({"waiting": 3, "max_queue": 4}, True),
        ({"waiting": 4, "max_queue": 4}, False),  # queue full
    ],
)
def test_accepting(overrides, expected):
    assert accepting(REQUEST, table(fleet(overrides))).tolist() == [expected]


def test_not_excluded_ignores_unknown_ids():
    request = replace(REQUEST, exclude=frozenset({"r1", "gone"}))
    assert not_excluded(request, table(fleet({}, {}, {}))).tolist() == [True, False, True]


@pytest.mark.parametrize(
    "prompt, max_tokens, expected",
    [(1000, 600, [True, False]), (1000, 601, [False, False]), (100, 60, [True, True])],
)
def test_fits_context(prompt, max_tokens, expected):
    # 100 blocks x 16 = 1600 tokens of KV, and 10 blocks = 160 tokens
    t = table(fleet({}, {"kv_blocks_total": 10}))
    request = replace(REQUEST, prompt_tokens=prompt, max_tokens=max_tokens)
    assert fits_context(request, t).tolist() == expected


@pytest.mark.parametrize(
    "utilisation, expected",
    [
        ([0.5, 0.95, 0.9], [True, False, True]),  # at the guard stays
        ([0.95, 0.99], [True, True]),  # all above: keep them all rather than none
    ],
)
def test_load_guard(utilisation, expected):
    assert load_guard(np.array(utilisation), 0.9).tolist() == expected


# --- combine and the total order ----------------------------------------------------


def test_combine_is_the_weighted_mean():
    scores = {"a": np.array([1.0, 0.0, 0.5]), "b": np.array([0.0, 1.0, 0.5])}
    assert combine(scores, {"a": 3.0, "b": 1.0}).tolist() == [0.75, 0.25, 0.5]


@pytest.mark.parametrize(
    "score, utilisation, id_rank, expected",
    [
        ([0.2, 0.9, 0.5], [0.0, 0.9, 0.0], [0, 1, 2], 1),  # score first
        ([0.9, 0.9, 0.5], [0.5, 0.1, 0.0], [0, 1, 2], 1),  # then lower utilisation
        ([0.9, 0.9, 0.9], [0.1, 0.1, 0.1], [2, 0, 1], 1),  # then lower replica id
    ],
)
def test_best_index_order(score, utilisation, id_rank, expected):
    assert best_index(np.array(score), np.array(utilisation), np.array(id_rank)) == expected


def test_equal_replicas_go_to_the_lowest_replica_id_whatever_their_order():
    replicas = list(fleet({}, {}, {}, {}, {}))
    rng = random.Random(3)
    for _ in range(20):
        rng.shuffle(replicas)
        assert Router().pick(REQUEST, table(replicas), None, 0.0).replica_id == "r0"


def test_ties_on_score_go_to_the_less_utilised_replica():
    # only prefix counts: both hold the whole prompt; r2 is less loaded than r1
    request = replace(REQUEST, block_hashes=HASHES)
    held = frozenset(HASHES)
    replicas = fleet(
        {}, {"cached_block_hashes": held, "waiting": 2}, {"cached_block_hashes": held, "waiting": 1}
    )
    decision = Router({"prefix": 1.0}).pick(request, table(replicas), None, 0.0)
    assert (decision.replica_id, decision.score, decision.utilisation) == ("r2", 1.0, 0.25)


replica_loads = st.lists(
    st.tuples(
        st.integers(0, 3),  # waiting
        st.integers(0, 100),  # kv blocks used
        st.sampled_from([1000.0, 4000.0]),  # capacity
        st.integers(0, 4),  # leading prompt blocks cached
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(loads=replica_loads, seed=st.integers(0, 2**16))
def test_the_pick_never_depends_on_the_order_of_the_replicas(loads, seed):
    replicas = [
        replace(
            BASE,
            replica_id=f"r{i}",
            waiting=w,
            kv_blocks_used=kv,
            max_batch_tokens_per_s=cap,
            cached_block_hashes=frozenset(HASHES[:cached]),
        )
        for i, (w, kv, cap, cached) in enumerate(loads)
    ]
    request = replace(REQUEST, block_hashes=HASHES)
    first = Router().pick(request, table(replicas), None, 0.0)
    random.Random(seed).shuffle(replicas)
    again = Router().pick(request, table(replicas), None, 0.0)
    assert (again.replica_id, again.score) == (first.replica_id, first.score)


# --- Router.pick ---------------------------------------------------------------------


def test_pick_reports_the_scores_of_its_choice():
    request = replace(REQUEST, block_hashes=HASHES)
    replicas = fleet({"cached_block_hashes": frozenset(HASHES[:2])}, {"kv_blocks_used": 50})
    decision = Router().pick(request, table(replicas), None, 0.0)
    assert decision.routed and decision.replica_id == "r0"
    assert dict(decision.scores) == {"prefix": 0.5, "load": 1.0, "slo_fit": 1.0, "kv": 1.0}
    assert decision.score == pytest.approx((3 * 0.5 + 2 + 1 + 1) / 7)
    assert (decision.candidates, decision.view_version, decision.refusal) == (2, 7, None)


def test_the_load_guard_keeps_prefix_affinity_off_a_hot_replica():
    request = replace(REQUEST, block_hashes=HASHES)
    hot = {"cached_block_hashes": frozenset(HASHES), "kv_blocks_used": 92}  # utilisation 0.92
    half = {"kv_blocks_used": 50}
    assert Router().pick(request, table(fleet(hot, half)), None, 0.0).replica_id == "r1"
    # without the guard, the cache hit outweighs the load
    unguarded = Router(load_guard=1.0).pick(request, table(fleet(hot, half)), None, 0.0)
    assert unguarded.replica_id == "r0"
    # and when every replica is hot, the guard keeps them all
    both_hot = fleet(hot, {"kv_blocks_used": 95})
    assert Router().pick(request, table(both_hot), None, 0.0).replica_id == "r0"


def test_heterogeneous_fleet_prefers_the_larger_free_capacity():
    l4 = {"gpu_type": "L4", "max_batch_tokens_per_s": 1000.0}
    h100 = {"max_batch_tokens_per_s": 4000.0, "kv_blocks_used": 50}
    decision = Router({"load": 1.0}).pick(REQUEST, table(fleet(l4, h100)), None, 0.0)
    assert (decision.replica_id, decision.scores["load"]) == ("r1", 1.0)


@pytest.mark.parametrize(
    "replicas, request_, refusal, reason",
    [
        (fleet({}), replace(REQUEST, model="x"), Refusal.NO_MODEL, "no replica serves model 'x'"),
        (fleet({}), replace(REQUEST, prompt_tokens=1600), Refusal.TOO_LONG, "needs 1616 tokens"),
        (
            fleet({"state": ReplicaState.DRAINING}, {"waiting": 4}),
            REQUEST,
            Refusal.FULL,
            "full or not ready",
        ),
        (
            fleet({}, {"waiting": 4}),
            replace(REQUEST, exclude=frozenset({"r0"})),
            Refusal.EXCLUDED,
            "excluded",
        ),
        ((), REQUEST, Refusal.NO_MODEL, "no replica serves model 'm'"),
    ],
)
def test_refusals_say_why(replicas, request_, refusal, reason):
    decision = Router().pick(request_, table(replicas), None, 0.0)
    assert decision.replica_id is None and not decision.routed
    assert decision.refusal is refusal and reason in decision.reason


def test_excluded_replicas_are_never_picked():
    request = replace(REQUEST, block_hashes=HASHES, exclude=frozenset({"r0"}))
    replicas = fleet({"cached_block_hashes": frozenset(HASHES)}, {})
    assert Router().pick(request, table(replicas), None, 0.0).replica_id == "r1"


def test_unknown_slo_class_is_refused_by_name():
    t = table(fleet({}), slo_classes=[SloClass("default", 1.0, 0.1)])
    with pytest.raises(ValueError, match="SLO class 'gold'; the fleet defines \\['default'\\]"):
        Router().pick(replace(REQUEST, slo_class="gold"), t, None, 0.0)


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError, match="prompt_tokens and max_tokens must be >= 0"):
        Router().pick(replace(REQUEST, max_tokens=-1), table(fleet({})), None, 0.0)


# --- Router configuration -----------------------------------------------------------


def test_defaults_are_prefix_aware_with_a_load_guard():
    assert dict(DEFAULT_ROUTING.weights) == {"prefix": 3.0, "load": 2.0, "slo_fit": 1.0, "kv": 1.0}
    assert DEFAULT_ROUTING.load_guard == 0.9
    assert set(DEFAULT_ROUTING.weights) <= set(SCORERS)
    router = Router()
    assert router.weights == DEFAULT_ROUTING.weights and router.load_guard == 0.9


@pytest.mark.parametrize(
    "weights, load_guard_, message",
    [
        (
            {"prefix": 1.0, "latency": 2.0},
            0.9,
            r"unknown scorer\(s\) \['latency'\]; known: \['kv', 'load', 'power_of_two', 'prefix', "
            r"'round_robin', 'slo_fit'\]",
        ),
        ({"prefix": -1.0}, 0.9, "weight 'prefix' must be a finite number >= 0"),
        ({"prefix": float("inf")}, 0.9, "weight 'prefix' must be a finite number >= 0"),
        ({"prefix": 0.0}, 0.9, "some scorer a positive weight"),
        ({}, 0.9, "some scorer a positive weight"),
        ({"prefix": 1.0}, 0.0, r"load_guard must be a utilisation in \(0, 1\]"),
        ({"prefix": 1.0}, 1.5, r"load_guard must be a utilisation in \(0, 1\]"),
    ],
)
def test_bad_router_config_is_refused(weights, load_guard_, message):
    with pytest.raises(ValueError, match=message):
        Router(weights, load_guard_)


def test_a_new_scorer_is_a_registry_entry():
    def least_waiting(ctx):
        return 1.0 / (1.0 + ctx.column("waiting"))

    router = Router({"least_waiting": 1.0}, scorers={**SCORERS, "least_waiting": least_waiting})
    decision = router.pick(REQUEST, table(fleet({"waiting": 2}, {"waiting": 1})), None, 0.0)
    assert (decision.replica_id, decision.scores["least_waiting"]) == ("r1", 0.5)


def test_a_scorer_outside_0_1_is_caught():
    router = Router({"broken": 1.0}, scorers={"broken": lambda ctx: ctx.column("waiting") + 2})
    with pytest.raises(ValueError, match="scorer 'broken' returned scores outside"):
        router.pick(REQUEST, table(fleet({})), None, 0.0)


def test_zero_weight_scorers_are_not_run():
    def explode(ctx):
        raise AssertionError("a weight-0 scorer ran")

    router = Router({"load": 1.0, "explode": 0.0}, scorers={**SCORERS, "explode": explode})
    assert router.pick(REQUEST, table(fleet({})), None, 0.0).replica_id == "r0"
