"""The power manager in the controller's loop, stepped by hand with fake replicas and a fake
clock: reads, decisions, actions through the replicas, retries, overrides, metrics, routing."""

from __future__ import annotations

import asyncio

import pytest

from actors.replica_client import ReplicaUnavailable
from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.durable_state import DurableState, MemoryKeyValue
from orchestrator.errors import Conflict, Invalid, NotFound
from orchestrator.fleet_state import NodeObservation
from policies.fleet_view import RequestStatus
from policies.power_snapshot import PowerOp
from tests.fakes import FakeClock, FakeReplica, FakeRouter, nodes_for

PERIOD = 0.5


def config(**power) -> dict:
    return {
        "models": [{"name": "m", "arch": "llama-2-7b"}],
        "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 4, "max_replicas": 4}],
        "controller": {"control_period_s": PERIOD, "metrics_port": 0},
        "power": {"control_period_s": PERIOD, "min_hold_s": 2.0, "oversubscription": 1.5, **power},
    }


class Harness:
    def __init__(self, power: dict, nodes=None, store=None):
        self.clock = FakeClock()
        self.replicas: dict[str, FakeReplica] = {}
        self.routers: dict[str, FakeRouter] = {}
        self.store = store or MemoryKeyValue()
        self.controller = Controller(parse_config(config(**power)), launcher=self._launch,
                                     router_launcher=self._router, clock=self.clock,
                                     node_source=lambda: nodes or nodes_for("H100"),
                                     durable=DurableState(self.store))

    def _launch(self, spec, placement):
        self.replicas[spec.replica_id] = FakeReplica(spec, placement, self.clock)
        return self.replicas[spec.replica_id]

    def _router(self, agent_id, settings):
        self.routers[agent_id] = FakeRouter(agent_id)
        return self.routers[agent_id]

    async def period(self, n: int = 1) -> None:
        """`n` power control periods (one controller tick each)."""
        for _ in range(n):
            self.clock.now += PERIOD
            await self.controller.step()
            await asyncio.sleep(0)

    def fleet(self) -> list[FakeReplica]:
        return [self.replicas[r] for r in sorted(self.replicas)]

    def load(self, replicas: list[FakeReplica], watts: float, slo_class: str) -> None:
        for i, r in enumerate(replicas):
            r.draw_w = watts
            r.requests = (RequestStatus(f"{r.replica_id}-q{i}", 0, slo_class, 100, 1, 500, True, 0.0),)

    def scope(self, key: str = "cluster"):
        return next(b for b in self.controller.power.budget_status() if b.scope == key)

    def ops(self, replica: FakeReplica) -> list[PowerOp]:
        return [a.op for a in replica.power_actions]


async def started(power: dict, **kw) -> Harness:
    h = Harness(power, **kw)
    await h.period(2)
    assert len([r for r in h.controller.state.live() if r.serving]) == 4
    return h


async def test_below_the_cap_threshold_power_is_reported_and_nothing_is_applied():
    h = await started({"cluster_budget_w": 2800})
    h.load(h.fleet(), 450, "interactive")
    await h.period()
    status = h.controller.power.status()
    assert status.level == "normal" and all(not r.power_actions for r in h.fleet())
    assert len(status.gpus) == 4 and all(g.draw_w == 450 and g.limit_w == 700 for g in status.gpus)
    assert h.scope().draw_w == 1800 and h.scope().headroom_w == 1000
    power = h.controller.metrics["flotilla_gpu_power_watts"]
    rid = h.fleet()[0].replica_id
    assert power.labels(rid, "0", "H100", "node-H100")._value.get() == 450
    assert h.controller.metrics["flotilla_power_budget_watts"].labels("cluster")._value.get() == 2800


