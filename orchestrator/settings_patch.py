"""Runtime changes to a running fleet's config: which settings may change, and validating them.

A patch is a JSON merge patch (RFC 7386) over `FleetConfig`
(`{"routing": {"load_guard": 0.8}}`; `null` removes a key, e.g. a routing weight).
Only the settings in `RUNTIME_TUNABLE` take effect without a redeploy; any other field
is refused naming it, and the result is validated as a whole `FleetConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.config import ConfigError, FleetConfig, parse_config
from orchestrator.errors import Invalid

RUNTIME_TUNABLE = frozenset({
    "routing.weights",
    "routing.load_guard",
    "routing.share_interval_s",
    "routing.booking_ttl_s",
    "controller.control_period_s",
    "controller.stats_timeout_s",
})


def apply_patch(config: FleetConfig, patch: Mapping[str, Any]) -> FleetConfig:
    """The config with `patch` merged in (an empty patch changes nothing); Invalid naming the field otherwise."""
    for path in _leaf_paths(patch):
        if not any(path == t or path.startswith(t + ".") for t in RUNTIME_TUNABLE):
            raise Invalid(f"{path}: not runtime-tunable (tunable: {', '.join(sorted(RUNTIME_TUNABLE))}); "
                          "change it with a redeploy", code="not_tunable")
    merged = merge_patch(config.model_dump(mode="json"), patch)
    try:
        return parse_config(merged)
    except ConfigError as e:
        raise Invalid(str(e), code="invalid_config") from None


def _leaf_paths(patch: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in patch.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in RUNTIME_TUNABLE:
            paths += _leaf_paths(value, path + ".")  # an empty mapping changes nothing
        else:
            paths.append(path)
    return paths


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: mappings merge, `null` deletes, anything else replaces."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out
