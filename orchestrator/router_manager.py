"""Keeps the router agents alive, introduced to each other, and holding the latest view.

Agents are detached actors Ray restarts on failure; a restarted agent has lost its
view and its peers, which the next `update()` gives back (its reported peer count is
wrong, or the call failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from actors.router import RouterAgentInfo
from actors.router_client import RouterClient, RouterUnavailable
from orchestrator.config import FleetConfig
from orchestrator.fault_log import FaultLog
from policies.fleet_view import FleetView

log = logging.getLogger(__name__)


class RouterHandle(Protocol):
    agent_id: str

    async def update_view(self, view: FleetView, timeout_s: float = 2.0) -> RouterAgentInfo: ...
    async def set_peers(self, agent_ids: list[str], timeout_s: float = 5.0) -> None: ...
    async def configure(self, version: int, settings: Mapping[str, Any], timeout_s: float = 5.0) -> RouterAgentInfo:
        ...


RouterLauncher = Callable[[str, Mapping[str, Any]], RouterHandle]


def ray_router_launcher(namespace: str) -> RouterLauncher:
    return lambda agent_id, settings: RouterClient.create(agent_id, namespace, settings)


def agent_ids_of(config: FleetConfig) -> list[str]:
    return [f"agent-{i}" for i in range(config.routing.agents)]


def agent_settings(config: FleetConfig) -> dict[str, Any]:
    r = config.routing
    return dict(weights=dict(r.weights), load_guard=r.load_guard, share_interval_s=r.share_interval_s,
                booking_ttl_s=r.booking_ttl_s)


class RouterManager:
    def __init__(self, config: FleetConfig, launcher: RouterLauncher, faults: FaultLog | None = None):
        self.faults = faults
        self.agent_ids = agent_ids_of(config)
        self.settings = agent_settings(config)
        # Version 0 is what agents are built with; a restarted agent is rebuilt with it too,
        # so its reported version tells whether it runs the current settings.
        self.settings_version = 0
        self.handles = {a: launcher(a, self.settings) for a in self.agent_ids}
        self.failures: dict[str, str] = {}
        self._answered: set[str] = set()  # agents that took a view at least once (before, one is starting)

    def reconfigure(self, config: FleetConfig) -> None:
        """New routing settings; agents get them with the next `publish`."""
        self.settings = agent_settings(config)
        self.settings_version += 1

    async def publish(self, view: FleetView) -> None:
        """Push `view` to every agent; re-introduce agents that lost their peers or settings."""
        results = await asyncio.gather(
            *(self.handles[a].update_view(view) for a in self.agent_ids), return_exceptions=True
        )
        for agent_id, result in zip(self.agent_ids, results):
            if isinstance(result, RouterAgentInfo):
                self._answered.add(agent_id)
                if self.failures.pop(agent_id, None) is not None and self.faults is not None:
                    self.faults.recovered("router", agent_id)
                if result.peers != len(self.agent_ids) - 1:
                    await self._introduce(agent_id)
                if result.settings_version != self.settings_version:
                    await self._configure(agent_id)
            else:
                if agent_id not in self.failures and agent_id in self._answered and self.faults is not None:
                    self.faults.report("router", agent_id, "unreachable", str(result))
                self.failures[agent_id] = str(result)
                log.warning("router agent %s did not take view %d: %s", agent_id, view.version, result)

    async def _configure(self, agent_id: str) -> None:
        try:
            await self.handles[agent_id].configure(self.settings_version, self.settings)
        except RouterUnavailable as e:
            self.failures[agent_id] = str(e)

    async def _introduce(self, agent_id: str) -> None:
        try:
            await self.handles[agent_id].set_peers(self.agent_ids)
        except RouterUnavailable as e:
            self.failures[agent_id] = str(e)
