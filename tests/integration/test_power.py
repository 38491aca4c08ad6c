"""Power capping live: a small fleet of simulated H100 replicas on the multi-node Ray cluster,
its own controller in its own namespace, load pushed until the power budget is threatened.
The controller must slow the lowest priority first and hold the budget. The CLI's view and
budget are checked on the shared fleet."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.replica_client import ReplicaClient
from orchestrator.config import parse_config
from orchestrator.controller_client import ControllerClient
from tests.integration.conftest import OPERATOR_TOKEN, run_async, wait_for

pytestmark = pytest.mark.ray

NAMESPACE = "flotilla-power-test"


@pytest.fixture(scope="module")
def power_fleet(ray_cluster):
    """Two sim H100 replicas (CPU-placed, so the shared fleet keeps the logical GPUs), no
    budget yet; clocks locked by LOCK stay locked (min_hold_s) while the test looks."""
    config = parse_config({
        "namespace": NAMESPACE,
        "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096}],
        "pools": [{"name": "busy", "gpu_type": "H100", "model": "m", "replicas": 2, "max_replicas": 2,
                   "gpus_per_replica": 0}],
        "routing": {"agents": 1},
        "controller": {"control_period_s": 0.25, "metrics_port": 0},
        "power": {"oversubscription": 2.0, "control_period_s": 0.25, "min_hold_s": 120.0, "stale_after_s": 5.0},
    })
    controller = ControllerClient.get_or_create(config)
    try:
        assert run_async(controller.wait_ready(timeout_s=120)), run_async(controller.status())
        yield controller
    finally:
        run_async(controller.shutdown_fleet())
        controller.kill()


class Load:
    """Long generations streamed to chosen replicas from a background thread until stopped."""

    def __init__(self, targets: list[tuple[str, str, int]]):  # (replica id, SLO class, requests)
        self.stop = threading.Event()
        self.targets = targets
        self.thread = threading.Thread(target=asyncio.run, args=(self._all(),), daemon=True)

    async def _all(self) -> None:
        streams = [self._one(rid, slo, f"{rid}-{slo}-{i}") for rid, slo, n in self.targets for i in range(n)]
        await asyncio.gather(*streams, return_exceptions=True)

    async def _one(self, replica_id: str, slo_class: str, request_id: str) -> None:
        client = ReplicaClient.lookup(replica_id, NAMESPACE)
        request = GenerationRequest(request_id, "m", tuple(97 + i % 26 for i in range(512)),
                                    SamplingSpec(max_tokens=3500, ignore_eos=True), slo_class=slo_class)
        async for _ in client.generate(request):
            if self.stop.is_set():
                break  # closing the stream cancels the request on the replica


def power_of(controller):
    return run_async(controller.power())


def gpu(status, replica_id):
    return next(g for g in status.gpus if g.replica_id == replica_id)


def test_a_threatened_budget_slows_the_lowest_priority_first_and_holds(power_fleet):
    controller = power_fleet
    important, cheap = sorted(r.replica_id for r in run_async(controller.status()).replicas if r.state == "ready")
    load = Load([(important, "interactive", 8), (cheap, "batch", 8)])
    load.thread.start()
    try:
        seen = []

        def steady():  # both decoding, the 1 s telemetry window full: two reads a second apart agree
            s = power_of(controller)
            seen.append(s)
            draws = [sum(g.draw_w for g in x.gpus) for x in seen[-5:] if len(x.gpus) == 2]
            ok = len(s.gpus) == 2 and all(g.draw_w > 300 for g in s.gpus) and len(draws) == 5
            return s if ok and max(draws) < 1.03 * min(draws) else None

        busy = wait_for(steady, timeout_s=90, interval_s=0.25, what="both replicas drawing steadily")
        budget = sum(g.draw_w for g in busy.gpus) / 0.89  # over the cap threshold (0.85), under the emergency one
        set_to = run_async(controller.set_power_budget("cluster", "", budget))
        assert set_to.budget_w == pytest.approx(budget) and set_to.source == "operator"

        def slowed():
            s = power_of(controller)
            low, high = gpu(s, cheap), gpu(s, important)
            return s if low.locked_clock_mhz is not None or low.limit_w < high.limit_w else None

        status = wait_for(slowed, timeout_s=30, what="the batch replica slowed")
        assert status.level in ("lock", "cap") and status.capping_events >= 1
        assert gpu(status, important).locked_clock_mhz is None  # the top priority is never clock-locked
        assert gpu(status, cheap).priority < gpu(status, important).priority
        def relieved():  # the lock shows in the draw once the 1 s telemetry window has passed
            s = power_of(controller)
            return s if gpu(s, cheap).draw_w < 0.9 * gpu(busy, cheap).draw_w else None

        after = wait_for(relieved, timeout_s=30, what="the locked replica drawing less")
        [held] = after.budgets
        assert held.scope == "cluster" and held.draw_w <= budget  # the budget holds
        assert gpu(after, important).locked_clock_mhz is None
        assert gpu(after, important).limit_w >= gpu(after, cheap).limit_w
    finally:
        load.stop.set()
        load.thread.join(timeout=60)


def test_a_budget_the_fleet_cannot_fit_is_refused(power_fleet):
    from orchestrator.errors import Conflict

    with pytest.raises(Conflict, match="below the idle draw of its 2 GPUs"):
        run_async(power_fleet.set_power_budget("cluster", "", 50))


def flotilla(fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--url", fleet.base_url,
                           "--token", OPERATOR_TOKEN], capture_output=True, text=True, timeout=120)


def test_flotilla_power_shows_draw_and_sets_a_budget(fleet):
    done = flotilla(fleet, "power", "--budget", "10000")  # far above the fleet's peak: nothing is capped
    assert done.returncode == 0 and "cluster power budget set to 10000 W" in done.stdout
    def decided():
        p = json.loads(flotilla(fleet, "power", "--json").stdout)
        return p if p["budgets"] and p["budgets"][0]["draw_w"] is not None else None

    power = wait_for(decided, timeout_s=30, what="a decision under the budget")
    assert power["budgets"][0]["budget_w"] == 10000 and power["level"] == "normal"
    pools = {g["replica_id"].rsplit("-", 1)[0] for g in power["gpus"]}
    assert {"h100", "l4"} <= pools and "cpu" not in pools  # vLLM on the CPU has no GPU power
    table = flotilla(fleet, "power").stdout
    assert "BUDGET W" in table and "CAP W" in table and "10000" in table
