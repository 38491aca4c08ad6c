"""Cost-aware placement in the live controller, stepped by hand over fake replicas and a fake clock.

The fleet: one model on an A100-80GB pool and an A10G pool, TTFT 0.3 s. Short requests
(64 prompt, 64 output tokens) are cheapest on one A10G; 1500-token prompts miss the TTFT
target on an A10G, so they need the A100.
"""

from __future__ import annotations

import asyncio
import copy

import pytest

from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.errors import Conflict, Invalid, NotFound
from orchestrator.placement_manager import workload_override
from orchestrator.placement_planner import WorkloadOverride
from orchestrator.request_log import FinishedRequest
from tests.fakes import FakeAutoscaler, FakeClock, FakeReplica, FakeRouter, nodes_for

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b"}],
    "pools": [
        {"name": "a100", "gpu_type": "A100-80GB", "model": "m", "replicas": 1, "max_replicas": 2},
        {"name": "a10g", "gpu_type": "A10G", "model": "m", "replicas": 0, "max_replicas": 2},
    ],
    "slo_classes": [{"name": "interactive", "ttft_s": 0.3, "tpot_s": 0.1, "priority": 10}],
    "placement": {"enabled": True, "window_s": 60, "replan_period_s": 10, "min_dwell_s": 300},
    "controller": {"replica_start_timeout_s": 30},
}
SHORT, LONG = (64, 64), (1500, 16)


class HangingReplica(FakeReplica):
    """Never becomes ready: its node never comes."""

    async def start(self, timeout_s: float):
        await asyncio.Event().wait()


def config(**placement) -> dict:
    data = copy.deepcopy(CONFIG)
    data["placement"].update(placement)
    return data


class Harness:
    def __init__(self, data: dict, hang: tuple[str, ...] = ()):
        self.clock = FakeClock()
        self.replicas: dict[str, FakeReplica] = {}
        self.autoscaler = FakeAutoscaler()
        self.hang = hang
        self.controller = Controller(parse_config(data), launcher=self._launch,
                                     router_launcher=lambda agent, settings: FakeRouter(agent),
                                     node_source=lambda: nodes_for("A100-80GB", "A10G"), clock=self.clock,
                                     autoscaler=self.autoscaler)
        self.placement = self.controller.placement

    def _launch(self, spec, placement):
        kind = HangingReplica if spec.pool in self.hang else FakeReplica
        self.replicas[spec.replica_id] = kind(spec, placement, self.clock)
        return self.replicas[spec.replica_id]

    async def tick(self, n: int = 1) -> None:
        """Controller steps, each followed by the background re-plan it started, if any."""
        for _ in range(n):
            await self.controller.step()
            await asyncio.sleep(0)  # replica starts
            if self.placement.replanning is not None:
                await self.placement.replanning

    def traffic(self, size: tuple[int, int], rate: float, seconds: float) -> None:
        """`rate` req/s of one size over the last `seconds`, as an ingress would ship them."""
        n = int(rate * seconds)
        now = self.clock.now
        self.placement.record(FinishedRequest("m", now - seconds + (i + 1) / rate, *size) for i in range(n))

    def live(self, pool: str | None = None) -> dict[str, str]:
        return {r.replica_id: r.state.value for r in self.controller.state.live() if pool in (None, r.pool)}

    def later(self, seconds: float) -> None:
        self.clock.now += seconds


@pytest.fixture
async def h():
    harness = Harness(CONFIG)
    await harness.tick(2)
    return harness


