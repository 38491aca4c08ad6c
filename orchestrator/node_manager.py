"""Tracks the cluster's nodes: which are alive, their GPU type, which the operator cordoned.

A dead node is Ray's news before it is ours: each tick merges Ray's node table, and
the replicas on a node that died are declared dead at once (their calls would only
time out). Cordoning a node keeps new replicas off it; with `drain`, its replicas are
drained too, and their pools replace them elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from orchestrator.errors import Conflict, NotFound
from orchestrator.fleet_state import FleetState, NodeObservation, NodeRecord
from orchestrator.replica_manager import ReplicaManager
from policies.fleet_view import ReplicaState

log = logging.getLogger(__name__)

NodeSource = Callable[[], list[NodeObservation]]


def ray_node_source() -> list[NodeObservation]:
    import ray

    return [
        NodeObservation(
            node_id=n["NodeID"],
            address=n["NodeManagerAddress"],
            alive=n["Alive"],
            resources=tuple(sorted((k, float(v)) for k, v in n["Resources"].items() if not k.startswith("node:"))),
            is_head="node:__internal_head__" in n["Resources"],
            labels=tuple(sorted((n.get("Labels") or {}).items())),
        )
        for n in ray.nodes()
    ]


class NodeManager:
    def __init__(self, state: FleetState, replicas: ReplicaManager, source: NodeSource,
                 clock: Callable[[], float]):
        self.state = state
        self.replicas = replicas
        self.source = source
        self.clock = clock

    async def update(self) -> None:
        now = self.clock()
        for node_id in self.state.observe_nodes(self.source(), now):
            log.warning("node %s died", node_id)
            victims = [r for r in self.state.live() if r.node_id == node_id]
            affected = tuple(q.request_id for r in victims if r.stats for q in r.stats.requests)
            if self.replicas.faults is not None:
                self.replicas.faults.report("node", node_id, "died", f"{len(victims)} replicas on it", affected)
            for record in victims:
                self.replicas.declare_dead(record, now, f"node {node_id} died", cause="node_died")

    def cordon(self, node_id: str, drain: bool) -> NodeRecord:
        """Idempotent: cordoning a cordoned node changes nothing (and drains nothing twice)."""
        node = self._node(node_id)
        if not node.alive:
            raise Conflict(f"node {node_id} is dead", code="node_dead")
        self.state.cordoned.add(node_id)
        if drain:
            for record in [r for r in self.state.live() if r.node_id == node_id]:
                if record.state in (ReplicaState.READY, ReplicaState.UNHEALTHY):
                    record.mark_draining()
        return node

    def uncordon(self, node_id: str) -> NodeRecord:
        node = self._node(node_id)
        self.state.cordoned.discard(node_id)
        return node

    def _node(self, node_id: str) -> NodeRecord:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}")
        return node
