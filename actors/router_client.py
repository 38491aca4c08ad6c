"""`RouterClient`: the only code that calls a `RouterAgent` through Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.router import RouterAgent, RouterAgentInfo
from policies.bookings import Booking
from policies.fleet_view import FleetView, RoutingRequest
from policies.routing import RoutingDecision


class RouterUnavailable(RuntimeError):
    def __init__(self, agent_id: str, reason: str):
        super().__init__(f"router agent {agent_id} unavailable: {reason}")
        self.agent_id = agent_id


def router_actor_name(agent_id: str) -> str:
    return f"router:{agent_id}"


class RouterClient:
    def __init__(self, agent_id: str, handle: Any):
        self.agent_id = agent_id
        self._handle = handle

    @classmethod
    def create(cls, agent_id: str, namespace: str, settings: Mapping[str, Any]) -> RouterClient:
        """Create (or attach to) the detached agent actor named after `agent_id`."""
        handle = ray.remote(RouterAgent).options(
            name=router_actor_name(agent_id),
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=1000,
        ).remote(agent_id, namespace, **settings)
        return cls(agent_id, handle)

    @classmethod
    def lookup(cls, agent_id: str, namespace: str) -> RouterClient:
        try:
            return cls(agent_id, ray.get_actor(router_actor_name(agent_id), namespace=namespace))
        except ValueError:
            raise RouterUnavailable(agent_id, "no such actor") from None

    async def pick(self, request: RoutingRequest, timeout_s: float = 2.0) -> RoutingDecision:
        return await self._call(self._handle.pick.remote(request), timeout_s)

    async def update_view(self, view: FleetView, timeout_s: float = 2.0) -> RouterAgentInfo:
        return await self._call(self._handle.update_view.remote(view), timeout_s)

    async def configure(self, version: int, settings: Mapping[str, Any], timeout_s: float = 5.0) -> RouterAgentInfo:
        return await self._call(self._handle.configure.remote(version, **settings), timeout_s)

    async def set_peers(self, agent_ids: list[str], timeout_s: float = 5.0) -> None:
        await self._call(self._handle.set_peers.remote(agent_ids), timeout_s)

    async def info(self, timeout_s: float = 2.0) -> RouterAgentInfo:
        return await self._call(self._handle.info.remote(), timeout_s)

    def send_bookings(self, bookings: tuple[Booking, ...]) -> None:
        """Fire and forget: a lost batch of bookings only makes routing a little less even."""
        self._handle.receive_bookings.remote(bookings)

    def crash(self) -> None:
        """Kill the agent the way a failure would: Ray restarts it (a drill)."""
        try:
            ray.kill(self._handle, no_restart=False)
        except (RayActorError, ValueError):
            pass  # already gone

    def kill(self) -> None:
        try:
            ray.kill(self._handle, no_restart=True)
        except (RayActorError, ValueError):
            pass  # already gone

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except (TimeoutError, GetTimeoutError):
            raise RouterUnavailable(self.agent_id, f"no answer within {timeout_s:g}s") from None
        except RayActorError as e:
            raise RouterUnavailable(self.agent_id, str(e).splitlines()[0]) from None
