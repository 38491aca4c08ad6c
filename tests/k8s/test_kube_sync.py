"""Cordons and pool sizes mirrored onto Kubernetes, through the fake and the real client."""

from __future__ import annotations

import pytest

from orchestrator.fleet_state import FleetState, NodeObservation, NodeRecord
from orchestrator.kube import FakeKubernetes, KubernetesClient
from orchestrator.kube_sync import K8S_NODE_LABEL, KubernetesSync
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.test_kube import CLUSTER, NAMESPACE, NODES, RC


@pytest.fixture(params=["fake", "real"])
def kube(request):
    if request.param == "fake":
        return FakeKubernetes(NODES, [CLUSTER])
    return KubernetesClient(FakeApiServer(NODES, [CLUSTER], NAMESPACE).api_client(), NAMESPACE)


def state_with(*nodes: tuple[str, str | None]) -> FleetState:
    state = FleetState()
    for ray_id, k8s_name in nodes:
        labels = ((K8S_NODE_LABEL, k8s_name),) if k8s_name else ()
        state.nodes[ray_id] = NodeRecord(NodeObservation(ray_id, "10.0.0.1", True, (), labels=labels), 0.0)
    return state


async def test_a_flotilla_cordon_reaches_the_kubernetes_node_and_only_flotilla_undoes_its_own(kube):
    state = state_with(("ray-h100", "h100-a"), ("ray-cpu", "cpu-1"), ("ray-unlabelled", None))
    sync = KubernetesSync(kube, RC, state, desired=None)
    state.cordoned |= {"ray-h100", "ray-unlabelled"}
    await sync.update()
    assert kube.get_node("h100-a").cordoned and sync.cordoned == {"h100-a"}
    state.cordoned.clear()
    await sync.update()
    assert not kube.get_node("h100-a").cordoned
    assert kube.get_node("cpu-1").cordoned  # an administrator's cordon: not Flotilla's to lift
    await sync.update()
    assert sync.errors == 0


async def test_pool_sizes_become_worker_group_sizes_and_refusals_are_retried(kube):
    desired = {"h100": 3, "l4": 5}  # l4's group allows at most 2
    sync = KubernetesSync(kube, RC, state_with(), desired=lambda: desired)
    await sync.update()
    assert kube.get_worker_group(RC, "h100").replicas == 3 and sync.scaled == {"h100": 3}
    assert kube.get_worker_group(RC, "l4").replicas == 0 and sync.errors == 1
    desired["l4"] = 2
    await sync.update()
    assert kube.get_worker_group(RC, "l4").replicas == 2 and sync.scaled == {"h100": 3, "l4": 2}


def test_outside_a_pod_of_the_chart_there_is_nothing_to_mirror():
    assert KubernetesSync.from_environment(FleetState(), dict, environ={}) is None