async def test_a_cheaper_mix_is_reached_by_scaling_out_before_any_drain(h):
    [a100] = h.live("a100")
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    seen = []
    for _ in range(4):
        await h.tick()
        seen.append((h.live("a10g"), h.live("a100")))
    # the A10G came up while the A100 kept serving; only then was the A100 drained, and it stopped
    first_ready = next(i for i, (a10g, _) in enumerate(seen) if "ready" in a10g.values())
    assert all(a100_state == {a100: "ready"} for _, a100_state in seen[:first_ready + 1])
    assert seen[-1][1] == {} and list(seen[-1][0].values()) == ["ready"]
    [done] = h.placement.history
    assert (done.trigger, done.state.value, done.drained) == ("cost", "done", [a100])
    assert "saves $" in done.reason
    m = h.controller.metrics
    assert m["flotilla_plan_changes_total"].labels("cost")._value.get() == 1
    assert m["flotilla_planned_replicas"].labels("A10G")._value.get() == 1
    assert m["flotilla_planned_replicas"].labels("A100-80GB")._value.get() == 0
    assert m["flotilla_fleet_cost_per_hour"]._value.get() == pytest.approx(1.006)
    assert h.autoscaler.demands[-1] == ({"GPU": 1.0, "accelerator_type:A10G": 0.001},)


async def test_a_drained_replica_keeps_its_requests_until_they_finish(h):
    [a100] = h.live("a100")
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    await h.tick()  # the re-plan starts the move
    h.replicas[a100].running = 2  # requests in flight on the replica the plan removes
    await h.tick(5)
    assert h.live("a100") == {a100: "draining"} and not h.replicas[a100].killed
    assert h.placement.transition.state.value == "draining"
    assert h.placement.replanning is None or h.placement.replanning.done()  # no re-plan while moving
    h.replicas[a100].running = 0  # they finished (or migrated away)
    await h.tick(2)
    assert h.live("a100") == {} and h.replicas[a100].shut_down
    assert h.placement.transition is None and h.placement.history[-1].state.value == "done"


async def test_hysteresis_holds_a_small_saving_and_an_operator_apply_skips_it():
    h = Harness(config(min_relative_saving=0.9))
    await h.tick(2)
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    await h.tick()
    assert h.placement.latest.decision.action == "keep"
    assert h.placement.latest.decision.reason.startswith("hysteresis")
    report = await h.placement.apply()
    assert report.decision.action == "change" and report.transition.trigger == "operator"
    assert [(m.pool, m.current, m.target) for m in report.decision.scale_out] == [("a10g", 0, 1)]
    with pytest.raises(Conflict, match="is scaling_out"):
        await h.placement.apply()
    await h.tick(4)
    assert list(h.live().values()) == ["ready"] and h.live("a10g")


async def test_missing_capacity_changes_the_mix_at_once_even_warming_up():
    data = config()
    data["pools"][0]["replicas"], data["pools"][1]["replicas"] = 0, 1  # one A10G
    h = Harness(data)
    await h.tick(2)
    h.later(20)
    h.traffic(LONG, 2.0, 20)  # a third of the window: warming up
    await h.tick()
    decision = h.placement.latest.decision
    assert decision.urgent and decision.action == "change"
    assert decision.reason == "the fleet lacks capacity for the workload within the SLO"
    await h.tick(4)
    assert list(h.live("a100").values()) == ["ready"] and h.live("a10g") == {}
    assert h.placement.history[-1].trigger == "capacity"


async def test_a_partial_window_does_not_change_the_mix_for_cost(h):
    h.later(20)
    h.traffic(SHORT, 2.0, 20)
    await h.tick()
    decision = h.placement.latest.decision
    assert decision.action == "keep" and not decision.transition.scale_out
    assert decision.reason.startswith("warming up: 20 s of the 60 s window of m observed")
    assert h.controller.replicas.desired == {"a100": 1, "a10g": 0}


async def test_a_model_without_traffic_keeps_its_replicas(h):
    h.later(120)
    await h.tick(3)
    assert h.placement.latest.held == ("m",)
    assert h.placement.latest.decision.reason == "the fleet already has the planned mix"
    assert list(h.live().values()) == ["ready"] and h.live("a100")


