"""The migration mechanism in the controller, driven by hand with fake replicas and a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from actors.engines.base import RequestStatus
from actors.replica_client import ReplicaUnavailable
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.errors import Conflict, Invalid, NotFound
from tests.fakes import FakeClock, FakeReplica, FakeRouter

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}, {"name": "other", "arch": "llama-2-7b"}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 3},
              {"name": "l4", "gpu_type": "L4", "model": "other", "replicas": 1}],
    "migration": {"switch_below_tokens": 16, "precopy_rounds": 3, "max_per_replica": 1},
}


@pytest.fixture
async def fleet():
    clock, replicas = FakeClock(), {}

    def launch(spec, placement):
        replicas[spec.replica_id] = FakeReplica(spec, placement, clock)
        return replicas[spec.replica_id]

    controller = Controller(parse_config(CONFIG), launcher=launch, router_launcher=lambda a, s: FakeRouter(a),
                            clock=clock)
    await settle(controller)
    return controller, replicas


async def settle(controller, ticks: int = 2):
    for _ in range(ticks):
        await controller.step()
        await asyncio.sleep(0)


async def until_ended(controller) -> None:
    for _ in range(100):
        if not controller.migrations.active:
            return
        await asyncio.sleep(0)
    raise AssertionError("migration never ended")


def put_request(replica: FakeReplica, request_id: str, output: int = 10, max_tokens: int = 200,
                running: bool = True) -> None:
    replica.requests += (RequestStatus(request_id, 0, "interactive", 100, output, max_tokens, running, 0.0),)


def h100(replicas) -> list[FakeReplica]:
    return sorted((r for r in replicas.values() if r.spec.pool == "h100"), key=lambda r: r.replica_id)


async def test_a_decoding_request_is_precopied_then_handed_off(fleet):
    controller, replicas = fleet
    source, target, _ = h100(replicas)
    put_request(source, "q1")
    await controller.step()  # the controller learns where q1 runs
    view = controller.migrate_request("q1", target.replica_id)
    assert view.state == "prefetching" and view.est_bytes == 110 * 524288
    await until_ended(controller)
    [done] = controller.recent_migrations()
    assert done.state == "done" and source.handed_off == [("q1", target.replica_id)]
    # each round warms what the source had made by then; it stops once the rest is small
    assert [r[0] for r in done.precopy_rounds] == target.prefetched and len(target.prefetched) >= 1
    assert controller.metrics["flotilla_migrations_total"].labels("manual", "done")._value.get() == 1


async def test_a_queued_request_moves_by_redispatch_without_precopy(fleet):
    controller, replicas = fleet
    source, target, _ = h100(replicas)
    put_request(source, "q2", output=0, running=False)
    await controller.step()
    controller.migrate_request("q2", target.replica_id)
    await until_ended(controller)
    assert target.prefetched == [] and source.handed_off == [("q2", target.replica_id)]


async def test_a_request_that_ends_during_precopy_aborts_the_migration(fleet):
    controller, replicas = fleet
    source, target, _ = h100(replicas)
    put_request(source, "q3")
    await controller.step()
    source.tokens_per_snapshot = 1000  # never converges ...
    controller.migrate_request("q3", target.replica_id)
    source.requests = ()  # ... and the request finishes meanwhile
    await until_ended(controller)
    [aborted] = controller.recent_migrations()
    assert aborted.abort_reason == "request_ended" and source.handed_off == []


async def test_a_target_dying_costs_only_time(fleet):
    controller, replicas = fleet
    source, target, _ = h100(replicas)
    put_request(source, "q4")
    await controller.step()
    target.prefetch_error = ReplicaUnavailable(target.replica_id, "actor died", dead=True)
    controller.migrate_request("q4", target.replica_id)
    await until_ended(controller)
    [aborted] = controller.recent_migrations()
    assert aborted.abort_reason == "target_failed" and source.handed_off == []
    assert [r.request_id for r in source.requests] == ["q4"]  # still decoding on the source


async def test_requests_that_cannot_move_are_refused_naming_why(fleet):
    controller, replicas = fleet
    source, target, third = h100(replicas)
    put_request(source, "near-done", output=195, max_tokens=200)
    put_request(source, "q5")
    put_request(third, "q6")
    await controller.step()
    with pytest.raises(NotFound, match="no request 'ghost'"):
        controller.migrate_request("ghost")
    with pytest.raises(Conflict, match="finishing"):
        controller.migrate_request("near-done")
    l4 = next(r for r in replicas.values() if r.spec.pool == "l4")
    with pytest.raises(Invalid, match="must be ready, serve m"):
        controller.migrate_request("q5", l4.replica_id)
    with pytest.raises(Invalid):
        controller.migrate_request("q5", source.replica_id)
    controller.migrate_request("q5", target.replica_id)
    with pytest.raises(Conflict, match="already migrating"):
        controller.migrate_request("q5")
    with pytest.raises(Conflict, match="already has 1 migrations"):
        controller.migrate_request("q6", target.replica_id)
    await until_ended(controller)


async def test_without_a_target_the_least_loaded_ready_replica_of_the_model_is_chosen(fleet):
    controller, replicas = fleet
    source, busy, idle = h100(replicas)
    busy.running = 5
    busy.requests = tuple(RequestStatus(f"b{i}", 0, "x", 10, 1, 100, True, 0.0) for i in range(5))
    put_request(source, "q7")
    await controller.step()
    view = controller.migrate_request("q7")
    assert view.target == idle.replica_id
    await until_ended(controller)


async def test_draining_a_replica_moves_its_requests_off_by_migration(fleet):
    controller, replicas = fleet
    source, *_ = h100(replicas)
    put_request(source, "d1")
    put_request(source, "d2", output=0, running=False)
    source.running = 1
    await controller.step()
    controller.drain_replica(source.replica_id, replace=False)
    await controller.step()  # the policy plans DRAIN moves for both
    await until_ended(controller)
    assert sorted(r for r, _ in source.handed_off) == ["d1", "d2"]
    assert {m.reason for m in controller.recent_migrations()} == {"drain"}
    source.running = 0
    await settle(controller)
    assert controller.state.get(source.replica_id).state.value == "stopped"  # empty, so stopped


async def test_the_balance_rule_moves_load_from_a_full_replica(fleet):
    controller, replicas = fleet
    full, *_ = h100(replicas)
    for i in range(9):  # 9 requests x 7 blocks of 100: usage 0.63 + 0.1 headroom
        full.requests += (RequestStatus(f"b{i}", 0, "interactive", 100, 10, 500, True, 0.0),)
    await settle(controller, ticks=3)
    await until_ended(controller)
    assert any(m.reason == "balance" and m.source == full.replica_id for m in controller.recent_migrations())
