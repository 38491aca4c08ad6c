"""`RouterAgent`: the Ray actor that picks a replica for each request.

It holds the latest fleet view the controller pushed, routes with the pure policy in
`policies.routing`, and books what it sends so a burst does not pile onto one replica
between two views. Fresh bookings go to the peer agents every `share_interval_s`, so
several agents do not herd onto the same replica either. Only
`actors.router_client.RouterClient` calls it through Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from policies.bookings import Booking, Bookings
from policies.fleet_view import FleetView, RoutingRequest
from policies.routing import Refusal, Router, RoutingDecision, RoutingTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterAgentInfo:
    agent_id: str
    view_version: int
    replicas: int
    outstanding_bookings: int
    peers: int
    decisions: int
    settings_version: int = 0  # of the routing settings it runs with (see `configure`)


class RouterAgent:
    def __init__(
        self,
        agent_id: str,
        namespace: str,
        weights: Mapping[str, float],
        load_guard: float,
        share_interval_s: float,
        booking_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ):
        self.agent_id = agent_id
        self.namespace = namespace
        self.router = Router(weights, load_guard=load_guard)
        # unique per incarnation: a restarted agent must not collide with its former self's bookings
        self.bookings = Bookings(f"{agent_id}#{uuid.uuid4().hex[:8]}", ttl_s=booking_ttl_s)
        self.share_interval_s = share_interval_s
        self.clock = clock
        self.view: FleetView | None = None
        self.table: RoutingTable | None = None
        self.peers: list = []
        self.decisions = 0
        self.settings_version = 0
        self._sharing: asyncio.Task | None = None

    def configure(self, version: int, weights: Mapping[str, float], load_guard: float, share_interval_s: float,
                  booking_ttl_s: float) -> RouterAgentInfo:
        """Adopt new routing settings (validated by the controller) unless they are older."""
        if version > self.settings_version:
            self.router = Router(weights, load_guard=load_guard)
            self.share_interval_s = share_interval_s
            self.bookings.ttl_s = booking_ttl_s
            self.settings_version = version
        return self.info()

    async def update_view(self, view: FleetView) -> RouterAgentInfo:
        """Adopt `view` unless the agent holds a newer one; returns what the agent holds after."""
        self._ensure_sharing()
        if self.view is None or view.version > self.view.version:
            self.view, self.table = view, RoutingTable.from_view(view)
            self.bookings.expire(view, self.clock())
        return self.info()

    def pick(self, request: RoutingRequest) -> RoutingDecision:
        """Choose a replica, and book it. A decision without a replica says why."""
        self.decisions += 1
        if self.table is None:
            return RoutingDecision(request.request_id, -1, None, refusal=Refusal.FULL,
                                   reason="the router agent has no fleet view yet")
        now = self.clock()
        decision = self.router.pick(request, self.table, self.bookings, now)
        if decision.routed:
            self.bookings.book(decision.replica_id, request.prompt_tokens, now)
        return decision

    def receive_bookings(self, bookings: tuple[Booking, ...]) -> None:
        self.bookings.merge(bookings)

    async def set_peers(self, agent_ids: list[str]) -> None:
        from actors.router_client import RouterClient

        self._ensure_sharing()
        self.peers = [RouterClient.lookup(a, self.namespace) for a in agent_ids if a != self.agent_id]

    def info(self) -> RouterAgentInfo:
        return RouterAgentInfo(
            agent_id=self.agent_id,
            view_version=self.view.version if self.view else -1,
            replicas=len(self.view.replicas) if self.view else 0,
            outstanding_bookings=len(self.bookings),
            peers=len(self.peers),
            decisions=self.decisions,
            settings_version=self.settings_version,
        )

    def _ensure_sharing(self) -> None:
        if self._sharing is None or self._sharing.done():
            self._sharing = asyncio.get_running_loop().create_task(self._share_forever())

    async def _share_forever(self) -> None:
        while True:
            await asyncio.sleep(self.share_interval_s)
            outbox = self.bookings.drain_outbox()
            if outbox:
                for peer in self.peers:
                    peer.send_bookings(outbox)
