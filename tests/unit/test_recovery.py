"""Detection and replacement, driven by hand: hung engines, unresponsive replicas, dead nodes, crash loops."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from actors.replica_client import ReplicaUnavailable
from actors.router_client import RouterUnavailable
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.fleet_state import NodeObservation, ReplicaRecord
from orchestrator.replica_health import MISSED_POLLS_UNHEALTHY, Health, judge
from orchestrator.replica_manager import spec_for
from tests.fakes import FakeClock, FakeReplica, FakeRouter, idle_stats, nodes_for

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2}],
    "recovery": {"hang_timeout_s": 10, "unresponsive_timeout_s": 5, "backoff_base_s": 1, "circuit_failures": 3,
                 "circuit_cooldown_s": 60},
}


class Harness:
    def __init__(self):
        self.clock = FakeClock()
        self.replicas: dict[str, FakeReplica] = {}
        self.nodes = nodes_for("H100")
        self.fail_starts = False
        self.controller = Controller(parse_config(CONFIG), launcher=self.launch,
                                     router_launcher=lambda a, s: FakeRouter(a), node_source=lambda: self.nodes,
                                     clock=self.clock)

    def launch(self, spec, placement):
        replica = self.replicas[spec.replica_id] = FakeReplica(spec, placement, self.clock)
        if self.fail_starts:
            replica.start_error = RuntimeError("bad driver")
        return replica

    def live(self) -> list[FakeReplica]:
        return [self.replicas[r.replica_id] for r in self.controller.state.live()]

    async def tick(self, n: int = 1, advance_s: float = 0.0) -> None:
        for _ in range(n):
            self.clock.now += advance_s
            await self.controller.step()
            await asyncio.sleep(0)


@pytest.fixture
async def h():
    harness = Harness()
    await harness.tick(2)
    return harness


async def test_running_requests_without_progress_mean_hung_and_the_replica_is_replaced(h):
    stuck = h.live()[0]
    stuck.running = 2  # its token counter never moves
    await h.tick(1, advance_s=6)
    assert h.controller.state.get(stuck.replica_id).state.value == "ready"  # not yet
    await h.tick(1, advance_s=6)
    record = h.controller.state.get(stuck.replica_id)
    assert record.state.value == "dead" and stuck.killed  # killed: its streams break and resume elsewhere
    assert h.controller.recent_faults()[-1].cause == "hung"
    await h.tick(2, advance_s=1.5)
    assert len(h.live()) == 2 and stuck not in h.live()


async def test_an_idle_replica_is_never_hung(h):
    quiet = h.live()[0]
    await h.tick(5, advance_s=10)
    assert h.controller.state.get(quiet.replica_id).state.value == "ready"


async def test_unanswered_polls_make_a_replica_unhealthy_then_dead(h):
    silent = h.live()[0]
    silent.stats_error = ReplicaUnavailable(silent.replica_id, "no answer within 2s", dead=False)
    await h.tick(MISSED_POLLS_UNHEALTHY)
    assert h.controller.state.get(silent.replica_id).state.value == "unhealthy"
    view = h.controller.view
    assert view.replica(silent.replica_id).state.value == "unhealthy"  # routers send it nothing new
    await h.tick(1, advance_s=6)
    assert h.controller.state.get(silent.replica_id).state.value == "dead"
    assert h.controller.recent_faults()[-1].cause == "unresponsive"


async def test_a_dead_node_takes_its_replicas_and_is_one_fault(h):
    node = h.live()[0].node_id
    victims = [r for r in h.live() if r.node_id == node]
    h.nodes = [NodeObservation(n.node_id, n.address, n.node_id != node, n.resources, n.is_head) for n in h.nodes]
    await h.tick(1)
    faults = h.controller.recent_faults()
    assert [(f.component, f.cause) for f in faults] == [("node", "died")]
    assert victims and all(h.controller.state.get(v.replica_id).state.value == "dead" for v in victims)
    await h.tick(1)  # a node death is not the pool's fault: replaced without backoff
    assert len(h.live()) == 2


async def test_a_crash_looping_pool_backs_off_then_opens_its_circuit(h):
    h.fail_starts = True
    for replica in h.live():
        replica.stats_error = ReplicaUnavailable(replica.replica_id, "actor died", dead=True)
    await h.tick(1)  # two deaths: backoff 2 s
    pool = h.controller.status().pools[0]
    assert pool.ready == 0 and "backing off after 2 failures" in pool.held_back
    await h.tick(2, advance_s=2.5)  # two replacements start and fail: past 3 failures the circuit opens
    assert "circuit open" in h.controller.status().pools[0].held_back
    launched = len(h.replicas)
    await h.tick(3, advance_s=10)
    assert len(h.replicas) == launched  # nothing started during the cooldown
    h.fail_starts = False
    await h.tick(2, advance_s=60)
    assert h.controller.status().pools[0].ready == 2 and not h.controller.status().pools[0].held_back


def test_requests_queued_on_a_frozen_engine_mean_hung_even_with_none_running():
    """A replica frozen while idle admits nothing: what reaches it waits, 0 running, no token ever."""
    config = parse_config(CONFIG)
    record = ReplicaRecord(spec=spec_for(config, config.pools[0], "h100-0000abcd"), created_at=0.0)
    record.mark_ready("node-H100", 0.0)
    queued = replace(idle_stats(0.0), waiting=3)
    assert judge(record, queued, 1.0, config.recovery).health is Health.FINE
    verdict = judge(record, queued, 12.0, config.recovery)
    assert (verdict.health, verdict.cause) == (Health.DEAD, "hung")
    assert judge(record, idle_stats(0.0), 30.0, config.recovery).health is Health.FINE  # nothing queued: idle


async def test_a_router_agent_is_a_fault_when_it_stops_answering_not_while_it_starts():
    class FlakyRouter(FakeRouter):
        down = True  # still being created

        async def update_view(self, view, timeout_s: float = 2.0):
            if self.down:
                raise RouterUnavailable(self.agent_id, "no answer within 2s")
            return await super().update_view(view, timeout_s)

    agents: dict[str, FlakyRouter] = {}

    def launch(agent_id, settings):
        agents[agent_id] = FlakyRouter(agent_id)
        return agents[agent_id]

    clock = FakeClock()
    controller = Controller(parse_config(CONFIG), launcher=lambda spec, p: FakeReplica(spec, p, clock),
                            router_launcher=launch, node_source=lambda: nodes_for("H100"), clock=clock)
    await controller.step()
    assert controller.recent_faults() == ()  # a starting agent is not a broken one
    agents["agent-0"].down = False
    await controller.step()
    agents["agent-0"].down = True  # crashed: Ray restarts it
    await controller.step()
    agents["agent-0"].down = False
    await controller.step()
    faults = controller.recent_faults()
    assert [(f.component, f.target, f.cause) for f in faults] == [("router", "agent-0", "unreachable")]
    assert faults[0].recovered_at is not None
