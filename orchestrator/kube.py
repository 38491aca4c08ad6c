"""Flotilla acting on Kubernetes itself, behind one small interface.

Three things need the Kubernetes API: reading a node's GPU labels (which GPU type it
carries), cordoning a node the operator cordons in Flotilla (so Kubernetes schedules no
new pod there either), and scaling a pool's worker group of the RayCluster when Ray's
autoscaler is off. `KubernetesApi` is that interface; `KubernetesClient` implements it
with the official `kubernetes` client and the chart's service account; `FakeKubernetes`
implements it in memory for tests. `PERMISSIONS` lists every (API group, resource, verb)
the real client uses, and the chart's RBAC grants exactly those (tests/k8s checks both).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from policies.gpu_catalog import GPU_CATALOG

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
GPU_RESOURCE = "nvidia.com/gpu"
# The in-cluster service account's namespace, as Kubernetes mounts it.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# What the chart tells every Ray pod through the downward API (helm/flotilla, "flotilla.env").
RAY_CLUSTER_ENV, NAMESPACE_ENV, NODE_NAME_ENV = "FLOTILLA_RAY_CLUSTER", "FLOTILLA_NAMESPACE", "FLOTILLA_NODE_NAME"


@dataclass(frozen=True)
class Permission:
    """One RBAC grant: `verb` on `resource` of `api_group` ("" is the core group)."""

    api_group: str
    resource: str
    verb: str
    cluster_scoped: bool  # nodes are; rayclusters live in the release's namespace


PERMISSIONS: frozenset[Permission] = frozenset({
    Permission("", "nodes", "get", cluster_scoped=True),
    Permission("", "nodes", "list", cluster_scoped=True),
    Permission("", "nodes", "patch", cluster_scoped=True),
    Permission(RAY_GROUP, "rayclusters", "get", cluster_scoped=False),
    Permission(RAY_GROUP, "rayclusters", "patch", cluster_scoped=False),
})


@dataclass(frozen=True)
class KubeNode:
    """What Flotilla reads of a Kubernetes node."""

    name: str
    gpu_type: str | None  # a policies.gpu_catalog name, from the node's labels; None: unknown
    gpus: int  # allocatable nvidia.com/gpu
    cordoned: bool  # spec.unschedulable
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerGroup:
    """A RayCluster worker group's size, in pods."""

    cluster: str
    name: str
    replicas: int
    min_replicas: int
    max_replicas: int


class KubeError(RuntimeError):
    """The Kubernetes API refused or failed a call; the message says which and why."""


class NotFound(KubeError):
    """No such node, RayCluster or worker group."""


class KubernetesApi(Protocol):
    def list_nodes(self) -> list[KubeNode]:
        """Every node of the cluster, sorted by name."""

    def get_node(self, name: str) -> KubeNode:
        """One node; NotFound if absent."""

    def set_cordoned(self, name: str, cordoned: bool) -> KubeNode:
        """Cordon (no new pods) or uncordon a node; returns it as it now is."""

    def get_worker_group(self, cluster: str, group: str) -> WorkerGroup:
        """A worker group of a RayCluster in this namespace; NotFound if absent."""

    def scale_worker_group(self, cluster: str, group: str, replicas: int) -> WorkerGroup:
        """Set a worker group's pod count, within its [min, max]; ValueError outside it."""


def current_ray_cluster() -> str:
    """The RayCluster this pod belongs to: the chart sets it from the pod's `ray.io/cluster` label."""
    name = os.environ.get(RAY_CLUSTER_ENV)
    if not name:
        raise KubeError(f"{RAY_CLUSTER_ENV} is not set: this process is not in a pod of the Flotilla chart")
    return name


# GPU type from node labels -------------------------------------------------------------

# Labels that name a node's GPU, most specific first: NVIDIA GPU feature discovery, Ray,
# GKE, EKS, and Flotilla's own label for nodes none of these describe.
GPU_LABELS = ("flotilla.io/gpu-type", "nvidia.com/gpu.product", "ray.io/accelerator-type",
              "cloud.google.com/gke-accelerator", "k8s.amazonaws.com/accelerator")
