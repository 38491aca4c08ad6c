"""The migration policy: table tests over literal fleets for every rule, bound and tie, and
properties over random fleets (bounds, targets, one move per request, order-independence)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RequestStatus
from policies.migration import (
    InFlightMigration,
    MigrationPlan,
    MigrationReason,
    MigrationSettings,
    plan_migrations,
)
from policies.virtual_usage import project_moves

READY, DRAINING, UNHEALTHY = ReplicaState.READY, ReplicaState.DRAINING, ReplicaState.UNHEALTHY
DRAIN, PRIORITY = MigrationReason.DRAIN, MigrationReason.PRIORITY
DEFRAGMENT, BALANCE = MigrationReason.DEFRAGMENT, MigrationReason.BALANCE
NOW = 100.0
BYTES_PER_TOKEN = {"m": 1000, "n": 1000}
BLOCK_BYTES = 16 * 1000  # one 16-token block of model m


def req(rid: str, blocks: int, *, running: bool = True, priority: int = 0, slo: str = "batch",
        remaining: int = 100, arrived: float = 0.0) -> RequestStatus:
    """A request whose context fills exactly `blocks` 16-token blocks."""
    return RequestStatus(rid, priority, slo, blocks * 16, 0, remaining, running, arrived)


def rep(rid: str, *requests: RequestStatus, used: int | None = None, total: int = 100, model: str = "m",
        state: ReplicaState = READY, block_size: int = 16, max_queue: int = 256) -> ReplicaSnapshot:
    """A replica holding `requests`; its aggregates follow them unless `used` says otherwise."""
    running = [q for q in requests if q.running]
    queued = [q for q in requests if not q.running]
    return ReplicaSnapshot(
        replica_id=rid, model=model, pool=f"pool-{model}", gpu_type="A100-80GB", node_id=f"node-{rid}",
        state=state, running=len(running), waiting=len(queued),
        waiting_prompt_tokens=sum(q.prompt_tokens + q.output_tokens for q in queued),
        kv_blocks_used=sum(q.kv_blocks(block_size) for q in running) if used is None else used,
        kv_blocks_total=total, block_size=block_size, max_queue=max_queue, requests=tuple(requests))


def view(*replicas: ReplicaSnapshot) -> FleetView:
    return FleetView(1, 0.0, tuple(replicas))


def filler(rid: str, blocks: int, **kw) -> RequestStatus:
    """A running request that never moves (about to finish): load that stays put."""
    return req(rid, blocks, remaining=1, **kw)


def plan(fleet: FleetView, in_flight=(), now: float = NOW, **overrides) -> MigrationPlan:
    return plan_migrations(fleet, in_flight, now=now, settings=MigrationSettings(**overrides),
                           kv_bytes_per_token=BYTES_PER_TOKEN)


def moves(p: MigrationPlan, reason: MigrationReason | None = None) -> list[tuple[str, str, str]]:
    return [(d.request_id, d.source, d.target) for d in p.decisions if reason in (None, d.reason)]


# --- drain ---------------------------------------------------------------------------


def test_drain_moves_queued_first_then_running_smallest_first_to_the_least_loaded_ready_replica():
    fleet = view(
        rep("d", req("big", 8), req("small", 2), req("q1", 4, running=False), state=DRAINING),
        rep("a", filler("fa", 50)),
        rep("b", filler("fb", 20)),
        rep("c", model="n"),  # another model: never a target
        rep("e", state=UNHEALTHY),  # not READY: never a target
    )
    p = plan(fleet)
    assert moves(p) == [("q1", "d", "b"), ("small", "d", "b"), ("big", "d", "b")]
    assert [(d.reason, d.running, d.kv_blocks, d.est_bytes) for d in p.decisions] == [
        (DRAIN, False, 0, 0), (DRAIN, True, 2, 2 * BLOCK_BYTES), (DRAIN, True, 8, 8 * BLOCK_BYTES)]
    assert p.notes == ()


def test_drain_sends_each_request_where_it_leaves_the_least_load_after_the_plans_own_bookings():
    fleet = view(rep("d", req("r1", 30), req("r2", 30), state=DRAINING),
                 rep("a", filler("fa", 10)), rep("b", filler("fb", 20)))
    assert moves(plan(fleet)) == [("r1", "d", "a"), ("r2", "d", "b")]  # a at 0.4 after r1, b at 0.5 with r2


def test_drain_needs_room_on_the_target():
    # b is less loaded (0.5 of 10 blocks) but has no room for 8 blocks; a has
    fleet = view(rep("d", req("r", 8), state=DRAINING), rep("a", filler("fa", 60)),
                 rep("b", filler("fb", 5), total=10))
    assert moves(plan(fleet)) == [("r", "d", "a")]


def test_drain_breaks_ties_by_replica_id():
    fleet = view(rep("d", req("r", 4), state=DRAINING), rep("b"), rep("a"))
    assert moves(plan(fleet)) == [("r", "d", "a")]


def test_drain_says_why_requests_stay():
    fleet = view(rep("d", req("ending", 2, remaining=5), req("fresh", 2, arrived=NOW - 1),
                     req("huge", 90), state=DRAINING),
                 rep("a", filler("fa", 50)), rep("x", model="n"))
    p = plan(fleet)
    assert p.decisions == ()
    assert p.notes == ("drain d: 1 request(s) stay: about to finish",
                       "drain d: 1 request(s) stay: in cooldown",
                       "drain d: 1 request(s) stay: no READY replica of m has room")


def test_drain_of_a_replica_that_lists_no_requests_is_reported():
    fleet = view(replace(rep("d", state=DRAINING), running=3), rep("a"))
    assert plan(fleet).notes == ("drain d: it lists no requests; they finish in place",)


# --- priority ------------------------------------------------------------------------


def test_priority_moves_low_priority_running_requests_off_until_waiting_protected_ones_fit():
    # room = 100 - 95 used - 10 headroom = -5; the waiting interactive request needs 10: free 15
    fleet = view(rep("r", req("b1", 5), req("b2", 10), req("b3", 80),
                     req("i1", 10, running=False, priority=10, slo="interactive")),
                 rep("t"))
    p = plan(fleet, headroom={"interactive": 0.1})
    assert moves(p, PRIORITY) == [("b1", "r", "t"), ("b2", "r", "t")]


def test_priority_restores_short_headroom_with_nothing_waiting():
    fleet = view(rep("r", req("i", 5, priority=10, slo="interactive"), req("b30", 30), req("b60", 60)),
                 rep("t"))
    p = plan(fleet, headroom={"interactive": 0.1}, high_load=2.0)
    assert moves(p) == [("b30", "r", "t")]
    assert p.decisions[0].reason is PRIORITY


def test_priority_moves_the_lowest_priority_first_and_never_equal_or_higher():
    fleet = view(rep("r", req("mid", 2, priority=5), req("low", 8, priority=0),
                     req("peer", 1, priority=10, slo="interactive"),
                     req("i", 10, running=False, priority=10, slo="interactive"), used=95),
                 rep("t"))
    assert moves(plan(fleet, headroom={"interactive": 0.1}), PRIORITY) == [
        ("low", "r", "t"), ("mid", "r", "t")]


@pytest.mark.parametrize("fleet, note", [
    (view(rep("r", req("i", 10, running=False, priority=10, slo="interactive"), filler("f", 95)),
          rep("t", filler("ft", 91))),
     "priority r: still 15 KV block(s) short for protected requests: no more running requests of lower "
     "priority may move; 1 about to finish"),
    # t's 9 free blocks take neither b (40) nor i (10)
    (view(rep("r", req("b", 40), req("i", 10, running=False, priority=10, slo="interactive"), used=95),
          rep("t", filler("ft", 91))), "priority r: still 15 KV block(s) short for protected requests: no READY"),
])
def test_priority_says_why_it_cannot_free_enough(fleet, note):
    p = plan(fleet, headroom={"interactive": 0.1}, high_load=5.0)
    assert p.decisions == () and p.notes[0].startswith(note)


def test_priority_keeps_quiet_where_no_request_of_lower_priority_runs():
    # one class, all of it protected: nothing the rule could ever move, so no note every period
    fleet = view(rep("r", req("i", 10, running=False, priority=10, slo="interactive"),
                     filler("f", 95, priority=10, slo="interactive")), rep("t", filler("ft", 91)))
    p = plan(fleet, headroom={"interactive": 0.1}, high_load=5.0)
    assert moves(p, PRIORITY) == [] and not any(n.startswith("priority") for n in p.notes)


def test_priority_does_nothing_while_the_protected_requests_fit():
    fleet = view(rep("r", req("b", 50), req("i", 10, running=False, priority=10, slo="interactive")), rep("t"))
    assert moves(plan(fleet, headroom={"interactive": 0.1}), PRIORITY) == []


# --- defragment ----------------------------------------------------------------------


def test_defragment_frees_its_own_replica_with_the_smallest_moves():
    # q needs 40 blocks; a and b have 30 free each; freeing 10 on a (its own, on a tie) admits it
    fleet = view(rep("a", req("a1", 10), req("a2", 20), req("a3", 40), req("q", 40, running=False)),
                 rep("b", filler("b1", 70)))
    p = plan(fleet)
    assert moves(p) == [("a1", "a", "b")]
    assert p.decisions[0].reason is DEFRAGMENT


def test_defragment_frees_another_replica_and_sends_the_queued_request_there():
    fleet = view(rep("a", filler("a1", 75), req("q", 40, running=False)),
                 rep("b", req("b1", 5), req("b2", 6), filler("b3", 59)),
                 rep("c", filler("c1", 75)))
    p = plan(fleet)
    assert moves(p) == [("b1", "b", "c"), ("b2", "b", "c"), ("q", "a", "b")]
    assert {d.reason for d in p.decisions} == {DEFRAGMENT}


def test_defragment_uses_the_headroom_kept_for_the_class_every_request_is_in():
    # all interactive, 10% kept free for interactive: that headroom is theirs to use, so b
    # takes a1 (6 blocks into its 15 free) and a then has the 20 that q needs
    i = {"slo": "interactive", "priority": 10}
    fleet = view(rep("a", req("a1", 6, **i), filler("a2", 79, **i), req("q", 20, running=False, **i)),
                 rep("b", filler("b1", 85, **i)))
    assert moves(plan(fleet, headroom={"interactive": 0.1})) == [("a1", "a", "b")]
    # a batch request may not use it: b keeps its 10 blocks free of a1
    batch = view(rep("a", req("a1", 6), filler("a2", 79, **i), req("q", 20, running=False, **i)),
                 rep("b", filler("b1", 85, **i)))
    assert plan(batch, headroom={"interactive": 0.1}, high_load=5.0).decisions == ()


def test_defragment_is_all_or_nothing():
    # b could give 5 blocks but needs to give 10; nothing is half-done
    fleet = view(rep("a", filler("a1", 75), req("q", 40, running=False)),
                 rep("b", req("b1", 5), filler("b2", 65)),
                 rep("c", filler("c1", 75)))
    p = plan(fleet)
    assert p.decisions == ()
    assert p.notes == ("defragment m: 1 queued request(s) fit on no replica and none can free enough "
                       "KV blocks (first: q)",)


def test_defragment_leaves_a_request_that_fits_somewhere_to_balancing():
    fleet = view(rep("a", filler("a1", 80), req("q", 30, running=False)), rep("b", filler("b1", 60)))
    assert moves(plan(fleet), DEFRAGMENT) == []


# --- balance -------------------------------------------------------------------------


def test_a_queued_request_that_cannot_start_where_it_waits_goes_where_it_starts_at_once():
    # a: 90 of 100 blocks used, so q (20) waits; b and c could start it, c leaves it less loaded
    fleet = view(rep("a", filler("fa", 90), req("q", 20, running=False, arrived=NOW)),
                 rep("b", filler("fb", 70)), rep("c", filler("fc", 50)))
    p = plan(fleet, high_load=5.0, cooldown_s=30.0)  # balancing off; a queued request skips its cooldown
    assert moves(p) == [("q", "a", "c")]
    assert [(d.reason, d.running, d.kv_blocks, d.est_bytes) for d in p.decisions] == [(BALANCE, False, 0, 0)]


def test_a_queued_request_that_starts_where_it_waits_stays():
    fleet = view(rep("a", filler("fa", 50), req("q1", 20, running=False), req("q2", 20, running=False)),
                 rep("b"))
    assert moves(plan(fleet, high_load=5.0)) == []  # 50 + 20 + 20 <= 100: both start at a in turn


def test_the_requests_queued_ahead_count_and_so_does_the_targets_own_queue():
    # at a, q1 (30) starts in 40 free blocks, q2 (30) behind it does not; b has 50 free but its
    # own queued 30 come first, leaving 20: q2 goes to c
    fleet = view(rep("a", filler("fa", 60), req("q1", 30, running=False, arrived=1.0),
                     req("q2", 30, running=False, arrived=2.0)),
                 rep("b", filler("fb", 50), req("qb", 30, running=False)), rep("c", filler("fc", 65)))
    assert moves(plan(fleet, high_load=5.0)) == [("q2", "a", "c")]


def test_balance_moves_fewest_blocks_first_until_the_gap_closes():
    fleet = view(rep("a", *(req(f"a{i:02d}", 5) for i in range(16))), rep("b", filler("b", 20)))
    p = plan(fleet, high_load=0.6, max_per_replica=8)
    # 0.8 vs 0.2, 0.05 a move: the gap is 0.2 after four, which is not above the threshold
    assert moves(p) == [(f"a{i:02d}", "a", "b") for i in range(4)]
    assert {d.reason for d in p.decisions} == {BALANCE}


def test_balance_moves_queued_requests_first_and_never_overshoots():
    fleet = view(rep("a", req("r2", 2), req("big", 80), req("q", 8, running=False)), rep("b", filler("b", 10)))
    p = plan(fleet)
    # q (nothing to copy) first, then r2; big would leave b more loaded than a
    assert moves(p) == [("q", "a", "b"), ("r2", "a", "b")]


def test_balance_compares_usage_normalised_to_each_replicas_capacity():
    # 40 of 50 blocks (0.8) against 160 of 400 (0.4): the small replica is the loaded one
    fleet = view(rep("small", req("s1", 5), filler("s2", 35), total=50), rep("large", filler("l", 160), total=400))
    assert moves(plan(fleet)) == [("s1", "small", "large")]


@pytest.mark.parametrize("fleet", [
    view(rep("a", req("a1", 5), filler("f", 60)), rep("b")),  # 0.65: below high_load
    view(rep("a", req("a1", 5), filler("f", 85)), rep("b", filler("fb", 55))),  # b above low_load
    view(rep("a", req("a1", 5), filler("f", 85)), rep("b", model="n")),  # another model
    view(rep("a", req("a1", 5), filler("f", 85)), rep("b", filler("fb", 75), total=100, state=DRAINING)),
])
def test_balance_leaves_alone(fleet):
    assert moves(plan(fleet), BALANCE) == []


def test_balance_ties_go_to_the_lower_replica_id_on_both_sides():
    fleet = view(rep("b", req("b1", 5), filler("fb", 85)), rep("a", req("a1", 5), filler("fa", 85)),
                 rep("d"), rep("c"))
    assert moves(plan(fleet, max_per_replica=1))[:2] == [("a1", "a", "c"), ("b1", "b", "d")]


def test_balance_ties_between_equal_requests_go_to_the_lower_request_id():
    fleet = view(rep("a", req("z", 5), req("y", 5), filler("f", 80)), rep("b"))
    assert moves(plan(fleet, max_concurrent=1)) == [("y", "a", "b")]


# --- bounds --------------------------------------------------------------------------


def test_at_most_max_per_replica_copies_per_replica():
    fleet = view(rep("d", *(req(f"r{i}", 2) for i in range(5)), state=DRAINING), rep("a"), rep("b"))
    p = plan(fleet, max_per_replica=2)
    assert moves(p) == [("r0", "d", "a"), ("r1", "d", "b")]
    assert p.notes == ("drain d: 3 request(s) stay: replica d has 2 KV copies in flight (max_per_replica)",)


def test_copies_in_flight_count_against_the_bounds():
    fleet = view(rep("d", *(req(f"r{i}", 2) for i in range(3)), state=DRAINING), rep("a"), rep("b"))
    from_d = [InFlightMigration("gone", "d", "x", BLOCK_BYTES)]
    assert moves(plan(fleet, from_d, max_per_replica=2)) == [("r0", "d", "a")]
    into_a = [InFlightMigration("gone", "x", "a", BLOCK_BYTES)]
    assert moves(plan(fleet, into_a, max_per_replica=1)) == [("r0", "d", "b")]


def test_at_most_max_concurrent_copies_cluster_wide():
    fleet = view(rep("d1", req("r1", 2), req("r2", 2), state=DRAINING),
                 rep("d2", req("r3", 2), req("r4", 2), state=DRAINING), rep("a"), rep("b"))
    in_flight = [InFlightMigration("gone", "x", "y", BLOCK_BYTES)]
    assert len(plan(fleet, in_flight, max_concurrent=3, max_per_replica=5).decisions) == 2


def test_the_bandwidth_budget_counts_bytes_in_flight():
    fleet = view(rep("d", req("r1", 2), req("r2", 2), state=DRAINING), rep("a"))
    budget = dict(bandwidth_bytes_per_s=50_000, bandwidth_window_s=1.0)  # three blocks
    assert moves(plan(fleet, **budget)) == [("r1", "d", "a")]
    in_flight = [InFlightMigration("gone", "x", "y", 20_000)]
    p = plan(fleet, in_flight, **budget)
    assert p.decisions == () and "bandwidth budget" in p.notes[0]


def test_balance_says_when_the_bounds_stop_it():
    fleet = view(rep("a", req("a1", 5), filler("f", 85)), rep("b"))
    p = plan(fleet, max_concurrent=0)
    assert p.decisions == () and p.notes == ("balance m: 0 KV copies in flight cluster-wide (max_concurrent 0)",)


def test_queued_requests_are_re_dispatched_whatever_the_copy_bounds():
    fleet = view(rep("d", req("q", 2, running=False), req("r", 2), state=DRAINING), rep("a"))
    assert moves(plan(fleet, max_concurrent=0)) == [("q", "d", "a")]


def test_queued_requests_need_a_queue_slot_on_the_target():
    fleet = view(rep("d", req("q", 2, running=False), state=DRAINING),
                 rep("a", req("qa", 1, running=False), max_queue=1), rep("b", filler("fb", 90)))
    assert moves(plan(fleet)) == [("q", "d", "b")]


# --- what never moves ----------------------------------------------------------------


def test_requests_in_flight_are_not_moved_again_and_their_moves_count_as_done():
    fleet = view(rep("a", req("x", 40), filler("f", 50)), rep("b", filler("g", 10)))
    assert moves(plan(fleet)) == [("x", "a", "b")]  # 0.9 against 0.1
    assert plan(fleet, [InFlightMigration("x", "a", "b", 40 * BLOCK_BYTES)]).decisions == ()


def test_a_request_listed_on_two_replicas_is_mid_handoff_and_stays():
    x = req("x", 4)
    fleet = view(rep("d", x, state=DRAINING), rep("a", x))
    assert plan(fleet).decisions == ()


def test_cooldown_and_about_to_finish_hold_requests_in_place():
    fleet = view(rep("a", req("fresh", 5, arrived=NOW - 4), req("ending", 5, remaining=15), filler("f", 80)),
                 rep("b"))
    assert plan(fleet, cooldown_s=5.0, min_remaining_tokens=16).decisions == ()
    assert moves(plan(fleet, cooldown_s=3.0, min_remaining_tokens=15)) == [
        ("ending", "a", "b"), ("fresh", "a", "b")]


def test_disabled_the_policy_only_drains():
    fleet = view(rep("d", req("r", 2), state=DRAINING), rep("a", req("a1", 5), filler("f", 85)), rep("b"))
    p = plan(fleet, enabled=False)
    assert moves(p) == [("r", "d", "b")]
    assert p.notes == ("migration is disabled: only drains move requests",)
    assert moves(plan(fleet)) == [("r", "d", "b"), ("a1", "a", "b")]


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"low_load": 0.8, "high_load": 0.7}, "low_load"),
    ({"balance_gap": -0.1}, "balance_gap"),
    ({"max_per_replica": -1}, "max_per_replica"),
    ({"bandwidth_bytes_per_s": 0}, "bandwidth_bytes_per_s"),
    ({"cooldown_s": -1}, "cooldown_s"),
    ({"headroom": {"interactive": 1.0}}, "headroom"),
])
def test_bad_settings_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        MigrationSettings(**overrides)


def test_headroom_accepts_a_mapping_and_keeps_it_hashable():
    s = MigrationSettings(headroom={"interactive": 0.1, "batch": 0.0})
    assert s.headroom == (("batch", 0.0), ("interactive", 0.1)) and hash(s)


@pytest.mark.parametrize("fleet, message", [
    (view(rep("a", req("r", 2), model="unknown")), "model 'unknown'"),
    (view(rep("a"), rep("a")), "replica a twice"),
    (view(rep("a", used=-1)), "kv_blocks_used"),
])
def test_bad_views_are_refused_by_name(fleet, message):
    with pytest.raises(ValueError, match=message):
        plan(fleet)


# --- properties ----------------------------------------------------------------------

_requests = st.lists(st.tuples(
    st.booleans(),  # running
    st.integers(1, 1600),  # prompt tokens
    st.integers(0, 60),  # output tokens
    st.integers(0, 80),  # remaining tokens
    st.sampled_from([(0, "batch"), (10, "interactive")]),
    st.floats(0, NOW),  # arrived at
), max_size=6)
_replicas = st.lists(st.tuples(
    st.sampled_from([READY, READY, READY, DRAINING, UNHEALTHY]),
    st.sampled_from(["m", "n"]),
    st.integers(0, 120),  # KV blocks in total
    st.sampled_from([16, 32]),
    st.integers(0, 8),  # blocks used beyond those of its running requests
    st.integers(1, 4),  # max queue
    _requests,
), min_size=1, max_size=6)
_settings = st.builds(
    lambda loads, gap, per, total, rate, remaining, cooldown, room: MigrationSettings(
        balance_gap=gap, low_load=min(loads), high_load=max(loads), max_per_replica=per, max_concurrent=total,
        bandwidth_bytes_per_s=rate, min_remaining_tokens=remaining, cooldown_s=cooldown,
        headroom={"interactive": room}),
    st.tuples(st.floats(0, 1.2), st.floats(0, 1.2)), st.floats(0, 0.5), st.integers(0, 3), st.integers(0, 5),
    st.sampled_from([1e4, 1e5, 1e6, 1e9]), st.integers(0, 30), st.sampled_from([0.0, 10.0, 50.0]),
    st.sampled_from([0.0, 0.1, 0.3]))


def _fleet(replicas) -> FleetView:
    out, n = [], 0
    for i, (state, model, total, bs, extra, max_queue, requests) in enumerate(replicas):
        listed = []
        for running, prompt, output, remaining, (priority, slo), arrived in requests:
            listed.append(RequestStatus(f"q{n}", priority, slo, prompt, output, output + remaining, running, arrived))
            n += 1
        r = rep(f"r{i}", *listed, total=total, model=model, state=state, block_size=bs, max_queue=max_queue)
        out.append(replace(r, kv_blocks_used=r.kv_blocks_used + extra))
    return view(*out)


@settings(max_examples=150, deadline=None)
@given(replicas=_replicas, s=_settings, moving=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 9)),
                                                         max_size=4), seed=st.integers(0, 2**16))
def test_no_plan_breaks_a_rule(replicas, s, moving, seed):
    fleet = _fleet(replicas)
    where = {q.request_id: r for r in fleet.replicas for q in r.requests}
    listed = sorted(where)
    picked = {listed[i % len(listed)]: t for i, t in moving} if listed else {}
    in_flight = [InFlightMigration(rid, where[rid].replica_id, f"r{t % len(fleet.replicas)}", 16_000 * (1 + t % 3))
                 for rid, t in sorted(picked.items()) if f"r{t % len(fleet.replicas)}" != where[rid].replica_id]
    p = plan_migrations(fleet, in_flight, now=NOW, settings=s, kv_bytes_per_token=BYTES_PER_TOKEN)
    migrating = {m.request_id for m in in_flight}

    assert len({d.request_id for d in p.decisions}) == len(p.decisions)  # one move per request
    for d in p.decisions:
        src, tgt, q = fleet.replica(d.source), fleet.replica(d.target), where[d.request_id]
        assert q is src and src.state in (READY, DRAINING)
        assert tgt.state is READY and tgt.model == src.model and tgt is not src
        assert d.request_id not in migrating
        request = next(x for x in src.requests if x.request_id == d.request_id)
        assert request.remaining_tokens >= s.min_remaining_tokens
        # only a queued request that cannot start where it waits skips its cooldown (to start at once)
        assert NOW - request.arrived_at >= s.cooldown_s or (not request.running and d.reason is BALANCE)
        assert d.running == request.running
        assert d.kv_blocks == (request.kv_blocks(src.block_size) if d.running else 0)
        tokens = request.prompt_tokens + request.output_tokens
        assert d.est_bytes == (tokens * BYTES_PER_TOKEN[src.model] if d.running else 0)

    copies = [(m.source, m.target, m.est_bytes) for m in in_flight if m.running]
    planned = [(d.source, d.target, d.est_bytes) for d in p.decisions if d.running]
    assert len(planned) <= max(0, s.max_concurrent - len(copies))
    assert sum(b for *_, b in planned) <= max(0, s.bandwidth_bytes - sum(b for *_, b in copies))
    before, new = Counter(), Counter()
    for src, tgt, _ in copies:
        before.update((src, tgt))
    for src, tgt, _ in planned:
        new.update((src, tgt))
    assert all(n <= max(0, s.max_per_replica - before[rid]) for rid, n in new.items())

    # targets have the blocks (KV copies) or queue slots (re-dispatches) for what they receive
    done = [(m.request_id, m.source, m.target) for m in in_flight
            if fleet.replica(m.target) is not None and all(q.request_id != m.request_id
                                                           for q in fleet.replica(m.target).requests)]
    projected = project_moves(project_moves(fleet, done), [(d.request_id, d.source, d.target) for d in p.decisions])
    for rid in {d.target for d in p.decisions if d.running}:
        r = projected.replica(rid)
        assert r.kv_blocks_used <= r.kv_blocks_total
    for rid in {d.target for d in p.decisions if not d.running}:
        r = projected.replica(rid)
        assert r.waiting <= r.max_queue

    shuffled = list(fleet.replicas)
    random.Random(seed).shuffle(shuffled)
    shuffled = [replace(r, requests=tuple(reversed(r.requests))) for r in shuffled]
    again = plan_migrations(view(*shuffled), in_flight, now=NOW, settings=s, kv_bytes_per_token=BYTES_PER_TOKEN)
    assert again == p  # no dependence on the order of the view
