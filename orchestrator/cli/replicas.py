"""`flotilla replicas`: every replica, its node and load."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command, table


def register(commands) -> None:
    parser = commands.add_parser("replicas", help="replicas with their node, state and load")
    parser.add_argument("--pool", default=None)
    parser.add_argument("--state", default=None, help="e.g. ready, draining, dead")
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_api_command(args, lambda api: api.get("/replicas", pool=args.pool, state=args.state), show)


def show(replicas: list[dict]) -> None:
    for r in replicas:
        r["node"] = r["node_id"][:12] or "-"
    print(table(replicas, [("REPLICA", "replica_id", ""), ("POOL", "pool", ""), ("GPU", "gpu_type", ""),
                           ("ENGINE", "engine", ""), ("STATE", "state", ""), ("NODE", "node", ""),
                           ("RUN", "running", "d"), ("WAIT", "waiting", "d"), ("KV", "kv_usage", ".0%"),
                           ("TOK/S", "tokens_per_s", ".0f"), ("ENDED", "end_reason", "")]))