_GPU_PATTERNS = (  # (catalog name, pattern over the upper-cased label value), first match wins
    ("H200", r"H200"),
    ("H100", r"H100"),
    ("A100-80GB", r"A100.*80G"),
    ("A100-40GB", r"A100"),
    ("A10G", r"A10G"),
    ("A40", r"(^|[^0-9A-Z])A40([^0-9A-Z]|$)"),
    ("L4", r"(^|[^0-9A-Z])L4([^0-9A-Z]|$)"),
)


def gpu_type_from_labels(labels: Mapping[str, str]) -> str | None:
    """The GPU catalog name a node's labels describe, or None (no GPU label, or a GPU
    Flotilla has no model of). An A100 label without a memory size is the 40 GB part."""
    for key in GPU_LABELS:
        value = labels.get(key, "").upper()
        if not value:
            continue
        if value in GPU_CATALOG:
            return value
        for name, pattern in _GPU_PATTERNS:
            if re.search(pattern, value):
                return name
    return None


def node_from_object(obj: Mapping[str, Any]) -> KubeNode:
    """A KubeNode from a Node object as JSON (the API's shape)."""
    labels = dict(obj.get("metadata", {}).get("labels") or {})
    allocatable = (obj.get("status") or {}).get("allocatable") or {}
    return KubeNode(
        name=obj["metadata"]["name"],
        gpu_type=gpu_type_from_labels(labels),
        gpus=int(allocatable.get(GPU_RESOURCE, 0)),
        cordoned=bool((obj.get("spec") or {}).get("unschedulable", False)),
        labels=labels,
    )


def _worker_group(cluster: str, obj: Mapping[str, Any], group: str) -> tuple[int, WorkerGroup]:
    specs = obj.get("spec", {}).get("workerGroupSpecs") or []
    for i, spec in enumerate(specs):
        if spec.get("groupName") == group:
            return i, WorkerGroup(cluster, group, int(spec.get("replicas", 0)), int(spec.get("minReplicas", 0)),
                                  int(spec.get("maxReplicas", 2**31 - 1)))
    known = ", ".join(s.get("groupName", "?") for s in specs) or "none"
    raise NotFound(f"RayCluster {cluster!r} has no worker group {group!r} (groups: {known})")


def _check_bounds(group: WorkerGroup, replicas: int) -> None:
    if not group.min_replicas <= replicas <= group.max_replicas:
        raise ValueError(f"worker group {group.name!r}: replicas must be within "
                         f"[{group.min_replicas}, {group.max_replicas}], got {replicas}")


# The real thing ------------------------------------------------------------------------


