"""The Helm chart's `values.schema.json`, generated from the config schema.

The chart's `fleet:` value is exactly a `FleetConfig`; every other value (image, head,
workers, monitoring, ...) is described by the `ChartValues` models below. The schema is
`ChartValues`' JSON schema with `FleetConfig`'s inlined, plus the checks pydantic runs
in validators that a JSON schema can state too (known GPU types, arch presets, scorers),
so `helm install` refuses a bad fleet before any pod starts.

`python -m orchestrator.schema_gen --write` rewrites the schema and the values table
in docs/kubernetes.md (`make schema`); `--check` exits 1 when either is stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config import REPO_ROOT, FleetConfig
from policies.perfmodel import GPU_CATALOG, MODEL_PRESETS
from policies.scorers import SCORERS

CHART_DIR = REPO_ROOT / "helm" / "flotilla"
SCHEMA_PATH = CHART_DIR / "values.schema.json"
VALUES_PATH = CHART_DIR / "values.yaml"
DOCS_PATH = REPO_ROOT / "docs" / "kubernetes.md"
TABLE_START, TABLE_END = "<!-- values-table:start -->", "<!-- values-table:end -->"

K8sObject = dict[str, Any]  # a Kubernetes API object, validated by the API server, not here


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Image(_Values):
    repository: str = Field(min_length=1, description="Flotilla image (docker/Dockerfile: Ray + Flotilla + vLLM GPU).")
    tag: str = Field(min_length=1, description="Image tag.")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field(description="Image pull policy.")
    pullSecrets: list[K8sObject] = Field(description="imagePullSecrets of every Ray pod.")


class RayAuth(_Values):
    mode: Literal["token", "disabled"] = Field(
        description="KubeRay `authOptions.mode`: Ray's token auth, the token kept by KubeRay in a Secret.")


class Head(_Values):
    resources: K8sObject = Field(description="Head container resources (the head runs no GPU replica).")
    nodeSelector: dict[str, str] = Field(description="Node selector of the head pod.")
    tolerations: list[K8sObject] = Field(description="Tolerations of the head pod.")
    rayStartParams: dict[str, str] = Field(description="Extra `ray start` parameters of the head.")


class WorkerPod(_Values):
    resources: K8sObject = Field(
        description="CPU/memory of a worker pod; `nvidia.com/gpu` is added from the pool's `gpus_per_replica`.")
    rayStartParams: dict[str, str] = Field(description="Extra `ray start` parameters of the workers.")


class WorkerPodOverride(_Values):
    resources: K8sObject | None = None
    rayStartParams: dict[str, str] | None = None


class Workers(_Values):
    defaults: WorkerPod = Field(description="Every pool's worker pod (one pod per replica).")
    pools: dict[str, WorkerPodOverride] = Field(
        description="Per-pool overrides of `workers.defaults`, keyed by `fleet.pools[].name`.")


class Autoscaler(_Values):
    enabled: bool = Field(
        description="Ray's autoscaler adds worker pods for pending replicas; off: pools start at `replicas`.")
    idleTimeoutSeconds: int = Field(ge=0, description="Seconds an idle worker pod lives before removal.")
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = Field(description="Autoscaler upscaling.")


class AdminTokens(_Values):
    enabled: bool = Field(description="Mount admin API tokens and set `fleet.admin.tokens_dir` to them.")
    existingSecret: str = Field(description="Secret with keys `viewer` and `operator` (one token per line); "
                                            "empty: the chart generates one and keeps it across upgrades.")
    mountPath: str = Field(min_length=1, description="Where the tokens are mounted in every Ray pod.")


class Service(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        description="Type of the Service for the OpenAI and admin APIs (KubeRay points it at the active cluster).")
    annotations: dict[str, str] = Field(description="Annotations of that Service.")


class Ingress(_Values):
    enabled: bool = Field(description="Create an Ingress for the OpenAI and admin APIs.")
    className: str = Field(description="ingressClassName; empty: the cluster default.")
    host: str = Field(description="Host name; empty: any host.")
    annotations: dict[str, str] = Field(description="Annotations of the Ingress.")
    tls: list[K8sObject] = Field(description="TLS entries of the Ingress.")


class Pdb(_Values):
    enabled: bool = Field(description="PodDisruptionBudgets: the head never voluntarily evicted; "
                                      "at most `workersMaxUnavailable` pods of each pool at once.")
    workersMaxUnavailable: int | str = Field(description="maxUnavailable of each pool's budget (number or %).")


class ServiceAccount(_Values):
    create: bool = Field(description="Create the head pod's ServiceAccount.")
    name: str = Field(description="Its name; empty: the release's full name.")
    annotations: dict[str, str] = Field(description="Annotations (e.g. cloud IAM bindings).")


class Rbac(_Values):
    create: bool = Field(description="The least RBAC the controller needs (nodes get/list/patch; "
                                     "rayclusters get/patch in the namespace; see orchestrator/kube.py).")


class RedisPassword(_Values):
    name: str = Field(description="Secret holding the Redis password; empty: no password.")
    key: str = Field(description="Key in that Secret.")


class GcsFaultTolerance(_Values):
    enabled: bool = Field(description="KubeRay `gcsFaultToleranceOptions`: GCS state in an external Redis, "
                                      "so the head restarts without losing the fleet.")
    redisAddress: str = Field(description="host:port of the external Redis (required when enabled).")
    redisPassword: RedisPassword
    externalStorageNamespace: str = Field(description="Key prefix in Redis; empty: KubeRay's default.")


class Scrape(_Values):
    enabled: bool = Field(description="Create this monitor (needs the Prometheus Operator's CRDs).")
    interval: str = Field(pattern=r"^[0-9]+(ms|s|m)$", description="Scrape interval.")
    labels: dict[str, str] = Field(description="Extra labels, e.g. the `release` your Prometheus selects.")


class Dashboards(_Values):
    enabled: bool = Field(description="Grafana dashboards (dashboards/*.json) as ConfigMaps for Grafana's sidecar.")
    labels: dict[str, str] = Field(description="Labels the sidecar watches for.")
    annotations: dict[str, str] = Field(description="Annotations, e.g. the sidecar's target folder.")


class Monitoring(_Values):
    podMonitor: Scrape = Field(description="PodMonitor: Flotilla's metrics on the head and Ray's on every pod.")
    serviceMonitor: Scrape = Field(description="ServiceMonitor on a metrics Service of the head pod.")
    dashboards: Dashboards


class ChartValues(_Values):
    """Every value of helm/flotilla; `fleet` is the fleet's `FleetConfig`."""

    image: Image
    rayVersion: str = Field(min_length=1, description="Ray version in the image (KubeRay needs it).")
    rayAuth: RayAuth
    fleet: FleetConfig = Field(description="The fleet: exactly a FleetConfig (orchestrator/config.py), rendered "
                                           "into the RayService's `serveConfigV2`.")
    head: Head
    workers: Workers
    autoscaler: Autoscaler
    modelVolume: K8sObject = Field(
        description="A volume source (e.g. `persistentVolumeClaim: {claimName: models}`) with the models' "
                    "checkpoints, mounted at `modelMountPath` on every Ray pod; empty: none.")
    modelMountPath: str = Field(min_length=1, description="Where `modelVolume` is mounted.")
    adminTokens: AdminTokens
    service: Service
    ingress: Ingress
    podDisruptionBudget: Pdb
    serviceAccount: ServiceAccount
    rbac: Rbac
    gcsFaultTolerance: GcsFaultTolerance
    monitoring: Monitoring


