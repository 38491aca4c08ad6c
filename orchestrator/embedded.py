"""The embedded fleet: a local Ray head in this process, serving a `FleetConfig`.

This is what `flotilla up` (and so `make run`) starts. The head node carries one
logical GPU per simulated GPU in the config and an `accelerator_type:<TYPE>` resource
for every GPU type, so replicas land exactly as they would on real GPU nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import serve

from orchestrator.app import build_app
from orchestrator.config import FleetConfig
from orchestrator.controller_client import ControllerClient

log = logging.getLogger(__name__)

APP_NAME = "flotilla"


@dataclass(frozen=True)
class NodeResources:
    num_cpus: int
    num_gpus: int
    resources: dict[str, float]


def head_resources(config: FleetConfig) -> NodeResources:
    """What one local node must offer to host every pool at its maximum size."""
    gpus = sum(p.max_replicas * p.gpus_per_replica for p in config.pools)
    types = {p.gpu_type for p in config.pools if p.gpus_per_replica > 0}
    cpu_replicas = sum(p.max_replicas for p in config.pools if p.gpus_per_replica == 0)
    # Logical CPUs: Ray uses them for placement only; control actors ask for none.
    cpus = max(os.cpu_count() or 2, 4) + cpu_replicas + config.server.ingress_replicas
    return NodeResources(cpus, gpus, {f"accelerator_type:{t}": 1.0 for t in sorted(types)})


def start(config: FleetConfig, *, progress: Callable[[str], None] = print, ready_timeout_s: float = 600.0,
          address: str | None = None) -> ControllerClient:
    """Start Ray (or join `address`), deploy the app, and wait until every pool is ready."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace=config.namespace, logging_level=logging.WARNING)
        else:
            res = head_resources(config)
            progress(f"starting a local Ray head: {res.num_cpus} CPUs, {res.num_gpus} simulated GPUs, "
                     f"{', '.join(res.resources) or 'no GPU types'}")
            # address="local": a head of our own, even when another Ray runs on this machine
            ray.init(address="local", num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources,
                     namespace=config.namespace, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
    controller = ControllerClient.lookup(config.namespace)
    asyncio.run(_wait_ready(controller, config, progress, ready_timeout_s))
    return controller


async def _wait_ready(controller: ControllerClient, config: FleetConfig, progress: Callable[[str], None],
                      timeout_s: float) -> None:
    wanted = sum(p.replicas for p in config.pools)
    began = time.monotonic()
    last = ""
    while time.monotonic() - began < timeout_s:
        if await controller.wait_ready(timeout_s=5.0):
            progress(f"fleet ready: {wanted} replicas in {time.monotonic() - began:.0f}s")
            return
        status = await controller.status()
        states = Counter(r.state for r in status.replicas)
        line = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no replicas yet"
        if line != last:
            progress(f"  waiting for {wanted} replicas: {line} ({time.monotonic() - began:.0f}s)")
            last = line
    raise TimeoutError(f"the fleet was not ready within {timeout_s:.0f}s; see `flotilla status`")


def stop(config: FleetConfig) -> None:
    """Stop the fleet's replicas and agents, then Serve and Ray."""
    if not ray.is_initialized():  # interrupted before Ray started
        return
    try:
        controller = ControllerClient.lookup(config.namespace)
        asyncio.run(controller.shutdown_fleet())
        controller.kill()
    except Exception as e:  # noqa: BLE001 — stopping goes on regardless
        log.warning("fleet shutdown: %s", e)
    serve.shutdown()
    ray.shutdown()
