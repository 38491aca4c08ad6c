"""The summary of a simulation: latency percentiles, SLO attainment, throughput, cost,
energy, disruptions, and how fast the simulator ran.

Latencies are over completed requests (seconds). SLO attainment counts every request
of a class: one meets its class when its TTFT and its TPOT (if it has more than one
token) are within the class's targets; rejected and failed ones miss. Throughput is
over the makespan, first arrival to last token.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.simulator.simulation import SimResult

PERCENTILES = (50, 90, 99)


def summarize(result: SimResult) -> dict[str, Any]:
    """A JSON-ready summary of one run."""
    book = result.records
    status = book.labelled("status") if len(book) else np.array([], dtype=object)
    ok = status == "ok"
    arrival = book.column("arrival_s")
    e2e = book.column("e2e_s")
    outputs = book.column("output_tokens")
    makespan = float(np.nanmax(arrival + e2e) - arrival.min()) if ok.any() else 0.0
    out_tokens = int(outputs[ok].sum())
    cost = sum(u.cost_usd for u in result.usage)
    energy = sum(u.energy_j for u in result.usage)
    prompt = book.column("prompt_tokens")
    return {
        "scenario": result.scenario.name,
        "variant": result.variant,
        "requests": {"total": len(book), "completed": int(ok.sum()),
                     "rejected": int((status == "rejected").sum()), "failed": int((status == "failed").sum()),
                     "clipped_to_context": result.clipped},
        "throughput": {"makespan_s": makespan,
                       "requests_per_s": ok.sum() / makespan if makespan else 0.0,
                       "output_tokens_per_s": out_tokens / makespan if makespan else 0.0},
        "latency_s": {name: _percentiles(book.column(col)[ok])
                      for name, col in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s"),
                                        ("queue", "queue_s"))},
        "slo": _attainment(result, status),
        "prefix_cache_hit": float(book.column("cached_tokens")[ok].sum() / max(1, prompt[ok].sum())),
        "cost": {"usd": cost, "usd_per_million_output_tokens": cost / out_tokens * 1e6 if out_tokens else None,
                 "gpu_hours": sum(u.gpu_hours for u in result.usage),
                 "pools": {u.pool: {"gpu_type": u.gpu_type, "gpu_hours": u.gpu_hours, "usd": u.cost_usd,
                                    "busy_fraction": u.busy_fraction} for u in result.usage}},
        "energy": {"kwh": energy / 3.6e6, "joules_per_output_token": energy / out_tokens if out_tokens else None},
        "disruptions": {"preemptions": result.preemptions,
                        "migrations": sum(w.affected for w in result.migrations),
                        "resumes": int(book.column("resumes").sum()),
                        "faults": [_fault(f) for f in result.faults]},
        "simulator": _perf(result),
        "power": _power(result),
    }


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def _attainment(result: SimResult, status: np.ndarray) -> dict[str, Any]:
    book = result.records
    classes = book.labelled("slo_class")
    ttft, tpot = book.column("ttft_s"), book.column("tpot_s")
    out: dict[str, Any] = {}
    met_all = np.zeros(len(book), dtype=bool)
    for slo in result.scenario.fleet.slo_classes:
        mine = classes == slo.name
        if not mine.any():
            continue
        met = (status == "ok") & (ttft <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_s))
        met_all |= mine & met
        out[slo.name] = {"requests": int(mine.sum()), "attainment": float((met & mine).sum() / mine.sum()),
                         "ttft_target_s": slo.ttft_s, "tpot_target_s": slo.tpot_s}
    out["all"] = float(met_all.mean()) if len(book) else None
    return out


def _fault(fault) -> dict[str, Any]:
    d = fault.disruption
    return {"at_s": d.at, "kind": fault.event.kind, "replicas_lost": list(fault.replicas_lost),
            "requests_interrupted": d.affected, "resumed": d.resumed, "failed": d.failed,
            "requests_recovered_after_s": d.recovery_s,
            "pools_restored_after_s": None if fault.restored_at is None else fault.restored_at - d.at}


def _power(result: SimResult) -> dict[str, Any] | None:
    """The fleet's draw against its cluster budget, from the control ticks' samples: each
    is the draw averaged over the control period before it. An episode above the budget
    lasts from its first sample over to the first one back under; beyond the first period
    of each is what a power controller acting once per period could have prevented."""
    samples = [s for s in result.samples if s.power_w is not None]
    if not samples:
        return None
    period = result.scenario.fleet.controller.control_period_s
    draw = np.array([s.power_w for s in samples])
    budget = np.array([np.inf if s.budget_w is None else s.budget_w for s in samples])
    over = draw > budget
    episodes, run = [], 0
    for above in over:
        if above:
            run += 1
        elif run:
            episodes, run = episodes + [run * period], 0
    episodes += [run * period] if run else []
    finite = np.isfinite(budget)
    return {"budget_w": float(budget[finite][-1]) if finite.any() else None,
            "peak_w": float(draw.max()), "mean_w": float(draw.mean()), "p99_w": float(np.percentile(draw, 99)),
            "peak_over_budget": float((draw[finite] / budget[finite]).max()) if finite.any() else None,
            "time_above_budget_s": float(over.sum() * period), "episodes_above_budget": len(episodes),
            "longest_above_budget_s": max(episodes, default=0.0),
            "above_budget_beyond_one_period_s": float(sum(max(0.0, e - period) for e in episodes))}


def _perf(result: SimResult) -> dict[str, Any]:
    p = result.perf
    return {"wall_s": p.wall_s, "cpu_s": p.cpu_s, "virtual_s": p.virtual_s, "speedup_vs_real_time": p.speedup,
            "cpu_speedup_vs_real_time": p.cpu_speedup,
            "events": p.events, "events_per_s": p.events_per_s,
            "events_per_cpu_s": p.events / p.cpu_s if p.cpu_s > 0 else 0.0, "engine_steps": p.steps,
            "model_calls": p.model_calls, "peak_rss_mib": p.peak_rss_mib, "replicas": p.replicas}


def headline(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    r, lat, thr = summary["requests"], summary["latency_s"], summary["throughput"]
    sim, cost = summary["simulator"], summary["cost"]

    def ms(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.0f}ms"

    lines = [
        f"[{summary['variant']}] {r['completed']}/{r['total']} completed, {r['rejected']} rejected, "
        f"{r['failed']} failed; {thr['requests_per_s']:.1f} req/s, {thr['output_tokens_per_s']:.0f} tok/s",
        f"  TTFT p50/p90/p99 {ms(lat['ttft']['p50'])}/{ms(lat['ttft']['p90'])}/{ms(lat['ttft']['p99'])}   "
        f"TPOT {ms(lat['tpot']['p50'])}/{ms(lat['tpot']['p90'])}/{ms(lat['tpot']['p99'])}   "
        f"e2e {ms(lat['e2e']['p50'])}/{ms(lat['e2e']['p99'])}",
        f"  SLO attainment {summary['slo']['all']:.1%}   prefix hit {summary['prefix_cache_hit']:.1%}   "
        f"${cost['usd']:.2f} ({cost['usd_per_million_output_tokens'] or 0:.2f}/Mtok)   "
        f"{summary['energy']['kwh']:.2f} kWh",
        f"  simulator: {sim['virtual_s']:.0f}s virtual in {sim['wall_s']:.1f}s wall "
        f"({sim['speedup_vs_real_time']:.0f}x "
        f"real time), {sim['cpu_s']:.1f}s CPU ({sim['cpu_speedup_vs_real_time']:.0f}x); {sim['events']} events "
        f"({sim['events_per_cpu_s']:.0f}/CPU-s); peak RSS {sim['peak_rss_mib']:.0f} MiB",
    ]
    power = summary.get("power")
    if power and power["budget_w"] is not None:
        lines.append(f"  power: peak {power['peak_w']:.0f} W, mean {power['mean_w']:.0f} W of a "
                     f"{power['budget_w']:.0f} W budget; above it {power['time_above_budget_s']:.1f}s in "
                     f"{power['episodes_above_budget']} episodes (longest {power['longest_above_budget_s']:.1f}s)")
    return "\n".join(lines)
