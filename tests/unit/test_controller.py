"""The controller's reconcile loop, stepped by hand with fake actor handles and a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from actors.replica_client import ReplicaUnavailable
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.errors import Invalid, NotFound
from orchestrator.replica_health import MISSED_POLLS_UNHEALTHY
from tests.fakes import FakeClock, FakeReplica, FakeRouter

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [
        {"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2},
        {"name": "l4", "gpu_type": "L4", "model": "m", "replicas": 1, "gpus_per_replica": 1},
    ],
    "routing": {"agents": 2},
}


@pytest.fixture
def harness():
    clock = FakeClock()
    replicas: dict[str, FakeReplica] = {}
    routers: dict[str, FakeRouter] = {}

    def launch(spec, placement):
        replicas[spec.replica_id] = FakeReplica(spec, placement, clock)
        return replicas[spec.replica_id]

    def launch_router(agent_id, settings):
        routers[agent_id] = FakeRouter(agent_id)
        return routers[agent_id]

    controller = Controller(parse_config(CONFIG), launcher=launch, router_launcher=launch_router, clock=clock)
    return controller, replicas, routers, clock


async def settle(controller: Controller, ticks: int = 2) -> None:
    for _ in range(ticks):
        await controller.step()
        await asyncio.sleep(0)  # let replica start tasks run


async def test_pools_are_filled_and_placed_on_their_gpu_type(harness):
    controller, replicas, routers, _ = harness
    await settle(controller)
    assert sorted(r.spec.pool for r in replicas.values()) == ["h100", "h100", "l4"]
    for r in replicas.values():
        assert dict(r.placement.resources) == {f"accelerator_type:{r.spec.gpu_type}": 0.001}
        assert r.placement.num_gpus == 1
    assert controller.replicas.ready()
    assert {p.name: p.ready for p in controller.status().pools} == {"h100": 2, "l4": 1}


async def test_views_reach_every_router_with_growing_versions_and_peers(harness):
    controller, _, routers, _ = harness
    await settle(controller, ticks=3)
    for router in routers.values():
        versions = [v.version for v in router.views]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert router.peers == ["agent-0", "agent-1"]
    assert len(routers["agent-0"].views[-1].replicas) == 3


async def test_a_replica_that_fails_to_start_is_dead_and_replaced(harness):
    controller, replicas, _, clock = harness
    original_launch = controller.replicas.launcher

    def failing_once(spec, placement):
        handle = original_launch(spec, placement)
        if spec.pool == "l4" and not any(r.start_error for r in replicas.values()):
            handle.start_error = RuntimeError("CUDA out of memory")
        return handle

    controller.replicas.launcher = failing_once
    await settle(controller, ticks=2)
    assert "backing off after 1 failures" in controller.status().pools[1].held_back
    clock.now += 1.5  # past the first backoff delay
    await settle(controller, ticks=2)
    l4 = [r for r in controller.state.replicas.values() if r.pool == "l4"]
    assert [r.state.value for r in l4].count("dead") == 1 and [r.state.value for r in l4].count("ready") == 1
    dead = next(r for r in l4 if r.state.value == "dead")
    assert "CUDA out of memory" in dead.end_reason and replicas[dead.replica_id].killed


async def test_a_dead_replica_is_replaced_and_leaves_the_view(harness):
    controller, replicas, routers, clock = harness
    await settle(controller)
    victim = next(r for r in replicas.values() if r.spec.pool == "h100")
    victim.stats_error = ReplicaUnavailable(victim.replica_id, "actor died", dead=True)
    await settle(controller)
    clock.now += 1.5  # past the first backoff delay
    await settle(controller)
    [fault] = controller.recent_faults()
    assert (fault.component, fault.target, fault.cause) == ("replica", victim.replica_id, "died")
    assert fault.replaced_by is not None and fault.recovery_s == 1.5
    assert controller.state.get(victim.replica_id).state.value == "dead"
    live = [r for r in controller.state.live() if r.pool == "h100"]
    assert len(live) == 2 and victim.replica_id not in {r.replica_id for r in live}
    assert victim.replica_id not in {r.replica_id for r in routers["agent-0"].views[-1].replicas}


async def test_a_silent_replica_turns_unhealthy_then_recovers(harness):
    controller, replicas, _, _ = harness
    await settle(controller)
    quiet = next(r for r in replicas.values() if r.spec.pool == "l4")
    quiet.stats_error = ReplicaUnavailable(quiet.replica_id, "no answer within 2s", dead=False)
    for _ in range(MISSED_POLLS_UNHEALTHY):
        await controller.step()
    assert controller.state.get(quiet.replica_id).state.value == "unhealthy"
    quiet.stats_error = None
    await controller.step()
    assert controller.state.get(quiet.replica_id).state.value == "ready"


async def test_scale_in_drains_the_least_loaded_then_stops_it_when_empty(harness):
    controller, replicas, _, _ = harness
    await settle(controller)
    busy, idle = [r for r in replicas.values() if r.spec.pool == "h100"]
    busy.running = 3
    await controller.step()  # observe the load
    controller.replicas.set_desired("h100", 1)
    await controller.step()
    assert controller.state.get(idle.replica_id).state.value == "stopped"  # empty: drained at once
    assert idle.shut_down and not busy.shut_down
    assert controller.state.get(busy.replica_id).state.value == "ready"


async def test_a_draining_replica_waits_for_its_requests(harness):
    controller, replicas, _, _ = harness
    await settle(controller)
    for r in replicas.values():
        if r.spec.pool == "h100":
            r.running = 2
    await controller.step()
    controller.replicas.set_desired("h100", 1)
    await controller.step()
    draining = [r for r in controller.state.live() if r.state.value == "draining"]
    assert len(draining) == 1
    replicas[draining[0].replica_id].running = 0
    await settle(controller)
    assert controller.state.get(draining[0].replica_id).state.value == "stopped"


def test_desired_replicas_are_bounded_by_the_pool(harness):
    controller, *_ = harness
    with pytest.raises(Invalid, match="outside"):
        controller.replicas.set_desired("h100", 99)
    with pytest.raises(NotFound, match="no pool"):
        controller.replicas.set_desired("a100", 1)


async def test_one_failing_manager_does_not_stop_the_others(harness):
    controller, _, routers, _ = harness

    async def broken():
        raise RuntimeError("boom")

    controller._managers = (("replicas", broken),) + controller._managers[1:]
    await controller.step()
    assert routers["agent-0"].views  # publishing still ran
    errors = controller.metrics["flotilla_controller_errors_total"].labels("replicas")._value.get()
    assert errors == 1
