"""`flotilla plan` against a running fleet: the controller's plan for its observed workload.

    flotilla plan [--rate-scale 2] [--rate MODEL:PROMPT:OUTPUT:RPS ...] [--json]   # dry run
    flotilla plan --apply [--rate-scale 2]                                          # move now

The dry run is `GET /admin/v1/placement/plan` (a viewer token is enough); `--apply` is
`POST /admin/v1/placement/apply` (an operator token), which skips dwell and hysteresis.
Exit status 1 when the API refuses (no feasible plan, a move under way: the message says).
"""

from __future__ import annotations

import argparse
import uuid

from orchestrator.cli._api import run_api_command, table


def run_api(args: argparse.Namespace) -> int:
    def call(api):
        if args.apply:
            return api.post("/placement/apply", {"rate_scale": args.rate_scale}, key=f"cli-{uuid.uuid4().hex}")
        return api.get("/placement/plan", rate_scale=args.rate_scale, rate=args.rate or None)

    return run_api_command(args, call, show)


def show(report: dict) -> None:
    print(render(report))


def render(report: dict) -> str:
    """A placement report (the API's JSON) as text."""
    lines = [f"{w['model']}: {w['total_rate']:.3g} req/s planned over {w['window_s']:.0f} s "
             f"({w['requests']} requests, {w['active_buckets']} active buckets)"
             + ("; no traffic: its pools keep their size" if w["held"] else "") for w in report["workloads"]]
    lines.append(f"plan: {report['status']}{' (what-if)' if report['what_if'] else ''}, "
                 f"${report['cost_per_hour']:.2f}/h (now ${report['current_cost_per_hour']:.2f}/h), "
                 f"{report['power_watts']:g} W, solved in {report['solve_time_s']:.3f} s; re-planning "
                 + ("on" if report["enabled"] else "off"))
    lines += ["", table(report["pools"], [("POOL", "pool", ""), ("GPU", "gpu_type", ""), ("MODEL", "model", ""),
                                          ("NOW", "current", "d"), ("PLAN", "planned", "d"), ("LOAD", "load", ".2f"),
                                          ("UTIL", "utilisation", ".0%"), ("$/H", "cost_per_hour", ".2f")]), ""]
    lines += _decision(report["decision"])
    if report["nodes"]:
        lines += _nodes(report["nodes"])
    if report["assignments"]:
        lines += ["", table(report["assignments"], [("BUCKET", "bucket", ""), ("REQ/S", "rate", ".3g"),
                                                    ("POOL", "pool", ""), ("SHARE", "fraction", ".0%"),
                                                    ("WHY", "reason", "")])]
    if report["binding"]:
        lines += ["", "binding constraints:"] + [f"  {b['kind']:<13} {b['subject']:<12} {b['detail']}"
                                                  for b in report["binding"]]
    t = report["transition"]
    if t:
        lines += ["", f"transition {t['transition_id']} ({t['trigger']}): {t['state']}"
                  + (f" — {t['detail']}" if t["detail"] else "")
                  + (f"; drained {', '.join(t['drained'])}" if t["drained"] else "")]
    return "\n".join(lines)


def _decision(d: dict) -> list[str]:
    lines = [f"decision: {d['action']}{' (urgent: the fleet lacks capacity)' if d['urgent'] else ''} — {d['reason']}"]
    for what, moves in (("scale out", d["scale_out"]), ("then drain", d["drain"])):
        if moves:
            lines.append(f"  {what}: " + ", ".join(f"{m['pool']} {m['current']} -> {m['target']}" for m in moves))
    return lines


def _nodes(n: dict) -> list[str]:
    lines = []
    if n["missing"]:
        lines.append("nodes to ask the autoscaler for: " + ", ".join(
            f"{m['count']} × {m['gpu_type']} ({m['gpus_per_node']} GPUs)" for m in n["missing"]))
    if n["idle"]:
        lines.append("nodes left idle: " + ", ".join(n["idle"]))
    lines += [f"unplaced: {u['count']} of {u['pool']}: {u['reason']}" for u in n["unplaced"]]
    return lines
