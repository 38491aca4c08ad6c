"""A redeploy with a changed config (`serve deploy`, `helm upgrade`) reaches the running fleet:
the ingress finds the controller deployed with the old config and replaces it; the new one
takes back the live replicas and applies the new config."""

from __future__ import annotations

import pytest

from orchestrator.config import parse_config
from orchestrator.controller_client import ControllerClient
from tests.integration.conftest import run_async, wait_for

pytestmark = pytest.mark.ray

NAMESPACE = "flotilla-redeploy-test"


def config(replicas: int, load_guard: float):
    return parse_config({
        "namespace": NAMESPACE,
        "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 2048}],
        "pools": [{"name": "sim", "gpu_type": "H100", "model": "m", "replicas": replicas, "max_replicas": 2,
                   "gpus_per_replica": 0}],
        "routing": {"agents": 1, "load_guard": load_guard},
        "controller": {"control_period_s": 0.25, "metrics_port": 0},
    })


def test_a_changed_config_replaces_the_controller_which_keeps_the_replicas(ray_cluster):
    first = ControllerClient.get_or_create(config(1, 0.9))
    try:
        assert run_async(first.wait_ready(timeout_s=120))
        [original] = [r.replica_id for r in run_async(first.status()).replicas]
        assert ControllerClient.get_or_create(config(1, 0.9)) is not None  # same config: the same controller
        second = ControllerClient.get_or_create(config(2, 0.8))

        def both_ready():
            replicas = run_async(second.status()).replicas
            return replicas if sum(r.state == "ready" for r in replicas) == 2 else None

        replicas = wait_for(both_ready, timeout_s=120, what="the new config's two replicas")
        assert original in {r.replica_id for r in replicas}  # taken back, not started again
        assert run_async(second.config()).routing.load_guard == 0.8
    finally:
        controller = ControllerClient.lookup(NAMESPACE)
        run_async(controller.shutdown_fleet())
        controller.kill()