async def test_a_scale_out_that_never_gets_ready_is_abandoned_without_draining():
    h = Harness(CONFIG, hang=("a10g",))
    await h.tick(2)
    [a100] = h.live("a100")
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    await h.tick(3)
    assert h.placement.transition.state.value == "scaling_out"
    h.later(31)  # past controller.replica_start_timeout_s
    await h.tick(2)
    [gave_up] = h.placement.history
    assert gave_up.state.value == "abandoned" and gave_up.drained == []
    assert gave_up.detail == "new replicas not ready after 30 s: a10g has 0 of 1 ready"
    assert h.controller.replicas.desired == {"a100": 1, "a10g": 0}  # a change for cost gives the replica back
    assert h.live("a100") == {a100: "ready"}


async def test_an_operator_resize_during_a_transition_abandons_it():
    h = Harness(CONFIG, hang=("a10g",))
    await h.tick(2)
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    await h.tick(2)
    h.controller.scale_pool("a10g", 2)
    await h.tick()
    assert h.placement.history[-1].detail == "pool a10g's desired replicas changed to 2 meanwhile"
    assert h.controller.replicas.desired == {"a100": 1, "a10g": 2}  # the operator's word stands


async def test_an_infeasible_workload_keeps_the_fleet_and_the_dry_run_names_the_bucket(h):
    h.later(60)
    h.traffic((6000, 16), 1.0, 60)  # no GPU type meets TTFT 0.3 s for 6000-token prompts
    await h.tick()
    assert h.placement.latest.decision.action == "keep" and h.placement.transition is None
    with pytest.raises(Conflict, match=r"bucket in\[4096,8192\) out\[16,32\) of m .*no GPU type meets TTFT 0.3 s"):
        await h.placement.dry_run()


async def test_a_what_if_workload_is_planned_without_touching_the_fleet(h):
    report = await h.placement.dry_run(WorkloadOverride(2.0, (("m", *SHORT, 2.0),)))
    assert report.what_if and report.decision.action == "change"
    assert {p.pool: p.planned for p in report.pools} == {"a100": 0, "a10g": 1}
    assert report.workloads[0].total_rate == pytest.approx(2.0 * 2.0 * 1.1)  # scale, then headroom
    [share] = report.assignments
    assert (share.bucket, share.pool) == ("in[64,128) out[64,128)", "a10g") and share.fraction == pytest.approx(1.0)
    assert report.nodes.idle == ("node-A100-80GB", "node-A100-80GB-b", "node-A10G-b")
    assert h.controller.replicas.desired == {"a100": 1, "a10g": 0}  # a dry run changes nothing
    long = await h.placement.dry_run(WorkloadOverride(1.0, (("m", *LONG, 2.0),)))
    assert long.decision.reason == "the fleet already has the planned mix"
    with pytest.raises(NotFound, match="unknown model"):
        await h.placement.dry_run(WorkloadOverride(1.0, (("other", 64, 64, 1.0),)))


async def test_placement_is_off_by_default_but_the_fleet_cost_is_exported():
    data = config()
    del data["placement"]
    h = Harness(data)
    h.later(60)
    h.traffic(SHORT, 2.0, 60)
    await h.tick(3)
    assert h.placement.replanning is None and h.placement.latest is None
    assert h.controller.metrics["flotilla_fleet_cost_per_hour"]._value.get() == pytest.approx(5.0688)
    report = await h.placement.dry_run()  # operators may still look
    assert not report.enabled and {p.pool: p.planned for p in report.pools} == {"a100": 0, "a10g": 1}
    assert report.decision.reason.startswith("warming up: 60 s of the 300 s window")


def test_a_bad_what_if_workload_is_refused_naming_it():
    with pytest.raises(Invalid, match=r"rate \(m, 64, 64, -1.0\): token counts and the rate must be finite"):
        workload_override(1.0, [("m", 64, 64, -1)])
    with pytest.raises(Invalid, match=r"rate_scale must be in \[0, 1000\]"):
        workload_override(5000.0)
