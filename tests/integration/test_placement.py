"""Cost-aware placement on a multi-node Ray cluster: apply a plan, shift the workload, re-plan.

Its own small fleet, in its own namespace and Serve application, on two nodes this module
adds to the session cluster (an A100-80GB and an A10G node, 2 logical GPUs each, no CPUs
so nothing else lands there); the cluster's H100 node makes the third GPU type. One sim
model, TTFT target 0.3 s: short requests are cheapest on an A10G; 1500-token prompts miss
the TTFT target there and need the A100 (the H100 never pays). Hysteresis is set high, so
the periodic re-plan holds back the move to the A10G for cost and an operator applies it;
the shift to long prompts then leaves the A10G short of capacity, and the re-plan moves
the fleet back on its own. A client sends requests at a steady rate throughout; every one
of them must complete.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

import httpx
import openai
import pytest
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.exceptions import RayServeException

from orchestrator.cli import main as flotilla
from orchestrator.config import FleetConfig, parse_config
from orchestrator.controller_client import ControllerClient
from orchestrator.ingress import OpenAIIngress
from tests.integration.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, free_port, run_async, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP, PREFIX, MODEL = "placement-test", "/placement-test", "sim-7b"
SHORT, LONG = (64, 32), (1500, 16)  # prompt tokens (one byte each), output tokens
RATE = 2.0  # requests per second


def fleet_config() -> FleetConfig:
    return parse_config({
        "namespace": "flotilla-placement-test",
        "models": [{"name": MODEL, "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 2048}],
        "pools": [
            {"name": "a100", "gpu_type": "A100-80GB", "model": MODEL, "replicas": 1, "max_replicas": 2},
            {"name": "a10g", "gpu_type": "A10G", "model": MODEL, "replicas": 0, "max_replicas": 2},
            {"name": "h100", "gpu_type": "H100", "model": MODEL, "replicas": 0, "max_replicas": 1},
        ],
        "slo_classes": [{"name": "interactive", "ttft_s": 0.3, "tpot_s": 0.1, "priority": 10}],
        "routing": {"agents": 1},
        "controller": {"control_period_s": 0.25, "metrics_port": 0},
        "placement": {"enabled": True, "window_s": 15, "replan_period_s": 2, "min_dwell_s": 0,
                      "min_relative_saving": 0.9},
        "admin": {"tokens": [{"name": "test-viewer", "role": "viewer", "token": VIEWER_TOKEN},
                             {"name": "test-operator", "role": "operator", "token": OPERATOR_TOKEN}]},
    })


@dataclass
class PlacementFleet:
    controller: ControllerClient
    base_url: str  # the app's root: /v1/... and /admin/v1/...
    nodes: dict[str, str]  # node id -> GPU type, of the nodes this module added

    def live(self) -> dict[str, list[str]]:
        """Live replicas per pool, by state."""
        out: dict[str, list[str]] = {}
        for r in run_async(self.controller.status()).replicas:
            if r.state not in ("stopped", "dead"):
                out.setdefault(r.pool, []).append(r.state)
        return out

    def ready_on(self) -> dict[str, str]:
        """READY replicas' pools -> the GPU type of their node."""
        return {r.pool: self.nodes.get(r.node_id, "?") for r in run_async(self.controller.status()).replicas
                if r.state == "ready"}

    def plan(self) -> dict:
        r = httpx.get(f"{self.base_url}/admin/v1/placement/plan", timeout=60,
                      headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
        assert r.status_code == 200, r.text
        return r.json()


def _serve_url() -> str:
    """The running Serve's HTTP address (the session fleet's), or a new one's."""
    try:
        client = _get_global_client()
    except RayServeException:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    return f"http://127.0.0.1:{client.http_config.port}"


@pytest.fixture(scope="module")
def placement_fleet(ray_cluster):
    cluster = ray_cluster.cluster
    added = {t: cluster.add_node(num_cpus=0, num_gpus=2, resources={f"accelerator_type:{t}": 1})
             for t in ("A100-80GB", "A10G")}
    cluster.wait_for_nodes()
    config = fleet_config()
    # on the head, beside the session fleet's ingress: Serve runs a proxy on every node with a replica
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}})
    base_url = _serve_url() + PREFIX
    serve.run(ingress.bind(config.model_dump(mode="json")), name=APP, route_prefix=PREFIX, blocking=False)
    controller = wait_for(lambda: _lookup(config.namespace), timeout_s=120, what="the placement fleet's controller")
    assert run_async(controller.wait_ready(timeout_s=180)), run_async(controller.status())
    wait_for(lambda: httpx.get(f"{base_url}/health", timeout=10).status_code == 200, timeout_s=60,
             what="the placement fleet's ingress")
    yield PlacementFleet(controller, base_url, {n.node_id: t for t, n in added.items()})
    serve.delete(APP)
    run_async(controller.shutdown_fleet())
    controller.kill()
    for node in added.values():
        cluster.remove_node(node)


