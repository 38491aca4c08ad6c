"""`flotilla drain REPLICA`: stop sending a replica requests and stop it once empty."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command


def register(commands) -> None:
    parser = commands.add_parser("drain", help="drain a replica (its pool starts a replacement)")
    parser.add_argument("replica")
    parser.add_argument("--no-replace", action="store_true", help="shrink the pool instead of replacing it")
    parser.add_argument("--idempotency-key", default=None)
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def call(api):
        return api.post(f"/replicas/{args.replica}/drain", {"replace": not args.no_replace}, args.idempotency_key)

    return run_api_command(args, call, lambda r: print(f"replica {r['replica_id']} is {r['state']}"))
