"""`flotilla power`: draw, caps and budgets of a running fleet; `--budget W` sets a budget."""

from __future__ import annotations

import argparse

from orchestrator.cli._api import add_api_arguments, run_api_command, table


def register(commands) -> None:
    parser = commands.add_parser("power", help="GPU power draw, caps and budgets; set a power budget")
    parser.add_argument("--budget", type=float, metavar="WATTS", help="set a power budget, watts")
    parser.add_argument("--scope", default="cluster", metavar="SCOPE",
                        help="the budget's scope: cluster (default), row:<name> or node:<node id>")
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.budget is None:
        return run_api_command(args, lambda api: api.get("/power"), show)
    kind, _, name = args.scope.partition(":")
    if kind not in ("cluster", "row", "node") or (kind == "cluster") != (name == ""):
        print(f"flotilla: --scope must be cluster, row:<name> or node:<node id>, got {args.scope!r}")
        return 2
    body = {"watts": args.budget} | ({"kind": kind, "name": name} if name else {})
    return run_api_command(args, lambda api: api.put("/power/budget", body), show_budget)


def show(power: dict) -> None:
    print(f"power: level {power['level']}; backend {power['backend']}; oversubscription "
          f"{power['oversubscription']:g}; {power['capping_events']} capping events\n")
    if power["budgets"]:
        print(table(power["budgets"], _BUDGET_COLUMNS))
    else:
        print("no power budget: power is reported, never capped")
    print()
    for gpu in power["gpus"]:
        gpu["clock"] = f"{gpu['sm_clock_mhz']:.0f}" + (f" (lock {gpu['locked_clock_mhz']:.0f})"
                                                        if gpu["locked_clock_mhz"] is not None else "")
        gpu["pin"] = gpu["pinned_limit_w"]
    print(table(power["gpus"], [("REPLICA", "replica_id", ""), ("GPU", "gpu", "d"), ("TYPE", "gpu_type", ""),
                                ("ROW", "row", ""), ("PRIO", "priority", "d"), ("DRAW W", "draw_w", ".0f"),
                                ("CAP W", "limit_w", ".0f"), ("HEADROOM W", "headroom_w", ".0f"),
                                ("SM MHZ", "clock", ""), ("PINNED W", "pin", ".0f")]))
    for reason in power["reasons"]:
        print(f"policy: {reason}")
    for failure in power["failures"]:
        print(f"failed: {failure}")


def show_budget(budget: dict) -> None:
    print(f"{budget['scope']} power budget set to {budget['budget_w']:g} W "
          "(it takes effect within one power control period)")


_BUDGET_COLUMNS = [("SCOPE", "scope", ""), ("BUDGET W", "budget_w", ".0f"), ("DRAW W", "draw_w", ".0f"),
                   ("HEADROOM W", "headroom_w", ".0f"), ("LEVEL", "level", ""), ("DEPTH", "depth", "d"),
                   ("FROM", "source", "")]
