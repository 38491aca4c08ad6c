"""The chart renders the fleet it was given: serveConfigV2's args load back into the same
FleetConfig, each pool becomes its worker group, and every selector finds its pods."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from orchestrator.config import FleetConfig, parse_config
from tests.k8s.conftest import DEFAULTS, VALUES_SETS, of_kind, one, render, render_error, values_of
from tests.k8s.schemas import kuberay_errors


def serve_config(objects) -> dict:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


def expected_fleet(values: str) -> FleetConfig:
    given = values_of(values)
    fleet = parse_config(given["fleet"])
    if given["adminTokens"]["enabled"]:  # the one thing the chart adds: where it mounts the tokens
        admin = fleet.admin.model_copy(update={"tokens_dir": given["adminTokens"]["mountPath"]})
        fleet = fleet.model_copy(update={"admin": admin})
    return fleet


def cluster(objects) -> dict:
    return one(objects, "RayService")["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("values", VALUES_SETS)
def test_serve_config_args_load_back_into_the_same_fleet(values):
    config = serve_config(render(values))
    [app] = config["applications"]
    assert app["import_path"] == "orchestrator.app:build_app"
    assert parse_config(app["args"]).model_dump() == expected_fleet(values).model_dump()
    assert config["http_options"] == {"host": "0.0.0.0", "port": expected_fleet(values).server.port}


@pytest.mark.parametrize("values", VALUES_SETS)
def test_each_pool_is_a_worker_group_on_its_gpus(values):
    fleet = expected_fleet(values)
    groups = {g["groupName"]: g for g in cluster(render(values))["workerGroupSpecs"]}
    assert list(groups) == [p.name for p in fleet.pools]
    for pool in fleet.pools:
        group = groups[pool.name]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            pool.replicas, pool.min_replicas, pool.max_replicas)
        pod = group["template"]["spec"]
        assert pod.get("nodeSelector", {}) == pool.node_selector
        assert pod.get("tolerations", []) == pool.tolerations
        resources = pod["containers"][0]["resources"]
        for kind in ("requests", "limits"):
            assert resources[kind].get("nvidia.com/gpu", 0) == pool.gpus_per_replica
        if pool.gpus_per_replica:
            assert ray_start_resources(group) == {f"accelerator_type:{pool.gpu_type}": 1}


def ray_start_resources(group: dict) -> dict:
    """The --resources KubeRay passes to `ray start`, read as the pod's shell and Ray read it."""
    [arg] = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(arg.removeprefix("--resources="))


def test_a_pool_left_to_config_defaults_gets_the_same_defaults():
    pool = {"name": "p", "gpu_type": "H100", "model": "llama-3-8b"}
    objects = render(DEFAULTS, "--set-json", f"fleet.pools=[{json.dumps(pool)}]")
    [group] = cluster(objects)["workerGroupSpecs"]
    defaults = parse_config({**values_of(DEFAULTS)["fleet"], "pools": [pool]}).pools[0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
        defaults.replicas, defaults.min_replicas, defaults.max_replicas)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == (
        defaults.gpus_per_replica)


def test_a_cpu_pool_asks_for_no_gpu():
    pool = {"name": "cpu", "gpu_type": "CPU", "model": "llama-3-8b", "gpus_per_replica": 0, "engine": "vllm"}
    objects = render(DEFAULTS, "--set-json", f"fleet.pools=[{json.dumps(pool)}]")
    [group] = cluster(objects)["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    # no GPU and no accelerator resource; only the label naming its Kubernetes node
    assert "nvidia.com/gpu" not in resources["requests"]
    assert group["rayStartParams"] == {"labels": "flotilla.io/k8s-node=$(FLOTILLA_NODE_NAME)"}
    assert not kuberay_errors(one(objects, "RayService"))


@pytest.mark.parametrize("values", VALUES_SETS)
def test_ports_and_selectors_meet(values):
    objects, fleet = render(values), expected_fleet(values)
    spec = one(objects, "RayService")["spec"]
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == fleet.server.port == spec["serveService"]["spec"]["ports"][0]["targetPort"]
    assert ports["fleet-metrics"] == fleet.controller.metrics_port
    pods = [head] + [g["template"] for g in spec["rayClusterConfig"]["workerGroupSpecs"]]
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], pods), pdb["metadata"]["name"]
    for monitor in of_kind(objects, "PodMonitor"):
        assert selects(monitor["spec"]["selector"]["matchLabels"], [head])
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports)
    for ingress in of_kind(objects, "Ingress"):
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": spec["serveService"]["metadata"]["name"], "port": {"name": "serve"}}


