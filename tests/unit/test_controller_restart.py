"""A controller that dies and comes back: it takes back its intent and its live replicas, never duplicates."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from actors.replica_client import ReplicaUnavailable
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.durable_state import DurableState, MemoryKeyValue
from tests.fakes import FakeClock, FakeReplica, FakeRouter, nodes_for

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2, "max_replicas": 4},
              {"name": "l4", "gpu_type": "L4", "model": "m", "replicas": 1}],
}


class Cluster:
    """Replicas outlive controllers, as detached actors do."""

    def __init__(self):
        self.clock = FakeClock()
        self.replicas: dict[str, FakeReplica] = {}
        self.launched: list[str] = []
        self.memory = MemoryKeyValue()

    def launch(self, spec, placement):
        self.launched.append(spec.replica_id)
        self.replicas[spec.replica_id] = FakeReplica(spec, placement, self.clock)
        return self.replicas[spec.replica_id]

    def attach(self, replica_id):
        replica = self.replicas.get(replica_id)
        if replica is None or replica.killed:
            raise ReplicaUnavailable(replica_id, "no such actor", dead=True)
        return replica

    def alive(self) -> list[str]:
        return [r for r, fake in self.replicas.items() if not fake.killed]

    def controller(self, config: dict = CONFIG) -> Controller:
        return Controller(parse_config(config), launcher=self.launch, router_launcher=lambda a, s: FakeRouter(a),
                          node_source=lambda: nodes_for("H100", "L4"), clock=self.clock,
                          durable=DurableState(self.memory), attacher=self.attach, discover=self.alive)


async def settle(controller: Controller, ticks: int = 3) -> None:
    for _ in range(ticks):
        await controller.step()
        await asyncio.sleep(0)


async def test_a_restarted_controller_readopts_its_replicas_and_intent():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    first.scale_pool("h100", 3)
    first.cordon_node("node-L4-b")
    first.update_settings({"routing": {"load_guard": 0.7}})
    await settle(first)
    before = sorted(r.replica_id for r in first.state.live())
    assert len(before) == 4 and len(cluster.launched) == 4

    second = cluster.controller()  # the first one is gone; the replicas are not
    await settle(second)
    assert sorted(r.replica_id for r in second.state.live()) == before
    assert all(r.state.value == "ready" for r in second.state.live())
    assert len(cluster.launched) == 4  # nothing was started twice
    assert second.replicas.desired == {"h100": 3, "l4": 1}
    assert second.state.cordoned == {"node-L4-b"}
    assert second.config.routing.load_guard == 0.7


async def test_replicas_that_died_meanwhile_are_replaced_and_strays_adopted():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    victim = next(r for r in cluster.replicas.values() if r.spec.pool == "h100")
    victim.killed = True  # died while no controller watched
    # a replica started just before the crash, never written to the durable state: one too many for l4
    cluster.launch(replace(victim.spec, replica_id="l4-0000beef", pool="l4", gpu_type="L4"), victim.placement)
    launched = len(cluster.launched)
    second = cluster.controller()
    await settle(second)
    live = {r.replica_id: r for r in second.state.live()}
    assert second.state.get(victim.replica_id).state.value == "dead"
    assert "l4-0000beef" in second.state.replicas  # known: adopted, then retired as one too many
    assert sum(r.pool == "l4" for r in live.values()) == 1
    assert sum(r.pool == "h100" for r in live.values()) == 2
    assert len(cluster.launched) == launched + 1  # only the dead h100 replica was replaced
    replica_faults = [(f.target, f.cause) for f in second.recent_faults() if f.component == "replica"]
    assert replica_faults == [(victim.replica_id, "died")]  # nobody saw it die, yet the fault log says so


async def test_an_unreadable_memory_means_starting_from_the_config():
    class Broken(MemoryKeyValue):
        def get(self, key):
            raise ConnectionError("GCS unreachable")

    cluster = Cluster()
    cluster.memory = Broken()
    controller = cluster.controller()
    await settle(controller)
    assert controller.replicas.ready()


async def test_a_node_that_died_while_no_controller_watched_is_still_a_fault():
    cluster = Cluster()
    await settle(cluster.controller())
    second = cluster.controller()
    second.nodes.source = lambda: [replace(n, alive=n.node_id != "node-L4") for n in nodes_for("H100", "L4")]
    await settle(second, ticks=1)
    nodes = [(f.component, f.target, f.cause) for f in second.recent_faults() if f.component == "node"]
    assert nodes == [("node", "node-L4", "died")]
    await settle(second, ticks=1)
    assert [f.target for f in second.recent_faults() if f.component == "node"] == ["node-L4"]  # once


async def test_the_fault_log_survives_the_controller():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    victim = next(r for r in cluster.replicas.values() if r.spec.pool == "l4" and not r.killed)
    victim.stats_error = ReplicaUnavailable(victim.replica_id, "actor died", dead=True)
    await settle(first)
    seen = [(f.fault_id, f.target, f.cause) for f in first.recent_faults()]
    second = cluster.controller()
    await settle(second, ticks=1)
    kept = [(f.fault_id, f.target, f.cause) for f in second.recent_faults()]
    assert kept[:len(seen)] == seen and (victim.replica_id, "died") in [(t, c) for _, t, c in seen]
    assert [f.cause for f in second.recent_faults()][len(seen):] == ["restarted"]


async def test_an_operators_change_survives_a_controller_dying_before_its_next_tick():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    first.scale_pool("h100", 3)
    first.update_settings({"routing": {"load_guard": 0.85}})
    second = cluster.controller()  # no tick of the first one in between
    await settle(second, ticks=1)
    assert second.replicas.desired["h100"] == 3
    assert second.config.routing.load_guard == 0.85


async def test_a_readopted_replica_does_not_pass_for_the_replacement_of_a_fault():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    survivor, victim = [r for r in cluster.replicas.values() if r.spec.pool == "h100"]
    started = await survivor.start(5.0)

    async def start_once(timeout_s: float):  # as a real replica does: one start, its info kept
        return started

    survivor.start = start_once
    cluster.clock.now += 10  # the survivor started well before the fault
    victim.stats_error = ReplicaUnavailable(victim.replica_id, "actor died", dead=True)
    await settle(first, ticks=1)  # dead; the replacement waits out its backoff
    second = cluster.controller()
    await settle(second)
    fault = next(f for f in second.recent_faults() if f.target == victim.replica_id)
    assert fault.replaced_by not in (None, survivor.replica_id)
    assert fault.replaced_by in {r.replica_id for r in second.state.live()}


async def test_a_redeploy_with_a_changed_config_applies_it_to_the_live_fleet():
    cluster = Cluster()
    first = cluster.controller()
    await settle(first)
    first.scale_pool("h100", 3)
    first.cordon_node("node-L4-b")
    first.update_settings({"routing": {"load_guard": 0.7}})
    await settle(first)
    old = {r.replica_id: r.pool for r in first.state.live()}

    changed = {**CONFIG, "pools": [
        {"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2, "max_replicas": 4,
         "max_queue": 64},  # changed: its replicas roll
        {"name": "a100", "gpu_type": "A100-80GB", "model": "m", "replicas": 1},  # new; l4 is gone
    ]}
    second = cluster.controller(changed)
    assert second.deploy_digest != first.deploy_digest
    await settle(second, ticks=8)
    live = {r.replica_id: r.pool for r in second.state.live() if r.state.value == "ready"}
    assert sorted(live.values()) == ["a100", "h100", "h100"]  # sizes from the new config, not the old intent
    assert not set(live) & set(old)  # the changed pool rolled; the removed pool's replica is gone
    assert all(cluster.replicas[r].killed for r, pool in old.items() if pool == "l4")
    assert second.state.cordoned == {"node-L4-b"}  # the cluster's state stays
    assert second.config.routing.load_guard != 0.7  # runtime changes belong to the old deploy

    third = cluster.controller(changed)  # a plain restart of the new deploy changes nothing
    await settle(third)
    assert {r.replica_id for r in third.state.live()} == {r.replica_id for r in second.state.live()}
