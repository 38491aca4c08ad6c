"""The detached Ray actor that runs the `Controller`'s loop and answers the fleet's questions.

Only `orchestrator.controller_client.ControllerClient` calls it through Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from orchestrator.config import parse_config
from orchestrator.controller import Controller, FleetStatus
from orchestrator.metrics import MetricsRegistry, Observation
from orchestrator.replica_manager import ray_launcher
from orchestrator.router_manager import ray_router_launcher
from policies.fleet_view import FleetView

log = logging.getLogger(__name__)


class ControllerActor:
    def __init__(self, config_data: dict[str, Any]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = parse_config(config_data)
        namespace = self.config.namespace
        self.metrics = MetricsRegistry()
        self.metrics_error: str | None = None
        self.controller = Controller(
            self.config,
            launcher=ray_launcher(namespace),
            router_launcher=ray_router_launcher(namespace),
            metrics=self.metrics,
        )
        self._loop: asyncio.Task | None = None
        self._ready = asyncio.Event()
        port = self.config.controller.metrics_port
        if port:
            try:
                self.metrics.serve(port)
            except OSError as e:  # the fleet still serves; the operator sees why metrics are missing
                self.metrics_error = f"cannot serve metrics on port {port}: {e}"
                log.error(self.metrics_error)

    async def start(self) -> None:
        """Start the reconcile loop (idempotent)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every pool has its desired READY replicas and routers hold a view."""
        await self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def fleet_view(self) -> FleetView | None:
        return self.controller.view

    def status(self) -> FleetStatus:
        return self.controller.status()

    def router_ids(self) -> list[str]:
        return list(self.controller.routers.agent_ids)

    def record_metrics(self, observations: Iterable[Observation]) -> int:
        return self.metrics.apply(observations)

    async def shutdown_fleet(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        await self.controller.replicas.stop_all()
        for handle in self.controller.routers.handles.values():
            handle.kill()

    async def _run(self) -> None:
        period = self.config.controller.control_period_s
        while True:
            await self.controller.step()
            if self.controller.replicas.ready() and self.controller.view is not None:
                self._ready.set()
            await asyncio.sleep(period)
