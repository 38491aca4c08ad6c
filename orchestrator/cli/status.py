"""`flotilla status`: the fleet at a glance — pools, replicas, load, cost."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command, table


def register(commands) -> None:
    parser = commands.add_parser("status", help="pools, replicas, load and cost of a running fleet")
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def call(api):
        return {"fleet": api.get("/fleet"), "replicas": api.get("/replicas")}

    return run_api_command(args, call, show)


def show(answer: dict) -> None:
    fleet = answer["fleet"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(fleet["replicas_by_state"].items())) or "no replicas"
    print(f"fleet view v{fleet['view_version']}: {states}; {fleet['requests_in_flight']} requests in flight; "
          f"{fleet['nodes']} nodes ({fleet['nodes_cordoned']} cordoned); ${fleet['cost_per_hour']:.2f}/h\n")
    print(table(fleet["pools"], [("POOL", "name", ""), ("GPU", "gpu_type", ""), ("MODEL", "model", ""),
                                 ("ENGINE", "engine", ""), ("READY", "ready", "d"), ("WANT", "desired", "d"),
                                 ("$/H", "price_per_hour", ".2f")]))
    live = [r for r in answer["replicas"] if r["state"] not in ("stopped", "dead")]
    print()
    print(table(live, [("REPLICA", "replica_id", ""), ("POOL", "pool", ""), ("STATE", "state", ""),
                       ("RUN", "running", "d"), ("WAIT", "waiting", "d"), ("KV", "kv_usage", ".0%"),
                       ("TOK/S", "tokens_per_s", ".0f")]))
    for failure in fleet["router_failures"]:
        print(f"router agent problem: {failure}")
