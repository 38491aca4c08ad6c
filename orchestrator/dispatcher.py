"""`Dispatcher`: from a routing request to a replica to call, for the ingress.

It asks the router agents in turn (failing over to the next when one does not
answer), retries while the fleet is full until the admission deadline, and caches a
client per replica. It never calls the controller, so the data path keeps serving
while the controller restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from actors.replica_client import ReplicaClient, ReplicaUnavailable
from actors.router_client import RouterClient, RouterUnavailable
from policies.fleet_view import RoutingRequest
from policies.routing import Refusal, RoutingDecision

log = logging.getLogger(__name__)

_RETRY_PAUSE_S = 0.05


class NoCapacity(RuntimeError):
    """Nothing could take the request before the deadline; `refusal` is None if no agent answered."""

    def __init__(self, reason: str, refusal: Refusal | None):
        super().__init__(reason)
        self.reason = reason
        self.refusal = refusal


class Dispatcher:
    def __init__(self, namespace: str, agent_ids: list[str], admission_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.namespace = namespace
        self.agent_ids = agent_ids
        self.admission_timeout_s = admission_timeout_s
        self.clock = clock
        self._agents: dict[str, RouterClient] = {}
        self._replicas: dict[str, ReplicaClient] = {}
        self._turn = itertools.cycle(range(len(agent_ids)))

    async def assign(self, request: RoutingRequest) -> tuple[ReplicaClient, RoutingDecision]:
        """A replica for `request`; raises NoCapacity after `admission_timeout_s`."""
        deadline = self.clock() + self.admission_timeout_s
        while True:
            decision = await self._decide(request)
            if decision is not None and decision.routed:
                try:
                    return self.replica(decision.replica_id), decision
                except ReplicaUnavailable:
                    request = _excluding(request, decision.replica_id)
                    continue
            if decision is not None and decision.refusal is Refusal.TOO_LONG:
                raise NoCapacity(decision.reason, decision.refusal)  # waiting cannot help
            if self.clock() >= deadline:
                if decision is None:
                    raise NoCapacity("no router agent answered", None)
                raise NoCapacity(decision.reason, decision.refusal)
            await asyncio.sleep(_RETRY_PAUSE_S)

    def replica(self, replica_id: str) -> ReplicaClient:
        client = self._replicas.get(replica_id)
        if client is None:
            client = self._replicas[replica_id] = ReplicaClient.lookup(replica_id, self.namespace)
        return client

    def forget_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    async def _decide(self, request: RoutingRequest) -> RoutingDecision | None:
        """Ask the next agent; on failure, each other agent once."""
        first = next(self._turn)
        for i in range(len(self.agent_ids)):
            agent_id = self.agent_ids[(first + i) % len(self.agent_ids)]
            try:
                return await self._agent(agent_id).pick(request)
            except RouterUnavailable as e:
                log.warning("%s; trying the next agent", e)
                self._agents.pop(agent_id, None)
        return None

    def _agent(self, agent_id: str) -> RouterClient:
        client = self._agents.get(agent_id)
        if client is None:
            client = self._agents[agent_id] = RouterClient.lookup(agent_id, self.namespace)
        return client


def _excluding(request: RoutingRequest, replica_id: str) -> RoutingRequest:
    return replace(request, exclude=request.exclude | {replica_id})
