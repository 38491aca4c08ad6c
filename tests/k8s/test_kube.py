"""The Kubernetes interface: the same behaviour from the in-memory fake and from the real
client (the official `kubernetes` client speaking REST to an in-memory API server)."""

from __future__ import annotations

import pytest

from orchestrator.kube import (
    RAY_CLUSTER_ENV,
    FakeKubernetes,
    KubeError,
    KubernetesClient,
    NotFound,
    current_ray_cluster,
    gpu_type_from_labels,
)
from tests.k8s.fake_apiserver import FakeApiServer

NAMESPACE = "llm"


def node(name: str, labels: dict[str, str], gpus: int = 0, cordoned: bool = False) -> dict:
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
           "spec": {"unschedulable": True} if cordoned else {},
           "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": str(gpus)}}}
    return obj


NODES = [
    node("gke-l4-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, gpus=1),
    node("h100-a", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}, gpus=8),
    node("cpu-1", {"kubernetes.io/os": "linux"}, cordoned=True),
]
CLUSTER = {
    "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "flotilla-raycluster-x7k2p"},
    "spec": {"workerGroupSpecs": [
        {"groupName": "h100", "replicas": 1, "minReplicas": 1, "maxReplicas": 4, "template": {}},
        {"groupName": "l4", "replicas": 0, "minReplicas": 0, "maxReplicas": 2, "template": {}},
    ]},
}
RC = CLUSTER["metadata"]["name"]


@pytest.fixture(params=["fake", "real"])
def kube(request):
    if request.param == "fake":
        return FakeKubernetes(NODES, [CLUSTER])
    return KubernetesClient(FakeApiServer(NODES, [CLUSTER], NAMESPACE).api_client(), NAMESPACE)


def test_nodes_carry_their_gpu_type_and_count(kube):
    nodes = kube.list_nodes()
    assert [(n.name, n.gpu_type, n.gpus, n.cordoned) for n in nodes] == [
        ("cpu-1", None, 0, True), ("gke-l4-1", "L4", 1, False), ("h100-a", "H100", 8, False)]
    assert kube.get_node("h100-a").labels["nvidia.com/gpu.count"] == "8"


def test_cordon_and_uncordon(kube):
    assert kube.set_cordoned("h100-a", True).cordoned
    assert kube.get_node("h100-a").cordoned
    assert not kube.set_cordoned("h100-a", False).cordoned
    assert not kube.get_node("h100-a").cordoned


def test_missing_node_is_not_found(kube):
    with pytest.raises(NotFound, match="'gone'"):
        kube.get_node("gone")
    with pytest.raises(NotFound):
        kube.set_cordoned("gone", True)


def test_scale_a_worker_group_within_its_bounds(kube):
    group = kube.get_worker_group(RC, "l4")
    assert (group.replicas, group.min_replicas, group.max_replicas) == (0, 0, 2)
    assert kube.scale_worker_group(RC, "l4", 2).replicas == 2
    assert kube.get_worker_group(RC, "l4").replicas == 2
    assert kube.get_worker_group(RC, "h100").replicas == 1  # the other group is untouched


def test_scaling_outside_the_bounds_is_refused(kube):
    with pytest.raises(ValueError, match=r"within \[1, 4\], got 5"):
        kube.scale_worker_group(RC, "h100", 5)
    with pytest.raises(ValueError, match=r"within \[1, 4\], got 0"):
        kube.scale_worker_group(RC, "h100", 0)
    assert kube.get_worker_group(RC, "h100").replicas == 1


def test_unknown_group_or_cluster_is_not_found(kube):
    with pytest.raises(NotFound, match="no worker group 'a100' .groups: h100, l4"):
        kube.scale_worker_group(RC, "a100", 1)
    with pytest.raises(NotFound, match="'other'"):
        kube.get_worker_group("other", "h100")


def test_a_group_list_that_moved_meanwhile_fails_the_patch_instead_of_scaling_another_group():
    server = FakeApiServer(NODES, [CLUSTER], NAMESPACE)
    kube = KubernetesClient(server.api_client(), NAMESPACE)
    server.before_patch = lambda cluster: cluster["spec"]["workerGroupSpecs"].reverse()
    with pytest.raises(KubeError, match="HTTP 422"):
        kube.scale_worker_group(RC, "h100", 3)
    groups = {g["groupName"]: g["replicas"] for g in server.clusters[RC]["spec"]["workerGroupSpecs"]}
    assert groups == {"h100": 1, "l4": 0}


@pytest.mark.parametrize(("labels", "gpu_type"), [
    ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "H100"),
    ({"nvidia.com/gpu.product": "NVIDIA-H200"}, "H200"),
    ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, "A100-80GB"),
    ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, "A100-40GB"),
    ({"nvidia.com/gpu.product": "NVIDIA-A10G"}, "A10G"),
    ({"nvidia.com/gpu.product": "NVIDIA-A40"}, "A40"),
    ({"nvidia.com/gpu.product": "NVIDIA-L4"}, "L4"),
    ({"nvidia.com/gpu.product": "NVIDIA-L40S"}, None),  # not in the catalog: not mistaken for an L4
    ({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, "A100-40GB"),
    ({"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}, "A100-80GB"),
    ({"cloud.google.com/gke-accelerator": "nvidia-h100-mega-80gb"}, "H100"),
    ({"k8s.amazonaws.com/accelerator": "nvidia-tesla-a10g"}, "A10G"),
    ({"ray.io/accelerator-type": "A100-80G"}, "A100-80GB"),
    ({"flotilla.io/gpu-type": "L4", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "L4"),  # ours first
    ({"kubernetes.io/os": "linux"}, None),
])
def test_gpu_type_from_labels(labels, gpu_type):
    assert gpu_type_from_labels(labels) == gpu_type


def test_the_pod_knows_its_ray_cluster(monkeypatch):
    monkeypatch.setenv(RAY_CLUSTER_ENV, RC)
    assert current_ray_cluster() == RC
    monkeypatch.delenv(RAY_CLUSTER_ENV)
    with pytest.raises(KubeError, match="FLOTILLA_RAY_CLUSTER is not set"):
        current_ray_cluster()
