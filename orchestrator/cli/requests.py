"""`flotilla requests`: requests in flight, where they run and how far they are."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command, table


def register(commands) -> None:
    parser = commands.add_parser("requests", help="requests in flight")
    parser.add_argument("--replica", default=None)
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_api_command(args, lambda api: api.get("/requests", replica=args.replica), show)


def show(requests: list[dict]) -> None:
    for r in requests:
        r["tokens"] = f"{r['output_tokens']}/{r['max_tokens']}"
        r["phase"] = "decoding" if r["running"] else "queued"
    print(table(requests, [("REQUEST", "request_id", ""), ("REPLICA", "replica_id", ""), ("PHASE", "phase", ""),
                           ("TOKENS", "tokens", ""), ("PROMPT", "prompt_tokens", "d"), ("PRIO", "priority", "d"),
                           ("CLASS", "slo_class", ""), ("AGE S", "age_s", ".1f")]))
    print(f"\n{len(requests)} in flight")
