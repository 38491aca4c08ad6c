"""A real multi-node Ray cluster (`ray.cluster_utils.Cluster`) serving a real fleet.

Nodes: a head (control plane, ingress), an "H100" node and an "L4" node carrying
logical GPUs and `accelerator_type:*` resources like real GPU nodes, and a CPU node
for the vLLM replica. Ray's health checks are shortened so a dead node is news in
seconds (facts measured on Ray 2.60: ~5.8 s with period 1 s x threshold 3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from orchestrator.app import build_app
from orchestrator.config import FleetConfig, parse_config
from orchestrator.controller_client import ControllerClient
from orchestrator.embedded import APP_NAME

SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
VIEWER_TOKEN, OPERATOR_TOKEN = "test-viewer-token-0123", "test-operator-token-0123"


def pytest_collection_modifyitems(config, items):
    """Tests marked `chaos` break the package's cluster on purpose (nodes, controller): they run
    last among this package's tests (the cluster is torn down when the package ends, before
    other packages' tests start Ray of their own)."""
    here = Path(__file__).parent
    inside = [i for i, item in enumerate(items) if here in Path(item.path).parents]
    if not inside:
        return
    block = [items[i] for i in inside]
    block.sort(key=lambda item: item.get_closest_marker("chaos") is not None)  # stable: order kept otherwise
    for i, item in zip(inside, block):
        items[i] = item


def run_async(coroutine):
    """Run a coroutine to completion from sync test code, whatever loop the caller has."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.2, what: str = ""):
    """Poll until `predicate()` is truthy; return its value. Never a bare sleep-then-assert."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


@dataclass
class NodeInfo:
    node_id: str
    kind: str  # "head", "H100", "L4", "cpu"


@dataclass
class RayTestCluster:
    cluster: Cluster
    nodes: dict[str, NodeInfo]  # node id -> info

    def kind_of(self, node_id: str) -> str:
        return self.nodes[node_id].kind


@pytest.fixture(scope="package")  # not "session": other packages' tests start Ray of their own
def ray_cluster():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "_system_config": SYSTEM_CONFIG})
    kinds = {cluster.head_node.node_id: "head"}
    for kind, args in (
        ("H100", {"num_cpus": 2, "num_gpus": 2, "resources": {"accelerator_type:H100": 1}}),
        ("L4", {"num_cpus": 2, "num_gpus": 4, "resources": {"accelerator_type:L4": 1}}),
        ("cpu", {"num_cpus": 2}),
        # a spare H100 node: the fault tests remove an H100 node, and the other still fits the pool
        ("H100", {"num_cpus": 0, "num_gpus": 2, "resources": {"accelerator_type:H100": 1}}),
    ):
        node = cluster.add_node(**args)
        kinds[node.node_id] = kind
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="flotilla-test", logging_level="WARNING")
    yield RayTestCluster(cluster, {nid: NodeInfo(nid, kind) for nid, kind in kinds.items()})
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@dataclass
class Fleet:
    config: FleetConfig
    controller: ControllerClient
    base_url: str
    metrics_url: str

    def status(self):
        return run_async(self.controller.status())

    def replicas(self, pool: str | None = None):
        return [r for r in self.status().replicas if r.state == "ready" and (pool is None or r.pool == pool)]


def fleet_config(model_dir: str, http_port: int, metrics_port: int) -> FleetConfig:
    return parse_config({
        "namespace": "flotilla-test",
        "models": [
            {"name": "tiny-llama", "path": model_dir, "max_model_len": 1024, "block_size": 32},
            {"name": "sim-llama-7b", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096},
            {"name": "sim-slow", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 2048},
        ],
        "pools": [
            # two, on different nodes (replicas spread): vLLM-to-vLLM migration across nodes
            {"name": "cpu", "gpu_type": "CPU", "model": "tiny-llama", "engine": "vllm", "gpus_per_replica": 0,
             "replicas": 2, "max_replicas": 2, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
            {"name": "h100", "gpu_type": "H100", "model": "sim-llama-7b", "replicas": 2},
            {"name": "l4", "gpu_type": "L4", "model": "sim-llama-7b", "replicas": 2},
            # one sequence at a time and one waiting: easy to fill, for the overload tests
            {"name": "slow", "gpu_type": "L4", "model": "sim-slow", "replicas": 1, "max_queue": 1,
             "engine_args": {"max_num_seqs": 1}},
        ],
        "routing": {"agents": 2},
        "server": {"host": "127.0.0.1", "port": http_port, "admission_timeout_s": 1.0, "retry_after_s": 2},
        "controller": {"control_period_s": 0.25, "metrics_port": metrics_port},
        # short, for the fault tests' hang; long enough that a CPU-starved vLLM step is not a hang
        "recovery": {"hang_timeout_s": 5.0},
        # a KV-cache store per node, shared by every replica (tests/integration/test_kvstore_fleet.py)
        "kv_store": {"enabled": True, "capacity_bytes": 32 << 20},  # of each node's 150 MB object store
        "admin": {"tokens": [{"name": "test-viewer", "role": "viewer", "token": VIEWER_TOKEN},
                             {"name": "test-operator", "role": "operator", "token": OPERATOR_TOKEN}]},
    })


@pytest.fixture(scope="package")
def fleet(ray_cluster, local_model_dir) -> Fleet:
    http_port, metrics_port = free_port(), free_port()
    config = fleet_config(str(local_model_dir), http_port, metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
    controller = wait_for(lambda: _lookup(config), timeout_s=60, what="the controller")
    assert run_async(controller.wait_ready(timeout_s=300)), run_async(controller.status())
    return Fleet(config, controller, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics")


def _lookup(config: FleetConfig) -> ControllerClient | None:
    try:
        return ControllerClient.lookup(config.namespace)
    except Exception:  # noqa: BLE001 — not created yet
        return None