_VALUES_MODELS = {m.__name__: m for m in _Values.__subclasses__()}


def values_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the chart's values."""
    schema = ChartValues.model_json_schema()
    _enrich_fleet(schema["$defs"])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _enrich_fleet(defs: dict[str, Any]) -> None:
    """State in the schema what FleetConfig's validators check, so helm refuses it early."""
    try:
        defs["PoolConfig"]["properties"]["gpu_type"]["enum"] = sorted(GPU_CATALOG)
        arch = defs["ModelConfig"]["properties"]["arch"]["anyOf"]
        next(a for a in arch if a.get("type") == "string")["enum"] = sorted(MODEL_PRESETS)
        defs["RoutingConfig"]["properties"]["weights"]["propertyNames"] = {"enum": sorted(SCORERS)}
    except (KeyError, StopIteration) as e:
        raise RuntimeError(f"FleetConfig's schema changed shape ({e!r}): update _enrich_fleet") from None


def values_table(values: dict[str, Any]) -> str:
    """The markdown table of every value: key, type, default (from values.yaml), meaning."""
    rows = ["| value | type | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{key}` | {kind} | {default} | {text} |" for key, kind, default, text in
             _rows(ChartValues, values, "")]
    return "\n".join(rows)


def _rows(model: type[BaseModel], values: dict[str, Any], prefix: str):
    for name, field in model.model_fields.items():
        key, default, annotation = f"{prefix}{name}", values.get(name), field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Values):
            yield from _rows(annotation, default or {}, f"{key}.")
        elif annotation is FleetConfig:
            yield key, "FleetConfig", "a one-pool fleet (values.yaml)", field.description
        else:
            yield key, _type_name(annotation), f"`{json.dumps(default)}`", field.description or ""


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in get_args(annotation))
    text = str(annotation).replace("typing.", "").replace("dict[str, Any]", "object")
    # a nested values model shows as its fields, whatever module name it was loaded under
    text = re.sub(r"[\w.]+\.(\w+)", lambda m: "{" + ", ".join(_VALUES_MODELS[m.group(1)].model_fields) + "}"
                  if m.group(1) in _VALUES_MODELS else m.group(0), text)
    return text.replace("<class '", "").replace("'>", "").replace(" | ", " or ")


def rendered_docs(docs: str, table: str) -> str:
    """`docs` with the text between the table markers replaced by `table`."""
    start, end = docs.find(TABLE_START), docs.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{DOCS_PATH}: needs {TABLE_START} ... {TABLE_END} around the values table")
    return f"{docs[:start + len(TABLE_START)]}\n{table}\n{docs[end:]}"


def _expected() -> tuple[str, str]:
    values = yaml.safe_load(VALUES_PATH.read_text())
    schema = json.dumps(values_schema(), indent=2) + "\n"
    return schema, rendered_docs(DOCS_PATH.read_text(), values_table(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Helm chart's values.schema.json and values table.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the schema and the docs' values table")
    mode.add_argument("--check", action="store_true", help="exit 1 when either is stale")
    args = parser.parse_args(argv)
    schema, docs = _expected()
    if args.write:
        SCHEMA_PATH.write_text(schema)
        DOCS_PATH.write_text(docs)
        return 0
    stale = [str(p) for p, text in ((SCHEMA_PATH, schema), (DOCS_PATH, docs)) if p.read_text() != text]
    if stale:
        print(f"stale: {', '.join(stale)}; run `make schema`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
