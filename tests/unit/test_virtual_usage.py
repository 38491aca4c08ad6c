"""Virtual usage, the ledger a migration plan books on, and the projected view after a plan."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from policies.migration import apply_plan_to_view
from policies.virtual_usage import LoadLedger, project_moves, virtual_usage
from tests.unit.test_migration_policy import DRAINING, NOW, filler, plan, rep, req, view

# --- virtual usage -------------------------------------------------------------------


@pytest.mark.parametrize("replica, headroom, expected", [
    (rep("a", used=50), {}, 0.5),
    (rep("a", req("q", 10, running=False), used=50), {}, 0.6),  # queued demand counts
    (rep("a", used=100, total=200), {}, 0.5),  # normalised per replica's own capacity
    (rep("a", req("i", 5, slo="interactive"), used=50), {"interactive": 0.1}, 0.6),  # headroom
    (rep("a", req("i", 5, slo="interactive"), req("x", 5, slo="x"), used=50), {"interactive": 0.1, "x": 0.2}, 0.7),
    (rep("a", used=0, total=0), {}, math.inf),  # no capacity: never a target
    (replace(rep("a", used=0), waiting=3, waiting_prompt_tokens=20 * 16), {}, 0.2),  # the aggregate, when larger
])
def test_virtual_usage(replica, headroom, expected):
    assert virtual_usage(replica, headroom) == pytest.approx(expected)


def test_the_ledger_takes_migrations_in_flight_as_done():
    moving = req("x", 40)
    fleet = view(rep("a", moving, filler("f", 40)), rep("b", filler("g", 10)), rep("c", moving))
    ledger = LoadLedger(fleet, {}, [("x", "a", "b")])
    assert (ledger.usage("a"), ledger.usage("b")) == (0.4, 0.5)
    # the target lists it already (a handoff under way): it is not counted twice
    ledger = LoadLedger(fleet, {}, [("x", "a", "c")])
    assert (ledger.usage("a"), ledger.usage("c")) == (0.4, 0.4)


@pytest.mark.parametrize("holds, for_class, reserved", [
    ("interactive", None, 10),  # from any request: the headroom of the classes it holds
    ("interactive", "batch", 10),  # kept free for interactive, not for batch
    ("interactive", "interactive", 0),  # ... which may use it
    ("batch", "interactive", 0),  # an interactive request brings its own headroom, and may use it
    ("x", "interactive", 10),  # x keeps 0.2 free: interactive (0.1) may use half of it
])
def test_headroom_is_held_back_from_other_classes_not_from_its_own(holds, for_class, reserved):
    ledger = LoadLedger(view(rep("a", req("q", 50, slo=holds))), {"interactive": 0.1, "x": 0.2})
    assert ledger.reserved_blocks("a", for_class) == reserved
    if for_class is not None:
        assert ledger.room("a", req("n", 1, slo=for_class)) == 50 - reserved


# --- the projected view --------------------------------------------------------------


def test_apply_plan_to_view_moves_requests_and_their_load():
    fleet = view(rep("d", req("r", 3), req("q", 2, running=False), state=DRAINING), rep("a", filler("f", 10)))
    after = apply_plan_to_view(fleet, plan(fleet), now=NOW)
    d, a = after.replica("d"), after.replica("a")
    assert (d.requests, d.running, d.waiting, d.waiting_prompt_tokens, d.kv_blocks_used) == ((), 0, 0, 0, 0)
    assert {q.request_id for q in a.requests} == {"f", "q", "r"}
    assert (a.running, a.waiting, a.waiting_prompt_tokens, a.kv_blocks_used) == (2, 1, 32, 13)
    assert {q.arrived_at for q in a.requests if q.request_id != "f"} == {NOW}
    assert after.version == fleet.version


def test_projection_converts_blocks_to_the_targets_block_size():
    fleet = view(rep("a", req("r", 4)), rep("b", block_size=32))
    assert project_moves(fleet, [("r", "a", "b")]).replica("b").kv_blocks_used == 2


@pytest.mark.parametrize("move, message", [
    (("r", "a", "zz"), "replica zz is not in the view"),
    (("nope", "a", "b"), "replica a does not list it"),
])
def test_projection_refuses_moves_it_cannot_make(move, message):
    with pytest.raises(ValueError, match=message):
        project_moves(view(rep("a", req("r", 4)), rep("b")), [move])
