"""`flotilla`: the command line.

    flotilla up --config examples/local.yaml     start the embedded fleet and serve
    flotilla build-model                         build the local model (done by `up` if missing)
    flotilla status                              pools and replicas of a running fleet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from orchestrator.config import ConfigError, FleetConfig, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "local.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flotilla", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the embedded fleet and serve until Ctrl-C")
    up.add_argument("--config", default=str(DEFAULT_CONFIG), help="a FleetConfig YAML file")
    up.add_argument("--address", default=None, help="join this Ray cluster instead of starting a head")
    up.add_argument("--port", type=int, default=None, help="override server.port")
    up.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the fleet")
    up.set_defaults(run=_up)

    commands.add_parser("build-model", add_help=False,
                        help="build the local model (tokenizer + tiny Llama); --help for its options")

    status = commands.add_parser("status", help="pools and replicas of a running fleet")
    status.add_argument("--config", default=str(DEFAULT_CONFIG))
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-model"]:
        from orchestrator.local_model import main as build_model

        return build_model(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2


def _load(args: argparse.Namespace) -> FleetConfig:
    config = load_config(args.config)
    if getattr(args, "port", None):
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    return config


def _ensure_local_models(config: FleetConfig) -> None:
    from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

    for model in config.models:
        if model.resolved_path is not None and model.resolved_path.resolve() == DEFAULT_MODEL_DIR.resolve():
            build_local_model(DEFAULT_MODEL_DIR)


def _up(args: argparse.Namespace) -> int:
    from orchestrator import embedded

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = _load(args)
    _ensure_local_models(config)
    embedded.start(config, address=args.address, ready_timeout_s=args.ready_timeout)
    base = f"http://{config.server.host}:{config.server.port}"
    print(f"\nFlotilla is serving {', '.join(m.name for m in config.models)} at {base}/v1")
    if config.controller.metrics_port:
        print(f"Prometheus metrics: http://{config.server.host}:{config.controller.metrics_port}/metrics")
    print(f'Try:  curl {base}/v1/completions -H "Content-Type: application/json" '
          f"-d '{{\"model\": \"{config.models[0].name}\", \"prompt\": \"Return the\", \"max_tokens\": 32}}'")
    print("Ctrl-C stops the fleet.")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    print("\nstopping the fleet ...")
    embedded.stop(config)
    return 0


def _status(args: argparse.Namespace) -> int:
    import ray

    from orchestrator.controller_client import ControllerClient

    config = load_config(args.config)
    ray.init(address=args.address, namespace=config.namespace, logging_level="ERROR")
    status = asyncio.run(ControllerClient.lookup(config.namespace).status())
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    print(f"fleet view v{status.view_version}")
    print(f"{'POOL':<10} {'GPU':<10} {'MODEL':<16} {'ENGINE':<6} {'READY':>7} {'$/h':>8}")
    for p in status.pools:
        print(f"{p.name:<10} {p.gpu_type:<10} {p.model:<16} {p.engine:<6} {p.ready:>3}/{p.desired:<3} "
              f"{p.price_per_hour:>8.2f}")
    print(f"\n{'REPLICA':<20} {'STATE':<10} {'RUN':>4} {'WAIT':>5} {'KV':>6} {'TOK/S':>8}")
    for r in status.replicas:
        print(f"{r.replica_id:<20} {r.state:<10} {r.running:>4} {r.waiting:>5} {r.kv_usage:>6.1%} "
              f"{r.tokens_per_s:>8.0f}")
    for failure in status.router_failures:
        print(f"router agent problem: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
