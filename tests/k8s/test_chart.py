"""helm lint and helm template for every values set, and every rendered object against
its schema: Kubernetes' own, KubeRay's CRD, the Prometheus Operator's."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator import schema_gen
from tests.k8s.conftest import CHART, DEFAULTS, EXAMPLES, VALUES_SETS, helm, of_kind, render, values_args, values_of
from tests.k8s.schemas import k8s_errors, kuberay_errors, monitor_errors

CORE_KINDS = {"ServiceAccount", "Secret", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
              "PodDisruptionBudget", "Ingress", "Service", "ConfigMap"}


def test_three_example_values_files_at_least():
    assert {"minimal.yaml", "heterogeneous.yaml", "gcs-ft.yaml"} <= set(EXAMPLES)


@pytest.mark.parametrize("values", VALUES_SETS)
def test_helm_lint_passes_strict(values):
    result = helm("lint", "--strict", str(CHART), *values_args(values))
    assert "0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize("values", VALUES_SETS)
def test_every_object_validates_against_its_schema(values):
    objects = render(values)
    kinds = {o["kind"] for o in objects}
    assert "RayService" in kinds
    unknown = kinds - CORE_KINDS - {"RayService", "PodMonitor", "ServiceMonitor"}
    assert not unknown, f"no schema check for {unknown}"
    errors = []
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            errors += k8s_errors(obj)
        elif obj["kind"] == "RayService":
            errors += kuberay_errors(obj)
        else:
            errors += monitor_errors(obj)
    assert not errors, "\n".join(errors)


def test_the_strict_checks_catch_an_unknown_field():
    ray_service = next(o for o in render() if o["kind"] == "RayService")
    ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in kuberay_errors(ray_service))
    pdb = next(o for o in render() if o["kind"] == "PodDisruptionBudget")
    pdb["spec"]["maxUnavailabel"] = 1
    assert k8s_errors(pdb)
    monitor = next(o for o in render("heterogeneous.yaml") if o["kind"] == "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "5s"
    assert any("intervall" in e for e in monitor_errors(monitor))


def test_the_heterogeneous_example_has_monitoring_and_dashboards():
    objects = render("heterogeneous.yaml")
    assert of_kind(objects, "PodMonitor")
    dashboards = {name: json.loads(text) for cm in of_kind(objects, "ConfigMap") for name, text in cm["data"].items()}
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert files and dashboards == files
    assert all(cm["metadata"]["labels"]["grafana_dashboard"] == "1" for cm in of_kind(objects, "ConfigMap"))


def test_values_schema_is_generated_from_the_config_schema():
    on_disk = json.loads((CHART / "values.schema.json").read_text())
    assert on_disk == schema_gen.values_schema(), "helm/flotilla/values.schema.json is stale: run `make schema`"


def test_docs_values_table_matches_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = schema_gen.DOCS_PATH.read_text()
    assert docs == schema_gen.rendered_docs(docs, schema_gen.values_table(values)), (
        "docs/kubernetes.md's values table is stale: run `make schema`")


@pytest.mark.parametrize("values", VALUES_SETS)
def test_values_files_are_chart_values(values):
    schema_gen.ChartValues.model_validate(values_of(values))


def test_every_value_is_in_the_docs_table():
    table = schema_gen.values_table(values_of(DEFAULTS))
    for key in ("image.repository", "fleet", "workers.pools", "gcsFaultTolerance.redisAddress",
                "monitoring.dashboards.labels"):
        assert f"| `{key}` |" in table