class KubernetesClient:
    """`KubernetesApi` over the official client. Uses exactly `PERMISSIONS`; every call
    gives up after `timeout_s` seconds, so a control loop never hangs on the API server."""

    def __init__(self, api_client: client.ApiClient, namespace: str, timeout_s: float = 10.0):
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._api_client = api_client

    @classmethod
    def in_cluster(cls) -> KubernetesClient:
        """From inside a pod: its service account's token and namespace."""
        config.load_incluster_config()
        namespace = os.environ.get(NAMESPACE_ENV) or open(SERVICE_ACCOUNT_NAMESPACE).read().strip()
        return cls(client.ApiClient(), namespace)

    def list_nodes(self) -> list[KubeNode]:
        nodes = self._call("list nodes", self._core.list_node)
        return sorted((node_from_object(self._json(n)) for n in nodes.items), key=lambda n: n.name)

    def get_node(self, name: str) -> KubeNode:
        return node_from_object(self._json(self._call(f"get node {name!r}", self._core.read_node, name)))

    def set_cordoned(self, name: str, cordoned: bool) -> KubeNode:
        # a JSON merge patch: null removes the field, as `kubectl uncordon` leaves it
        body = {"spec": {"unschedulable": True if cordoned else None}}
        node = self._call(f"cordon node {name!r}", self._core.patch_node, name, body,
                          _content_type="application/merge-patch+json")
        return node_from_object(self._json(node))

    def get_worker_group(self, cluster: str, group: str) -> WorkerGroup:
        return _worker_group(cluster, self._get_cluster(cluster), group)[1]

    def scale_worker_group(self, cluster: str, group: str, replicas: int) -> WorkerGroup:
        index, current = _worker_group(cluster, self._get_cluster(cluster), group)
        _check_bounds(current, replicas)
        # the `test` op makes the patch fail, not hit another group, if the list moved meanwhile
        patch = [{"op": "test", "path": f"/spec/workerGroupSpecs/{index}/groupName", "value": group},
                 {"op": "replace", "path": f"/spec/workerGroupSpecs/{index}/replicas", "value": replicas}]
        obj = self._call(f"scale {cluster}/{group}", self._custom.patch_namespaced_custom_object, RAY_GROUP,
                         RAY_VERSION, self.namespace, "rayclusters", cluster, patch,
                         _content_type="application/json-patch+json")
        return _worker_group(cluster, obj, group)[1]

    def _get_cluster(self, cluster: str) -> dict[str, Any]:
        return self._call(f"get RayCluster {cluster!r}", self._custom.get_namespaced_custom_object, RAY_GROUP,
                          RAY_VERSION, self.namespace, "rayclusters", cluster)

    def _json(self, obj: Any) -> dict[str, Any]:
        return self._api_client.sanitize_for_serialization(obj)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, _request_timeout=self.timeout_s, **kwargs)
        except ApiException as e:
            error = NotFound if e.status == 404 else KubeError
            raise error(f"{what}: HTTP {e.status} {e.reason}: {_status_message(e.body)}") from None


def _status_message(body: Any) -> str:
    """The message of the API server's Status object, or the raw body."""
    try:
        return str(json.loads(body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(body or "").strip()[:300]


# The fake ------------------------------------------------------------------------------


class FakeKubernetes:
    """`KubernetesApi` in memory: nodes and RayClusters as the API's JSON, nothing else."""

    def __init__(self, nodes: list[Mapping[str, Any]] = (), clusters: list[Mapping[str, Any]] = ()):
        self.nodes = {n["metadata"]["name"]: copy.deepcopy(dict(n)) for n in nodes}
        self.clusters = {c["metadata"]["name"]: copy.deepcopy(dict(c)) for c in clusters}

    def list_nodes(self) -> list[KubeNode]:
        return [node_from_object(self.nodes[name]) for name in sorted(self.nodes)]

    def get_node(self, name: str) -> KubeNode:
        return node_from_object(self._node(name))

    def set_cordoned(self, name: str, cordoned: bool) -> KubeNode:
        spec = self._node(name).setdefault("spec", {})
        if cordoned:
            spec["unschedulable"] = True
        else:
            spec.pop("unschedulable", None)
        return self.get_node(name)

    def get_worker_group(self, cluster: str, group: str) -> WorkerGroup:
        return _worker_group(cluster, self._cluster(cluster), group)[1]

    def scale_worker_group(self, cluster: str, group: str, replicas: int) -> WorkerGroup:
        obj = self._cluster(cluster)
        index, current = _worker_group(cluster, obj, group)
        _check_bounds(current, replicas)
        obj["spec"]["workerGroupSpecs"][index]["replicas"] = replicas
        return self.get_worker_group(cluster, group)

    def _node(self, name: str) -> dict[str, Any]:
        if name not in self.nodes:
            raise NotFound(f"get node {name!r}: HTTP 404 Not Found")
        return self.nodes[name]

    def _cluster(self, name: str) -> dict[str, Any]:
        if name not in self.clusters:
            raise NotFound(f"get RayCluster {name!r}: HTTP 404 Not Found")
        return self.clusters[name]
