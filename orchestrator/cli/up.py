"""`flotilla up`: start the embedded fleet (or join a Ray cluster) and serve until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import threading

from orchestrator.cli._api import token_file
from orchestrator.cli._common import DEFAULT_CONFIG
from orchestrator.config import AdminToken, FleetConfig, load_config


def register(commands) -> None:
    up = commands.add_parser("up", help="start the embedded fleet and serve until Ctrl-C")
    up.add_argument("--config", default=str(DEFAULT_CONFIG), help="a FleetConfig YAML file")
    up.add_argument("--address", default=None, help="join this Ray cluster instead of starting a head")
    up.add_argument("--port", type=int, default=None, help="override server.port")
    up.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the fleet")
    up.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator import embedded

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(args.config)
    if args.port:
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    _ensure_local_models(config)
    config = _with_local_operator_token(config)
    # SIGTERM (a service manager, `kill`) stops the fleet as Ctrl-C does, during start-up too
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        embedded.start(config, address=args.address, ready_timeout_s=args.ready_timeout)
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installs its own, which exits at once
        _print_banner(config)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    print("\nstopping the fleet ...")
    embedded.stop(config)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _ensure_local_models(config: FleetConfig) -> None:
    from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

    for model in config.models:
        if model.resolved_path is not None and model.resolved_path.resolve() == DEFAULT_MODEL_DIR.resolve():
            build_local_model(DEFAULT_MODEL_DIR)


def _with_local_operator_token(config: FleetConfig) -> FleetConfig:
    """With no admin tokens configured, make one for this machine's operator (the CLI reads the file)."""
    if config.admin.tokens or config.admin.tokens_dir:
        return config
    path = token_file(config.server.host, config.server.port)
    token = path.read_text().strip() if path.is_file() else secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    admin = config.admin.model_copy(update={"tokens": [AdminToken(name="local-operator", role="operator",
                                                                  token=token)]})
    return config.model_copy(update={"admin": admin})


def _print_banner(config: FleetConfig) -> None:
    base = f"http://{config.server.host}:{config.server.port}"
    print(f"\nFlotilla is serving {', '.join(m.name for m in config.models)} at {base}/v1")
    if config.controller.metrics_port:
        print(f"Prometheus metrics: http://{config.server.host}:{config.controller.metrics_port}/metrics")
    print(f'Try:  curl {base}/v1/completions -H "Content-Type: application/json" '
          f"-d '{{\"model\": \"{config.models[0].name}\", \"prompt\": \"Return the\", \"max_tokens\": 32}}'")
    print(f"Admin API: {base}/admin/v1 (docs at {base}/admin/v1/docs); the CLI (`flotilla status`) finds "
          f"its token in {token_file(config.server.host, config.server.port)}")
    print("Ctrl-C stops the fleet.")
