"""Router agents in virtual time: the live agents' policy calls, without Ray.

`SimRouterAgent` does what `actors.router.RouterAgent` does per call: adopt a newer
view (a `RoutingTable` of it, then expire the bookings it covers), pick with the pure
`policies.routing.Router`, book the pick. `RouterPool` is the agents together plus
what `orchestrator.dispatcher.Dispatcher` does in front of them: ask the next agent in
turn. Agents swap fresh bookings every `share_interval_s`, as the live ones do.
One `RoutingTable` per view serves every agent (live, each builds the same one).
"""

from __future__ import annotations

from bench.simulator.events import EventLoop, Priority
from policies.bookings import Bookings
from policies.fleet_view import FleetView, RoutingRequest
from policies.routing import Refusal, Router, RoutingDecision, RoutingTable


class SimRouterAgent:
    def __init__(self, agent_id: str, router: Router, booking_ttl_s: float):
        self.agent_id = agent_id
        self.router = router
        self.bookings = Bookings(agent_id, ttl_s=booking_ttl_s)
        self.view: FleetView | None = None
        self.table: RoutingTable | None = None
        self.decisions = 0

    def update_view(self, view: FleetView, table: RoutingTable, now: float) -> None:
        if self.view is None or view.version > self.view.version:
            self.view, self.table = view, table
            self.bookings.expire(view, now)

    def pick(self, request: RoutingRequest, now: float) -> RoutingDecision:
        self.decisions += 1
        if self.table is None:
            return RoutingDecision(request.request_id, -1, None, refusal=Refusal.FULL,
                                   reason="the router agent has no fleet view yet")
        decision = self.router.pick(request, self.table, self.bookings, now)
        if decision.routed:
            self.bookings.book(decision.replica_id, request.prompt_tokens, now)
        return decision


class RouterPool:
    """`agents` router agents sharing one `Router` policy, asked in turn."""

    def __init__(self, loop: EventLoop, router: Router, agents: int, share_interval_s: float,
                 booking_ttl_s: float):
        if agents < 1:
            raise ValueError(f"need at least one router agent, got {agents}")
        self.loop = loop
        self.agents = [SimRouterAgent(f"router-{i}", router, booking_ttl_s) for i in range(agents)]
        self.share_interval_s = share_interval_s
        self._turn = 0
        self._sharing = False

    def publish(self, view: FleetView) -> None:
        """The controller pushes a new view to every agent."""
        table = RoutingTable.from_view(view)
        for agent in self.agents:
            agent.update_view(view, table, self.loop.now)
        if not self._sharing and len(self.agents) > 1:
            self._sharing = True
            self.loop.after(self.share_interval_s, self._share, Priority.CONTROL)

    def pick(self, request: RoutingRequest) -> RoutingDecision:
        agent = self.agents[self._turn]
        self._turn = (self._turn + 1) % len(self.agents)
        return agent.pick(request, self.loop.now)

    def stop_sharing(self) -> None:
        self._sharing = False

    def _share(self) -> None:
        if not self._sharing:
            return
        outboxes = [(agent, agent.bookings.drain_outbox()) for agent in self.agents]
        for agent, outbox in outboxes:
            if outbox:
                for peer in self.agents:
                    if peer is not agent:
                        peer.bookings.merge(outbox)
        self.loop.after(self.share_interval_s, self._share, Priority.CONTROL)