async def test_a_threatened_budget_locks_the_lowest_priority_clocks_first_and_holds():
    h = await started({"cluster_budget_w": 2200})
    batch, interactive = h.fleet()[:2], h.fleet()[2:]
    h.load(batch, 500, "batch")
    h.load(interactive, 500, "interactive")
    await h.period()  # 2000 W of 2200: over the cap threshold
    assert h.scope().level == "lock"
    assert all(h.ops(r) == [PowerOp.LOCK_CLOCKS] for r in batch)
    assert all(not r.power_actions for r in interactive)
    await h.period()  # the locks show in the draw
    assert h.scope().draw_w < 0.85 * 2200
    gpus = {g.replica_id: g for g in h.controller.power.status().gpus}
    assert all(gpus[r.replica_id].locked_clock_mhz == 1386 for r in batch)
    assert h.controller.metrics["flotilla_power_capping_events_total"].labels("lock")._value.get() == 1


async def test_an_emergency_caps_every_replica_the_lowest_priority_hardest():
    h = await started({"cluster_budget_w": 2200})
    batch, interactive = h.fleet()[:2], h.fleet()[2:]
    h.load(batch, 600, "batch")
    h.load(interactive, 600, "interactive")
    await h.period()  # 2400 W of 2200: over the budget itself
    assert h.scope().level == "cap"
    assert {r.power_setting.power_limit_w for r in batch} == {350}
    assert {r.power_setting.power_limit_w for r in interactive} == {560}
    await h.period()
    assert h.scope().draw_w <= 2200


async def test_the_published_view_slows_capped_replicas_for_routing():
    h = await started({"cluster_budget_w": 2200})
    batch, interactive = h.fleet()[:2], h.fleet()[2:]
    h.load(batch, 600, "batch")
    h.load(interactive, 600, "interactive")
    await h.period()
    view = {r.replica_id: r for r in h.routers["agent-0"].views[-1].replicas}
    capped, free = view[batch[0].replica_id], view[interactive[0].replica_id]
    assert capped.prefill_tokens_per_s < free.prefill_tokens_per_s
    assert capped.decode_step_s > free.decode_step_s
    assert capped.max_batch_tokens_per_s < free.max_batch_tokens_per_s


async def test_a_failed_action_is_retried_the_next_period():
    h = await started({"cluster_budget_w": 2200})
    h.load(h.fleet(), 600, "interactive")
    flaky = h.fleet()[0]
    flaky.apply_error = ReplicaUnavailable(flaky.replica_id, "no answer within 0.5s", dead=False)
    await h.period()
    assert any(flaky.replica_id in f and "no answer" in f for f in h.controller.power.status().failures)
    assert flaky.power_setting.power_limit_w is None
    flaky.apply_error = None
    await h.period()
    assert h.ops(flaky) == [PowerOp.SET_POWER_LIMIT] and flaky.power_setting.power_limit_w is not None
    assert not h.controller.power.status().failures


async def test_a_replica_that_stops_answering_is_counted_at_its_limit_and_capped_safe():
    h = await started({"cluster_budget_w": 2800})
    h.load(h.fleet(), 300, "interactive")
    await h.period()
    silent = h.fleet()[0]
    silent.power_error = ReplicaUnavailable(silent.replica_id, "no answer", dead=False)
    await h.period()
    assert h.scope().stale_replicas == ()  # its last reading is still fresh
    await h.period(5)  # older than stale_after_s (2 s)
    assert h.scope().stale_replicas == (silent.replica_id,)
    assert silent.power_setting.power_limit_w == 420  # 0.6 of 700 W


async def test_the_power_loop_runs_once_per_period_however_fast_the_tick():
    h = await started({"cluster_budget_w": 2800})
    decided = h.controller.power.decided_at
    h.clock.now += PERIOD / 4
    await h.controller.step()
    assert h.controller.power.decided_at == decided
    h.clock.now += PERIOD * 3 / 4
    await h.controller.step()
    assert h.controller.power.decided_at == h.clock.now


async def test_read_only_replicas_are_reported_but_never_acted_on():
    h = await started({"cluster_budget_w": 2200})
    h.load(h.fleet(), 600, "interactive")
    for r in h.fleet():
        r.power_read_only = True
    h.controller.power._gpus.clear()  # capabilities are read once; start over
    await h.period()
    assert all(not r.power_actions for r in h.fleet())
    status = h.controller.power.status()
    assert all(not g.controllable and g.reason == "fake read-only GPU" for g in status.gpus)
    assert any("read-only" in reason for reason in status.reasons)


