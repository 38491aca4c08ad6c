"""`flotilla cordon NODE` / `flotilla uncordon NODE`: keep new replicas off a node, or let them back."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command


def register(commands) -> None:
    cordon = commands.add_parser("cordon", help="no new replicas on a node (--drain: move its replicas off)")
    cordon.add_argument("node")
    cordon.add_argument("--drain", action="store_true")
    add_api_arguments(cordon)
    cordon.set_defaults(run=run_cordon)
    uncordon = commands.add_parser("uncordon", help="let new replicas land on a node again")
    uncordon.add_argument("node")
    add_api_arguments(uncordon)
    uncordon.set_defaults(run=run_uncordon)


def _show(node: dict) -> None:
    state = "cordoned" if node["cordoned"] else "schedulable"
    print(f"node {node['node_id']} is {state}; replicas on it: {', '.join(node['replicas']) or 'none'}")


def run_cordon(args: argparse.Namespace) -> int:
    return run_api_command(args, lambda api: api.post(f"/nodes/{args.node}/cordon", {"drain": args.drain}), _show)


def run_uncordon(args: argparse.Namespace) -> int:
    return run_api_command(args, lambda api: api.post(f"/nodes/{args.node}/uncordon"), _show)
