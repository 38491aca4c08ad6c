"""The chaos run's own Ray cluster and the fleet deployed on it.

A real multi-node cluster in this process tree (`ray.cluster_utils.Cluster`): a head
(control plane, Serve proxy and ingress), GPU-typed nodes carrying logical GPUs and
`accelerator_type:<TYPE>` resources like real GPU nodes, and a CPU node for vLLM.
GPU nodes offer no CPUs, so nothing that needs one (the ingress, vLLM) lands there and
removing one takes only its sim replicas (and whatever 0-CPU actor Ray put there).
Ray's health checks are shortened as in the integration tests: a removed node is
declared dead after ~6 s instead of ~15 s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.cluster_utils import Cluster

from orchestrator.app import build_app
from orchestrator.config import FleetConfig, parse_config
from orchestrator.controller_client import ControllerClient
from orchestrator.embedded import APP_NAME

SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
NAMESPACE = "flotilla-chaos"
OPERATOR_TOKEN = "chaos-operator-token-0123456789"
HEAD_CPUS = 4

NODE_KINDS: dict[str, dict[str, Any]] = {
    "H100": {"num_cpus": 0, "num_gpus": 2, "resources": {"accelerator_type:H100": 1}},
    "L4": {"num_cpus": 0, "num_gpus": 2, "resources": {"accelerator_type:L4": 1}},
    "cpu": {"num_cpus": 2},
}
LAYOUT = ("H100", "H100", "L4", "L4", "cpu")  # two of each GPU type: either node of a type may die
REMOVABLE_KINDS = ("H100", "L4")  # sim nodes; their pools fit on the surviving node of the type


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_config(model_dir: str, http_port: int, vllm_replicas: int, hang_timeout_s: float,
                 stores: bool) -> FleetConfig:
    """Sim pools on two GPU types and vLLM on the CPU, with recovery tuned for chaos.

    Killing a replica every few seconds is not a crash loop: the backoff stays short
    and the circuit breaker opens only well past the run's rate of faults per pool.
    """
    pools: list[dict[str, Any]] = [
        {"name": "h100", "gpu_type": "H100", "model": "sim-llama-7b", "replicas": 2, "max_replicas": 4},
        {"name": "l4", "gpu_type": "L4", "model": "sim-llama-7b", "replicas": 2, "max_replicas": 4},
    ]
    if vllm_replicas:
        pools.append({"name": "cpu", "gpu_type": "CPU", "model": "tiny-llama", "engine": "vllm",
                      "gpus_per_replica": 0, "replicas": vllm_replicas, "max_replicas": vllm_replicas,
                      "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    return parse_config({
        "namespace": NAMESPACE,
        "models": [
            {"name": "tiny-llama", "path": model_dir, "max_model_len": 1024, "block_size": 32},
            {"name": "sim-llama-7b", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096},
        ],
        "pools": pools,
        "routing": {"agents": 2},
        # a resumed request waits this long for a replica (e.g. while its pool's replacement starts)
        "server": {"host": "127.0.0.1", "port": http_port, "admission_timeout_s": 5.0, "retry_after_s": 1},
        "controller": {"control_period_s": 0.25, "metrics_port": 0},
        "recovery": {"hang_timeout_s": hang_timeout_s, "unresponsive_timeout_s": 5.0, "max_resumes": 4,
                     "backoff_base_s": 0.5, "backoff_max_s": 4.0, "failure_window_s": 30.0,
                     "circuit_failures": 12, "circuit_cooldown_s": 30.0},
        "admin": {"tokens": [{"name": "chaos", "role": "operator", "token": OPERATOR_TOKEN}]},
        # a dead store stalls a KV load up to load_timeout_s: keep that under the hang timeout
        "kv_store": {"enabled": stores, "capacity_bytes": 64 << 20, "load_timeout_s": hang_timeout_s / 2},
    })


class MainThreadCalls:
    """Runs callables on the main thread for code running on another one.

    Ray's node objects register signal handlers, which Python allows on the main thread
    only, so adding a node happens there while the load runs on its own thread.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, args, future))
        return await asyncio.wrap_future(future)

    def serve_until(self, done: concurrent.futures.Future) -> None:
        """Carry out calls until `done` is; call this on the main thread."""
        while not done.done():
            try:
                fn, args, future = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 — handed to the caller
                future.set_exception(e)


@dataclass
class ChaosCluster:
    """The cluster, which of its nodes is of which kind, and the fleet's controller."""

    cluster: Cluster
    kinds: dict[str, str]  # node id -> kind ("head", "H100", "L4", "cpu")
    nodes: dict[str, Any] = field(default_factory=dict)  # node id -> ray._private.node.Node (not the head)
    config: FleetConfig | None = None
    base_url: str = ""
    main: MainThreadCalls = field(default_factory=MainThreadCalls)

    @classmethod
    def start(cls) -> ChaosCluster:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False,
                                          "_system_config": SYSTEM_CONFIG})
        self = cls(cluster, {cluster.head_node.node_id: "head"})
        for kind in LAYOUT:
            self._add(kind, wait=False)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level=logging.WARNING)
        return self

    def deploy(self, config: FleetConfig, ready_timeout_s: float = 600.0) -> ControllerClient:
        """Deploy the Serve app and wait until every pool has its replicas ready."""
        self.config = config
        # one proxy, on the head: the nodes share this machine's address, and the head never dies here
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": config.server.host, "port": config.server.port})
        serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
        self.base_url = f"http://{config.server.host}:{config.server.port}"
        controller = ControllerClient.lookup(config.namespace)
        if not asyncio.run(controller.wait_ready(timeout_s=ready_timeout_s)):
            raise TimeoutError(f"the chaos fleet was not ready within {ready_timeout_s:.0f}s")
        return controller

    def removable(self) -> list[str]:
        """Alive GPU nodes whose kind keeps another alive node when they go."""
        alive = [(nid, k) for nid, k in self.kinds.items() if nid in self.nodes and k in REMOVABLE_KINDS]
        return sorted(nid for nid, k in alive if sum(k == other for _, other in alive) >= 2)

    def remove(self, node_id: str) -> str:
        """Kill every process of a node at once (no graceful shutdown); returns its kind. Blocks;
        call it through `main`."""
        node = self.nodes.pop(node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        return self.kinds[node_id]

    def add(self, kind: str) -> str:
        """A fresh node of `kind`; returns its id. Blocks until it is alive; call it through `main`."""
        return self._add(kind, wait=True)

    def shutdown(self) -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()

    def _add(self, kind: str, wait: bool) -> str:
        node = self.cluster.add_node(wait=wait, **NODE_KINDS[kind])
        self.nodes[node.node_id] = node
        self.kinds[node.node_id] = kind
        return node.node_id
