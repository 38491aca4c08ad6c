"""`flotilla migrate REQUEST [--to REPLICA]`: move a decoding request to another replica, live.

`flotilla migrate --list`: recent migrations; `flotilla migrate --plan`: the policy's latest
plan and why wanted moves were not made."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command, table


def register(commands) -> None:
    parser = commands.add_parser("migrate", help="move a request to another replica while it decodes")
    parser.add_argument("request", nargs="?", help="a request id (see `flotilla requests`); omit with --list")
    parser.add_argument("--to", default=None, help="target replica (default: the least loaded of its model)")
    parser.add_argument("--list", action="store_true", help="show recent migrations instead")
    parser.add_argument("--plan", action="store_true",
                        help="show the policy's latest plan and why wanted moves were not made")
    parser.add_argument("--idempotency-key", default=None)
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.plan:
        return run_api_command(args, lambda api: api.get("/migrations/plan"), _show_plan)
    if args.list or not args.request:
        return run_api_command(args, lambda api: api.get("/migrations"), _show_list)

    def call(api):
        return api.post(f"/requests/{args.request}/migrate", {"target": args.to}, args.idempotency_key)

    return run_api_command(args, call, lambda m: print(
        f"migration {m['migration_id']}: {m['request_id']} {m['source']} -> {m['target']} ({m['state']})"))


def _show_list(migrations: list[dict]) -> None:
    for m in migrations:
        m["outcome"] = m["abort_reason"] or m["state"]
        m["rounds"] = len(m["precopy_rounds"])
    print(table(migrations, [("MIGRATION", "migration_id", ""), ("REQUEST", "request_id", ""),
                             ("FROM", "source", ""), ("TO", "target", ""), ("WHY", "reason", ""),
                             ("ROUNDS", "rounds", "d"), ("OUTCOME", "outcome", "")]))


def _show_plan(plan: dict) -> None:
    if plan["planned_at"] is None:
        print("no plan yet: the controller has not run its migration step")
        return
    print(f"{plan['moves_planned']} move(s) planned, {plan['moves_started']} started")
    for note in plan["notes"]:
        print(f"  {note}")
