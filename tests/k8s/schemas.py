"""Validators for rendered objects: Kubernetes' own schemas (kubernetes-validate ships them
for every release, offline), KubeRay's CRD from ../shared/data/kuberay, and the Prometheus
Operator's CRDs as typed models (cloudcoil's, generated from those CRDs)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from orchestrator.config import REPO_ROOT

KUBERAY_CRDS = REPO_ROOT.parent / "shared" / "data" / "kuberay"
K8S_VERSIONS = ("1.26", kubernetes_validate.latest_version())  # the chart's kubeVersion floor, and the newest


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    """Strict validation (unknown fields are errors) against each supported Kubernetes release."""
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {e.message} at {e.path}")
    return errors


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    validator = _crd_validator(KUBERAY_CRDS / f"ray.io_{obj['kind'].lower()}s.yaml", obj["apiVersion"])
    return [f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at /{'/'.join(map(str, e.absolute_path))}"
            for e in validator.iter_errors(obj)]


@functools.cache
def _crd_validator(path: Path, api_version: str) -> jsonschema.Validator:
    if not path.is_file():
        raise FileNotFoundError(f"KubeRay's CRD is missing: {path} (the shared data set)")
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def _strict(schema: Any) -> Any:
    """The API server prunes unknown fields silently; here they are errors (kubectl --validate=strict)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def monitor_errors(obj: dict[str, Any]) -> list[str]:
    """A PodMonitor or ServiceMonitor, through the operator's typed model: a type error, or a
    field the model does not know (it drops those), is an error."""
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, obj["kind"])
    try:
        parsed = model.model_validate(obj).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValueError as e:
        return [f"{obj['kind']}/{obj['metadata']['name']}: {e}"]
    return [f"{obj['kind']}/{obj['metadata']['name']}: unknown field(s) {path}" for path in _dropped(obj, parsed)]


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        return [p for k, v in given.items()
                for p in ([f"{path}/{k}"] if k not in kept else _dropped(v, kept[k], f"{path}/{k}"))]
    if isinstance(given, list):
        kept = kept if isinstance(kept, list) else []
        return [p for i, v in enumerate(given) for p in _dropped(v, kept[i] if i < len(kept) else None, f"{path}/{i}")]
    return []
