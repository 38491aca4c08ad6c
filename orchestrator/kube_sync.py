"""What the fleet decides, mirrored onto Kubernetes (when it runs under the chart).

Two intents have a Kubernetes side. A Ray node the operator cordons in Flotilla gets its
Kubernetes node cordoned too, so Kubernetes schedules no new pod there either; uncordoning
undoes only what Flotilla did (a node an administrator cordoned by hand stays cordoned).
And with Ray's autoscaler off (the chart sets `FLOTILLA_SCALE_WORKER_GROUPS`), a pool's
desired replica count becomes its worker group's pod count (one pod per replica, the
group named after the pool).

A reconcile step like the controller's other managers: it compares the intent with what
it last applied and calls the API (`orchestrator.kube.KubernetesApi`, blocking, so in a
thread) only for differences; a failed call is logged and retried next tick. A Ray node
knows its Kubernetes node through the `flotilla.io/k8s-node` Ray label, which the chart
sets from the downward API.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from orchestrator.fleet_state import FleetState
from orchestrator.kube import NODE_NAME_ENV, RAY_CLUSTER_ENV, KubeError, KubernetesApi, KubernetesClient

log = logging.getLogger(__name__)

K8S_NODE_LABEL = "flotilla.io/k8s-node"  # Ray node label: the Kubernetes node the Ray pod runs on
SCALE_ENV = "FLOTILLA_SCALE_WORKER_GROUPS"


class KubernetesSync:
    """Keeps Kubernetes node cordons and worker-group sizes in step with the fleet's intent."""

    def __init__(self, api: KubernetesApi, cluster: str, state: FleetState,
                 desired: Callable[[], Mapping[str, int]] | None):
        self.api, self.cluster, self.state = api, cluster, state
        self.desired = desired  # pool -> replicas; None: Ray's autoscaler sizes the groups
        self.cordoned: set[str] = set()  # Kubernetes nodes Flotilla cordoned
        self.scaled: dict[str, int] = {}  # worker group -> pods last set
        self.errors = 0

    @classmethod
    def from_environment(cls, state: FleetState, desired: Callable[[], Mapping[str, int]],
                         environ: Mapping[str, str] = os.environ) -> KubernetesSync | None:
        """In a pod of the chart (its downward-API variables set): a sync over the in-cluster
        API; elsewhere None (nothing to mirror)."""
        cluster = environ.get(RAY_CLUSTER_ENV)
        if not cluster or not environ.get(NODE_NAME_ENV):
            return None
        try:
            api = KubernetesClient.in_cluster()
        except Exception as e:  # noqa: BLE001 — no service account: run without, say so once
            log.warning("in a Kubernetes pod but without API access (%s): cordons stay in Ray", e)
            return None
        scale = environ.get(SCALE_ENV, "").lower() in ("1", "true", "yes")
        return cls(api, cluster, state, desired if scale else None)

    def k8s_node_of(self, ray_node_id: str) -> str | None:
        record = self.state.nodes.get(ray_node_id)
        return dict(record.observed.labels).get(K8S_NODE_LABEL) if record is not None else None

    async def update(self) -> None:
        """One tick: apply the differences between the intent and what was last applied."""
        wanted = {name for node_id in self.state.cordoned if (name := self.k8s_node_of(node_id))}
        for name in sorted(wanted - self.cordoned):
            if await self._call(f"cordon node {name}", self.api.set_cordoned, name, True):
                self.cordoned.add(name)
        for name in sorted(self.cordoned - wanted):
            if await self._call(f"uncordon node {name}", self.api.set_cordoned, name, False):
                self.cordoned.discard(name)
        if self.desired is None:
            return
        for pool, replicas in sorted(self.desired().items()):
            if self.scaled.get(pool) != replicas and await self._call(
                    f"scale worker group {pool} to {replicas}", self.api.scale_worker_group,
                    self.cluster, pool, replicas):
                self.scaled[pool] = replicas

    async def _call(self, what: str, fn, *args) -> bool:
        try:
            await asyncio.to_thread(fn, *args)
        except (KubeError, ValueError) as e:
            self.errors += 1
            log.warning("kubernetes: %s failed: %s", what, e)
            return False
        log.info("kubernetes: %s", what)
        return True