def selects(labels: dict, pods: list[dict]) -> bool:
    return any(labels.items() <= p["metadata"]["labels"].items() for p in pods)


def test_service_monitor_reaches_the_head_through_its_service():
    objects = render(DEFAULTS, "--set", "monitoring.serviceMonitor.enabled=true")
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    head = cluster(objects)["headGroupSpec"]["template"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], [service])
    assert selects(service["spec"]["selector"], [head])
    assert service["spec"]["ports"][0]["targetPort"] == monitor["spec"]["endpoints"][0]["port"] == "fleet-metrics"


def test_admin_tokens_are_generated_or_taken_from_an_existing_secret():
    objects = render(DEFAULTS)
    secret = one(objects, "Secret")
    assert set(secret["data"]) == {"viewer", "operator"}
    volumes = cluster(objects)["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "admin-tokens", "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o444}} in (
        volumes)
    gcs_ft = render("gcs-ft.yaml")
    assert not of_kind(gcs_ft, "Secret")
    worker = cluster(gcs_ft)["workerGroupSpecs"][0]["template"]["spec"]
    assert any(v.get("secret", {}).get("secretName") == "flotilla-admin" for v in worker["volumes"])


def test_gcs_fault_tolerance_uses_the_external_redis():
    options = cluster(render("gcs-ft.yaml"))["gcsFaultToleranceOptions"]
    assert options == {
        "redisAddress": "redis-master.redis.svc.cluster.local:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-password", "key": "password"}}},
        "externalStorageNamespace": "flotilla-prod",
    }
    assert "gcsFaultToleranceOptions" not in cluster(render(DEFAULTS))


def test_autoscaler_off_leaves_scaling_to_flotilla():
    spec = cluster(render("gcs-ft.yaml"))
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    assert cluster(render(DEFAULTS))["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize(("flags", "message"), [
    (("--set", "workers.pools.h10.resources.requests.cpu=1"), "workers.pools.h10: no pool of that name"),
    (("--set", "gcsFaultTolerance.enabled=true"), "gcsFaultTolerance.redisAddress is required"),
    (("--set", "fleet.controller.metrics_port=0", "--set", "monitoring.podMonitor.enabled=true"),
     "fleet.controller.metrics_port is 0"),
    (("--set", "fleet.admin.tokens_dir=/elsewhere"), "fleet.admin.tokens_dir (/elsewhere) differs"),
    (("--set", "fleet.routing.weights.bogus=1"), "invalid propertyName 'bogus'"),
    (("--set", "fleet.server.prot=80"), "additional properties 'prot' not allowed"),
    (("--set-json", 'fleet.pools=[{"name": "x", "gpu_type": "K80", "model": "llama-3-8b"}]'),
     "/fleet/pools/0/gpu_type"),
])
def test_bad_values_are_refused_with_the_field_named(flags, message):
    assert message in render_error(DEFAULTS, *flags)


def test_ray_token_auth_is_left_to_kuberay():
    assert cluster(render(DEFAULTS))["authOptions"] == {"mode": "token"}
    assert cluster(render(DEFAULTS, "--set", "rayAuth.mode=disabled"))["authOptions"] == {"mode": "disabled"}
    assert "at '/rayAuth/mode': value must be one of 'token', 'disabled'" in render_error(
        DEFAULTS, "--set", "rayAuth.mode=open")
