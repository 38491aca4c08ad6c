"""`flotilla status`: pools and replicas of a running fleet."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from orchestrator.cli._common import DEFAULT_CONFIG
from orchestrator.config import load_config


def register(commands) -> None:
    status = commands.add_parser("status", help="pools and replicas of a running fleet")
    status.add_argument("--config", default=str(DEFAULT_CONFIG))
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
