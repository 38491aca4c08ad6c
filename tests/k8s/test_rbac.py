"""The chart's RBAC grants exactly what orchestrator/kube.py uses: the real client, run
through every method of the interface against a recording API server, makes exactly the
calls in PERMISSIONS, and the rendered Roles grant exactly PERMISSIONS."""

from __future__ import annotations

from orchestrator.kube import (
    NAMESPACE_ENV,
    NODE_NAME_ENV,
    PERMISSIONS,
    RAY_CLUSTER_ENV,
    KubernetesApi,
    KubernetesClient,
    Permission,
)
from tests.k8s.conftest import DEFAULTS, of_kind, one, render
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.test_kube import CLUSTER, NAMESPACE, NODES, RC


def exercise(kube: KubernetesApi) -> None:
    """One call of every interface method."""
    kube.list_nodes()
    kube.get_node("h100-a")
    kube.set_cordoned("h100-a", True)
    kube.get_worker_group(RC, "h100")
    kube.scale_worker_group(RC, "h100", 2)


def test_the_interface_uses_exactly_the_declared_permissions():
    interface = {name for name in vars(KubernetesApi) if not name.startswith("_")}
    assert interface == {"list_nodes", "get_node", "set_cordoned", "get_worker_group", "scale_worker_group"}, (
        "the interface changed: exercise() must call every method")
    server = FakeApiServer(NODES, [CLUSTER], NAMESPACE)
    exercise(KubernetesClient(server.api_client(), NAMESPACE))
    assert set(server.calls) == PERMISSIONS


def granted(objects: list[dict], kind: str) -> set[Permission]:
    return {Permission(group, resource, verb, cluster_scoped=kind == "ClusterRole")
            for role in of_kind(objects, kind) for rule in role["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_chart_grants_exactly_the_declared_permissions():
    objects = render(DEFAULTS)
    assert granted(objects, "ClusterRole") | granted(objects, "Role") == PERMISSIONS
    assert not any("*" in str(rule) for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role")
                   for rule in role["rules"])


def test_the_roles_are_bound_to_the_head_pods_account_only():
    objects = render(DEFAULTS)
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "llm"}]
        role = one(objects, binding["roleRef"]["kind"])
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == account
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False


def test_rbac_can_be_left_to_the_operator():
    objects = render(DEFAULTS, "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                     "--set", "serviceAccount.name=platform-sa")
    assert not {"ServiceAccount", "ClusterRole", "Role"} & {o["kind"] for o in objects}
    head = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "platform-sa"


def test_every_ray_pod_is_told_its_cluster_namespace_and_node():
    cluster = one(render(DEFAULTS), "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    wanted = {RAY_CLUSTER_ENV: "metadata.labels['ray.io/cluster']", NAMESPACE_ENV: "metadata.namespace",
              NODE_NAME_ENV: "spec.nodeName"}
    for pod in pods:
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in pod["spec"]["containers"][0]["env"]}
        assert env.items() >= wanted.items()
