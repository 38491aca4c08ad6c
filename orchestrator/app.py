"""`build_app`: the Ray Serve application of a fleet, from a `FleetConfig`.

Serve YAML (`import_path: orchestrator.app:build_app`) passes its `args:` here: either
`{config: path/to/fleet.yaml}` or the FleetConfig mapping itself (what the Helm chart
renders into `serveConfigV2`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from orchestrator.config import FleetConfig, load_config, parse_config, resolve_path
from orchestrator.ingress import OpenAIIngress


def config_from_args(args: Mapping[str, Any]) -> FleetConfig:
    if set(args) == {"config"}:
        return load_config(resolve_path(str(args["config"])))
    return parse_config(args.get("fleet", args))


def build_app(args: Mapping[str, Any]) -> Application:
    config = config_from_args(args)
    return OpenAIIngress.options(num_replicas=config.server.ingress_replicas).bind(config.model_dump(mode="json"))