async def test_a_row_budget_caps_only_the_replicas_in_that_row():
    nodes = [NodeObservation("node-head", "10.0.0.1", True, (("CPU", 8.0),), is_head=True)] + [
        NodeObservation(f"node-H100{s}", f"10.0.1.{i}", True, (("GPU", 8.0), ("accelerator_type:H100", 1.0)),
                        labels=(("flotilla.io/power-row", row),))
        for i, (s, row) in enumerate((("", "r1"), ("-b", "r2")))]
    h = await started({"row_budgets_w": {"r1": 1200}}, nodes=nodes)
    in_r1 = [r for r in h.fleet() if r.node_id == "node-H100"]
    assert in_r1, "FakeReplica places on node-H100 first"
    h.load(h.fleet(), 600, "interactive")
    await h.period()
    status = h.controller.power.status()
    assert {g.row for g in status.gpus} == {"r1"}
    assert h.scope("row:r1").level == "cap"
    assert all(r.power_actions for r in in_r1)
    assert all(not r.power_actions for r in h.fleet() if r not in in_r1)


async def test_an_operator_budget_is_refused_below_idle_draw_or_beyond_the_oversubscription():
    h = await started({})
    with pytest.raises(Conflict, match=r"below the idle draw of its 4 GPUs \(280 W\)"):
        h.controller.power.set_budget("cluster", "", 200)
    with pytest.raises(Conflict, match="exceeds the budget 1000 W times the oversubscription factor 1.5"):
        h.controller.power.set_budget("cluster", "", 1000)
    with pytest.raises(NotFound, match="no node 'rack-9'"):
        h.controller.power.set_budget("node", "rack-9", 2000)
    with pytest.raises(Invalid, match="a cluster budget has no name"):
        h.controller.power.set_budget("cluster", "x", 2000)
    budget = h.controller.power.set_budget("cluster", "", 2000)
    assert budget.budget_w == 2000 and budget.source == "operator"


async def test_operator_budgets_and_pins_survive_a_controller_restart():
    h = await started({"cluster_budget_w": 2800})
    pinned = h.fleet()[0]
    h.controller.power.set_budget("cluster", "", 2400)
    assert h.controller.power.pin(pinned.replica_id, 300).pinned_limit_w == 300
    again = Harness({"cluster_budget_w": 2800}, store=h.store)
    assert [b.watts for b in again.controller.power.budgets()] == [2400]
    assert again.controller.power.pins == {pinned.replica_id: 300}


async def test_a_pinned_cap_overrides_the_policy_until_unpinned():
    h = await started({"cluster_budget_w": 2800})
    h.load(h.fleet(), 300, "interactive")
    pinned = h.fleet()[0]
    with pytest.raises(Invalid, match="outside H100's supported range 200-700 W"):
        h.controller.power.pin(pinned.replica_id, 150)
    with pytest.raises(NotFound):
        h.controller.power.pin("h100-nope", 300)
    h.controller.power.pin(pinned.replica_id, 300)
    await h.period()
    assert pinned.power_setting.power_limit_w == 300
    h.controller.power.pin(pinned.replica_id, None)
    await h.period()
    assert pinned.power_setting.power_limit_w is None and h.ops(pinned)[-1] is PowerOp.RESTORE_POWER_LIMIT


async def test_an_ended_replica_leaves_no_power_series():
    h = await started({"cluster_budget_w": 2800})
    victim = h.fleet()[0]
    labels = (victim.replica_id, "0", "H100", victim.node_id)
    gauge = h.controller.metrics["flotilla_gpu_power_watts"]
    assert labels in [tuple(s.labels.values()) for m in gauge.collect() for s in m.samples]
    victim.stats_error = ReplicaUnavailable(victim.replica_id, "actor died", dead=True)
    await h.period(2)
    assert labels not in [tuple(s.labels.values()) for m in gauge.collect() for s in m.samples]
