"""Bookings: what a router agent sent that the replicas' stats do not show yet."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from policies.block_hash import block_hashes
from policies.bookings import BookedLoad, Booking, Bookings
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest
from policies.routing import Router, RoutingTable

BASE = ReplicaSnapshot(
    replica_id="r",
    model="m",
    pool="h100",
    gpu_type="H100",
    node_id="n0",
    state=ReplicaState.READY,
    kv_blocks_total=2000,
    max_queue=16,
    prefill_tokens_per_s=8000.0,
    max_batch_tokens_per_s=3000.0,
)


def view(observed_at: dict[str, float]) -> FleetView:
    replicas = tuple(replace(BASE, replica_id=r, observed_at=t) for r, t in observed_at.items())
    return FleetView(1, 0.0, replicas)


def test_book_adds_to_the_replica_and_the_outbox():
    b = Bookings("a")
    first = b.book("r0", 100, now=1.0)
    b.book("r0", 50, now=1.1)
    b.book("r1", 10, now=1.2)
    assert first == Booking("a", 0, "r0", 100, 1.0)
    assert b.load("r0") == BookedLoad(2, 150)
    assert b.load("r1") == BookedLoad(1, 10)
    assert b.load("elsewhere") == BookedLoad(0, 0)
    assert dict(b.per_replica()) == {"r0": BookedLoad(2, 150), "r1": BookedLoad(1, 10)}
    assert [x.seq for x in b.drain_outbox()] == [0, 1, 2]
    assert b.drain_outbox() == ()  # only what is new since the last call
    assert len(b) == 3  # draining shares; it does not forget


def test_merge_adds_peer_bookings_once_and_skips_its_own():
    a, b = Bookings("a"), Bookings("b")
    a.book("r0", 100, now=1.0)
    shared = a.drain_outbox()
    assert b.merge(shared) == 1
    assert b.merge(shared) == 0  # the same booking twice counts once
    assert a.merge(shared) == 0  # its own
    assert b.load("r0") == BookedLoad(1, 100)
    assert b.drain_outbox() == ()  # a peer's bookings are not re-shared


@pytest.mark.parametrize(
    "observed_at, now, left",
    [
        ({"r0": 0.5, "r1": 0.5}, 1.5, {"r0": BookedLoad(2, 30), "r1": BookedLoad(1, 5)}),
        # r0 reported at 1.05: its stats include the booking made at 1.0, not the one at 1.1
        ({"r0": 1.05, "r1": 0.5}, 1.5, {"r0": BookedLoad(1, 20), "r1": BookedLoad(1, 5)}),
        # r1 is gone from the view: its bookings go too
        ({"r0": 0.5}, 1.5, {"r0": BookedLoad(2, 30)}),
        # TTL of 3 s passed for the bookings of 1.0 (at 4.05) but not of 1.1
        ({"r0": 0.5, "r1": 0.5}, 4.05, {"r0": BookedLoad(1, 20), "r1": BookedLoad(1, 5)}),
        ({"r0": 9.0, "r1": 9.0}, 9.0, {}),
    ],
)
def test_expire(observed_at, now, left):
    b = Bookings("a", ttl_s=3.0)
    b.book("r0", 10, now=1.0)
    b.book("r0", 20, now=1.1)
    b.book("r1", 5, now=1.1)
    dropped = b.expire(view(observed_at), now)
    assert dict(b.per_replica()) == left
    assert dropped == 3 - len(b)


def test_merge_skips_bookings_the_last_view_or_the_ttl_already_covers():
    a, b = Bookings("a", ttl_s=3.0), Bookings("b", ttl_s=3.0)
    a.book("r0", 10, now=1.0)  # covered by r0's report at 2.0
    a.book("r1", 10, now=1.0)  # past the TTL at 5.0
    a.book("r1", 10, now=4.0)  # live
    b.expire(view({"r0": 2.0, "r1": 0.0}), now=5.0)
    assert b.merge(a.drain_outbox()) == 1
    assert dict(b.per_replica()) == {"r1": BookedLoad(1, 10)}


def test_by_row_follows_every_change():
    index_of = {"r0": 0, "r1": 1, "r2": 2}
    b = Bookings("a")
    b.book("r1", 10, now=1.0)
    requests, tokens = b.by_row(index_of, 3)
    assert (requests.tolist(), tokens.tolist()) == ([0, 1, 0], [0, 10, 0])
    b.book("r1", 5, now=1.1)
    peer = Bookings("p")
    peer.book("r2", 7, now=1.1)
    peer.book("not-in-table", 7, now=1.1)
    b.merge(peer.drain_outbox())
    requests, tokens = b.by_row(index_of, 3)
    assert (requests.tolist(), tokens.tolist()) == ([0, 2, 1], [0, 15, 7])
    b.expire(view({"r0": 0.0, "r1": 1.05, "r2": 0.0, "not-in-table": 0.0}), now=1.2)
    requests, tokens = b.by_row(index_of, 3)
    assert (requests.tolist(), tokens.tolist()) == ([0, 1, 1], [0, 5, 7])
    with pytest.raises(ValueError):
        requests[0] = 1.0  # read-only


def test_by_row_rebuilds_for_a_new_table():
    b = Bookings("a")
    b.book("r1", 10, now=1.0)
    b.by_row({"r0": 0, "r1": 1}, 2)
    requests, _ = b.by_row({"r1": 0}, 1)  # the next view's table
    assert requests.tolist() == [1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"agent_id": ""}, "agent_id must be a non-empty"), ({"agent_id": "a", "ttl_s": 0}, "ttl_s")],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Bookings(**kwargs)


def test_negative_prompt_tokens_are_refused():
    with pytest.raises(ValueError, match="prompt_tokens must be >= 0"):
        Bookings("a").book("r0", -1, now=0.0)


# --- herding: a burst over a stale view -------------------------------------------

SYSTEM = list(range(1000, 1000 + 16 * 8))  # an 8-block system prompt every request shares


def burst(share_every: int | None, book: bool = True) -> Counter:
    """64 requests alternating between two router agents over one stale view of 4 equal
    replicas, of which r0 holds the shared system prompt. Agents exchange outboxes
    every `share_every` picks (never when None). Returns requests per replica."""
    cached = frozenset(block_hashes(SYSTEM, 16, "m"))
    replicas = tuple(
        replace(BASE, replica_id=f"r{i}", cached_block_hashes=cached if i == 0 else frozenset())
        for i in range(4)
    )
    table = RoutingTable.from_view(FleetView(1, 0.0, replicas))
    router, agents = Router(), (Bookings("a"), Bookings("b"))
    sent: Counter = Counter()
    for i in range(64):
        me = agents[i % 2]
        tokens = SYSTEM + list(range(i * 100, i * 100 + 32))
        request = RoutingRequest(f"q{i}", "m", len(tokens), 64, block_hashes(tokens, 16, "m"))
        now = 0.001 * i
        decision = router.pick(request, table, me, now)
        sent[decision.replica_id] += 1
        if book:
            me.book(decision.replica_id, request.prompt_tokens, now)
        if share_every and (i + 1) % share_every == 0:
            agents[0].merge(agents[1].drain_outbox())
            agents[1].merge(agents[0].drain_outbox())
    return sent


def spread(sent: Counter) -> int:
    counts = [sent.get(f"r{i}", 0) for i in range(4)]
    return max(counts) - min(counts)


def test_shared_bookings_spread_a_burst_that_one_agent_alone_would_pile_up():
    shared, private, blind = burst(share_every=4), burst(share_every=None), burst(None, book=False)
    assert sum(shared.values()) == sum(private.values()) == 64
    # sharing every 4 picks: within 4 of an even 16 each, the prefix holder included
    assert spread(shared) <= 4
    assert shared["r0"] >= 12
    # each agent alone books only its own half: r0 takes about twice its share
    assert spread(private) >= spread(shared) + 8
    assert private["r0"] >= 24
    # no bookings at all: every request sees the same stale view and lands on r0
    assert blind == Counter({"r0": 64})