def _lookup(namespace: str) -> ControllerClient | None:
    try:
        return ControllerClient.lookup(namespace)
    except Exception:  # noqa: BLE001 — not created yet
        return None


class Load:
    """Requests at a steady rate from a background thread (the openai client, no retries);
    the size may change on the fly. Every answer is kept: output tokens, or the error."""

    def __init__(self, base_url: str, rate: float, size: tuple[int, int]):
        self.base_url, self.rate, self.size = base_url, rate, size
        self.sent: list[tuple[int, int]] = []
        self.answers: list[tuple[tuple[int, int], int | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def count(self, size: tuple[int, int]) -> int:
        return sum(s == size for s in self.sent)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
        assert not self._thread.is_alive(), "requests still open 300 s after the load stopped"

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        tasks = []
        while not self._stop.is_set():
            size = self.size
            self.sent.append(size)
            tasks.append(asyncio.create_task(self._one(client, len(self.sent), size)))
            await asyncio.sleep(1 / self.rate)
        await asyncio.gather(*tasks)
        await client.close()

    async def _one(self, client: openai.AsyncOpenAI, n: int, size: tuple[int, int]) -> None:
        prompt_tokens, output_tokens = size
        prompt = f"{n:06d}:" + "x" * (prompt_tokens - 7)  # byte tokens; distinct, so no shared prefix
        try:
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=output_tokens,
                                                temperature=0, extra_body={"ignore_eos": True})
            self.answers.append((size, r.usage.completion_tokens))
        except openai.OpenAIError as e:
            self.answers.append((size, repr(e)))


def test_the_fleet_follows_its_workload_to_the_cheapest_mix_without_losing_a_request(placement_fleet, capsys):
    fleet = placement_fleet
    assert fleet.ready_on() == {"a100": "A100-80GB"}
    load = Load(fleet.base_url, RATE, SHORT)
    try:
        # short requests: one A10G would do, but saving 80% is under the 90% hysteresis
        held = wait_for(lambda: (p := fleet.plan())["decision"]["reason"].startswith("hysteresis") and p,
                        timeout_s=120, what="a full window of short requests planned")
        assert {p["pool"]: p["planned"] for p in held["pools"]} == {"a100": 0, "a10g": 1, "h100": 0}
        assert held["decision"]["action"] == "keep" and fleet.live() == {"a100": ["ready"]}

        # the operator applies it (the CLI against the fleet's admin API): scale out, then drain
        assert flotilla(["plan", "--url", fleet.base_url, "--token", OPERATOR_TOKEN, "--apply", "--json"]) == 0
        applied = json.loads(capsys.readouterr().out)
        assert applied["transition"]["trigger"] == "operator"
        assert applied["decision"]["scale_out"] == [{"pool": "a10g", "current": 0, "target": 1}]
        wait_for(lambda: fleet.live() == {"a10g": ["ready"]}, timeout_s=120, what="the fleet on one A10G")
        assert fleet.ready_on() == {"a10g": "A10G"}

        # long prompts: the A10G misses the TTFT target, so the re-plan moves back on its own
        load.size = LONG
        moved = wait_for(lambda: ((t := fleet.plan()["transition"]) and t["trigger"] == "capacity"
                                  and t["state"] == "done" and t), timeout_s=180, what="the move for capacity")
        assert [m["pool"] for m in moved["scale_out"]] == ["a100"] and moved["drain"][0]["pool"] == "a10g"
        wait_for(lambda: fleet.live() == {"a100": ["ready"]}, timeout_s=60, what="the fleet on one A100")
        assert fleet.ready_on() == {"a100": "A100-80GB"}
        wait_for(lambda: load.count(LONG) >= 10, timeout_s=60, what="long requests after the move")

        # the dry run from the CLI explains the mix the fleet settled on
        assert flotilla(["plan", "--url", fleet.base_url, "--token", VIEWER_TOKEN]) == 0
        text = capsys.readouterr().out
        assert "decision: keep — the fleet already has the planned mix" in text and "(capacity): done" in text
        assert "in[1024,2048) out[16,32)" in text
    finally:
        load.stop()

    # every request sent was answered in full, through both moves
    assert len(load.answers) == len(load.sent) and load.count(SHORT) and load.count(LONG)
    lost = [(size, answer) for size, answer in load.answers if answer != size[1]]
    assert not lost, lost
