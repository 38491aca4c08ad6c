"""Table tests of each routing scorer over literal replica snapshots."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from policies.block_hash import block_hashes
from policies.bookings import Bookings
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, SloClass
from policies.routing import RoutingTable
from policies.scorers import SCORERS, ScoringContext, kv, load, power_of_two, prefix, round_robin, slo_fit

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
REQUEST = RoutingRequest("q", "m", prompt_tokens=500, max_tokens=50)


def fleet(*overrides: dict) -> tuple[ReplicaSnapshot, ...]:
    return tuple(replace(BASE, replica_id=f"r{i}", **o) for i, o in enumerate(overrides))


def context(
    replicas: tuple[ReplicaSnapshot, ...],
    request: RoutingRequest = REQUEST,
    slo: SloClass | None = None,
    bookings: Bookings | None = None,
    now: float = 0.0,
) -> ScoringContext:
    """What `Router.pick` hands the scorers, with every replica a candidate."""
    table = RoutingTable.from_view(FleetView(1, 0.0, replicas))
    rows = np.arange(len(table))
    booked_requests, booked_tokens = table.booked(bookings, rows)
    return ScoringContext(
        request=request,
        table=table,
        candidates=rows,
        utilisation=table.utilisation(rows, booked_requests, booked_tokens),
        booked_tokens=booked_tokens,
        slo=slo,
        now=now,
    )


def test_registry_names_every_scorer():
    assert dict(SCORERS) == {"load": load, "kv": kv, "prefix": prefix, "slo_fit": slo_fit,
                             "round_robin": round_robin, "power_of_two": power_of_two}


# --- load ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "replicas, expected",
    [
        # same GPU: free capacity follows utilisation (KV, queue, throughput)
        (
            fleet({}, {"kv_blocks_used": 50}, {"waiting": 3}, {"tokens_per_s": 250.0}),
            [1.0, 0.5, 0.25, 0.75],
        ),
        # waiting prompts count as KV demand: 800 tokens / 16 = 50 blocks of 100
        (fleet({}, {"waiting": 1, "waiting_prompt_tokens": 800}), [1.0, 0.5]),
        # an idle L4 vs a half-loaded H100 with 4x the capacity: the H100 has more room
        (
            fleet(
                {"gpu_type": "L4", "max_batch_tokens_per_s": 1000.0},
                {"max_batch_tokens_per_s": 4000.0, "kv_blocks_used": 50},
            ),
            [0.5, 1.0],
        ),
        # nobody has room: all zero, no division by zero
        (fleet({"kv_blocks_used": 100}, {"waiting": 4, "max_queue": 4}), [0.0, 0.0]),
    ],
)
def test_load(replicas, expected):
    assert load(context(replicas)).tolist() == expected


def test_load_counts_bookings_the_stats_do_not_show_yet():
    bookings = Bookings("agent")
    bookings.book("r1", prompt_tokens=16, now=0.0)  # one of max_queue=4: utilisation 0.25
    assert load(context(fleet({}, {}), bookings=bookings)).tolist() == [1.0, 0.75]


# --- kv ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, 1.0),
        ({"kv_blocks_used": 25}, 0.75),
        ({"kv_blocks_used": 100}, 0.0),
        ({"kv_blocks_used": 120, "kv_blocks_total": 100}, 0.0),  # over-reported: clipped
        ({"kv_blocks_total": 0}, 0.0),  # no KV at all counts as full
    ],
)
def test_kv(overrides, expected):
    assert kv(context(fleet(overrides))).tolist() == [expected]


def test_kv_counts_booked_prompts_as_placed():
    bookings = Bookings("agent")
    bookings.book("r0", prompt_tokens=160, now=0.0)  # 10 blocks of 16 tokens
    assert kv(context(fleet({}), bookings=bookings)).tolist() == [0.9]


# --- prefix --------------------------------------------------------------------------

PROMPT = list(range(16 * 4))
HASHES = block_hashes(PROMPT, 16, "m")


@pytest.mark.parametrize(
    "held, expected",
    [
        (HASHES, 1.0),
        (HASHES[:2], 0.5),
        (HASHES[1:], 0.0),  # lost the first block: nothing leads
        ((HASHES[0], HASHES[2], HASHES[3]), 0.25),  # lost an inner block
        ((), 0.0),
    ],
)
def test_prefix(held, expected):
    request = replace(REQUEST, block_hashes=HASHES)
    ctx = context(fleet({"cached_block_hashes": frozenset(held)}), request=request)
    assert prefix(ctx).tolist() == [expected]


def test_prefix_of_a_request_without_full_blocks_is_zero():
    ctx = context(fleet({"cached_block_hashes": frozenset(HASHES)}))
    assert prefix(ctx).tolist() == [0.0]


# --- slo_fit -------------------------------------------------------------------------

SLO = SloClass("interactive", ttft_s=1.0, tpot_s=0.05)


@pytest.mark.parametrize(
    "overrides, now, expected",
    [
        # TTFT 500/1000 = 0.5 s, TPOT 0.02 s: both met
        ({}, 0.0, 1.0),
        # 1500 queued tokens: TTFT (1500 + 500)/1000 = 2 s, half the target
        ({"waiting": 1, "waiting_prompt_tokens": 1500}, 0.0, 0.5),
        # the same queue, observed 1 s ago: 1000 tokens drained since, TTFT 1 s
        ({"waiting": 1, "waiting_prompt_tokens": 1500}, 1.0, 1.0),
        # slow decode at utilisation 0.25: TPOT 0.04 * 1.25 = 0.05 s, just met
        ({"decode_step_s": 0.04, "kv_blocks_used": 25}, 0.0, 1.0),
        # TPOT 0.05 * 1.25 = 0.0625 s: 0.05/0.0625 of the target
        ({"decode_step_s": 0.05, "kv_blocks_used": 25}, 0.0, 0.8),
        # the worse of the two counts: TTFT 2 s (0.5) and, at utilisation 1/4 (queue),
        # TPOT 0.0625 s (0.8)
        (
            {
                "waiting": 1,
                "waiting_prompt_tokens": 1500,
                "kv_blocks_total": 1000,
                "decode_step_s": 0.05,
            },
            0.0,
            0.5,
        ),
    ],
)
def test_slo_fit_against_targets(overrides, now, expected):
    ctx = context(fleet(overrides), slo=SLO, now=now)
    assert slo_fit(ctx).tolist() == [pytest.approx(expected)]


def test_slo_fit_counts_booked_tokens_in_the_queue():
    bookings = Bookings("agent")
    bookings.book("r0", prompt_tokens=1500, now=0.0)
    ctx = context(fleet({}), slo=SLO, bookings=bookings)
    assert slo_fit(ctx).tolist() == [pytest.approx(0.5)]


def test_slo_fit_without_slo_classes_is_relative_to_the_best_candidate():
    # TTFT 0.5 s, 1 s and 2 s: the fastest scores 1, the others by ratio
    replicas = fleet(
        {}, {"prefill_tokens_per_s": 500.0}, {"waiting": 1, "waiting_prompt_tokens": 1500}
    )
    assert slo_fit(context(replicas, slo=None)).tolist() == [1.0, 0.5, 0.25]
