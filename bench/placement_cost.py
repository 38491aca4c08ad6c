"""What the cost-aware GPU mix saves, how fast it is solved, and how re-planning tracks a shift.

    python -m bench.placement_cost [--rates 4,32] [--seed 7]

1. Savings: for each workload (short-context, long-context and mixed synthetic sets after
   Mélange's Arena / PubMed / mixed, and the two Azure traces) × SLO × total rate, the
   optimal mix's cost (continuous form, and the paper's sliced form with 8 slices) next
   to the cheapest single GPU type meeting the same SLO, for two GPU sets: Mélange's four
   types (L4, A10G, A100-80GB, H100) and every catalog GPU. Capacities come from the
   performance model (`policies.capacity`) for Llama-2-7B.
2. Solve time: a dense 10 × 10-bucket workload over 2, 4 and 8 pool types, by form and slice
   factor (median of 3 solves, HiGHS through scipy), and for slice factors 2 and 8 the
   paper's literal program (one binary per slice and pool) on the same instance.
3. Re-planning: the `conv` trace's first half hour followed by the `code` trace's, at 8×
   their rates, planned every 60 s over a 300 s window; the fleet that follows every plan next to the one that
   applies hysteresis, dwell and move cost (`policies.replanning`), that one again planning
   for 15% more than the window's rate, and the per-window optimum. Cost is integrated
   over time plus $0.10 per replica started or drained; changes,
   replica moves and re-plans that found the running fleet short of capacity are counted.

Writes bench/results/placement_cost.{json,md} and three plots; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from bench.traces import TraceRequest, load_trace
from orchestrator.cli.plan import capacities, cheapest_single
from policies.capacity import Slo
from policies.gpu_catalog import gpu_spec
from policies.placement import PlacementProblem, PoolOption, solve_placement
from policies.replanning import ReplanSettings, decide, fleet_mix
from policies.transformer_spec import MODEL_PRESETS
from policies.workload import BucketScheme, WorkloadProfile, characterise_span, sliding_windows

RESULTS = Path(__file__).parent / "results"
MODEL = MODEL_PRESETS["llama-2-7b"]
SCHEME = BucketScheme.log_spaced()
MELANGE_GPUS = ("L4", "A10G", "A100-80GB", "H100")
ALL_GPUS = ("A10G", "L4", "A40", "A100-40GB", "A100-80GB", "H100", "H200")
SLOS = {"tight": Slo(1.0, 0.05), "medium": Slo(2.0, 0.1), "relaxed": Slo(5.0, 0.25)}
SYNTHETIC_REQUESTS = 20_000
BINARY_TIME_LIMIT_S = 60.0  # the literal binary form may not prove optimality in reasonable time
MOVE_COST = 0.10  # $ per replica started or drained, charged to every re-planning policy alike


@dataclass(frozen=True)
class Lengths:
    """Log-normal prompt and output lengths (median, sigma), clipped to [lo, hi]."""

    prompt_median: float
    prompt_sigma: float
    prompt_range: tuple[int, int]
    output_median: float
    output_sigma: float
    output_range: tuple[int, int]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        p = np.clip(rng.lognormal(np.log(self.prompt_median), self.prompt_sigma, n), *self.prompt_range)
        o = np.clip(rng.lognormal(np.log(self.output_median), self.output_sigma, n), *self.output_range)
        return np.stack([p, o], axis=1).astype(int)


SHORT = Lengths(150, 0.9, (4, 2000), 200, 0.9, (4, 2000))  # chat (Arena-like)
LONG = Lengths(3000, 0.5, (1024, 12000), 200, 0.6, (16, 1000))  # documents (PubMed-like)


def synthetic(kind: str, rng: np.random.Generator) -> tuple[TraceRequest, ...]:
    """Requests over 1000 s with short, long or mixed (80/20) lengths."""
    if kind == "mixed":
        lengths = np.concatenate([SHORT.sample(int(SYNTHETIC_REQUESTS * 0.8), rng),
                                  LONG.sample(int(SYNTHETIC_REQUESTS * 0.2), rng)])
        rng.shuffle(lengths)
    else:
        lengths = (SHORT if kind == "short-context" else LONG).sample(SYNTHETIC_REQUESTS, rng)
    arrivals = np.sort(rng.uniform(0, 1000.0, len(lengths)))
    return tuple(TraceRequest(float(t), int(p), int(o)) for t, (p, o) in zip(arrivals, lengths))


def workloads(rng: np.random.Generator) -> dict[str, WorkloadProfile]:
    sets = {kind: synthetic(kind, rng) for kind in ("short-context", "long-context", "mixed")}
    sets |= {f"azure-{name}": load_trace(name) for name in ("conv", "code")}
    return {name: characterise_span(records, scheme=SCHEME, model=MODEL.name)
            for name, records in sets.items()}


def pools(gpus: tuple[str, ...], slo: Slo) -> tuple[PoolOption, ...]:
    caps = capacities(MODEL, [(g, 1) for g in gpus], SCHEME, slo)
    return tuple(PoolOption(g, caps[g], gpu_spec(g).price_per_hour) for g in gpus)


# -- 1. savings -------------------------------------------------------------------------

def savings_table(loads: dict[str, WorkloadProfile], rates: list[float]) -> list[dict]:
    rows = []
    for slo_name, slo in SLOS.items():
        candidates = {"melange4": pools(MELANGE_GPUS, slo), "all7": pools(ALL_GPUS, slo)}
        for name, profile in loads.items():
            for rate in rates:
                w = profile.scaled(rate / profile.total_rate)
                row = {"workload": name, "slo": slo_name, "rate": rate}
                for set_name, options in candidates.items():
                    row |= _savings(set_name, PlacementProblem((w,), options))
                rows.append(row)
                print(_row_text(row), flush=True)
    return rows


def _savings(prefix: str, problem: PlacementProblem) -> dict:
    mix = solve_placement(problem)
    sliced = solve_placement(PlacementProblem(problem.workloads, problem.pools, form="sliced",
                                              slice_factor=8))
    single = cheapest_single(problem)
    out = {f"{prefix}_feasible": mix.feasible}
    if not mix.feasible:
        return out | {f"{prefix}_problem": mix.problems[0]}
    saving = (1 - mix.cost_per_hour / single.single_cost_per_hour) if single.single_type else None
    return out | {
        f"{prefix}_mix": {a.pool: a.replicas for a in mix.allocations if a.replicas},
        f"{prefix}_cost": mix.cost_per_hour, f"{prefix}_sliced_cost": sliced.cost_per_hour,
        f"{prefix}_single": single.single_type,
        f"{prefix}_single_cost": single.single_cost_per_hour if single.single_type else None,
        f"{prefix}_saving": saving,
    }


def _row_text(row: dict) -> str:
    def part(prefix):
        if not row[f"{prefix}_feasible"]:
            return "infeasible"
        mix = "+".join(f"{k}×{v}" for k, v in row[f"{prefix}_mix"].items())
        single = row[f"{prefix}_single"] or "none"
        saving = f"{row[f'{prefix}_saving']:.0%}" if row[f"{prefix}_saving"] is not None else "—"
        return f"{mix} ${row[f'{prefix}_cost']:.2f}/h vs {single} saves {saving}"
    return f"{row['workload']:<14} {row['slo']:<8} {row['rate']:>5g}  {part('melange4'):<55} | {part('all7')}"


# -- 2. solve time ----------------------------------------------------------------------

def solve_times(rng: np.random.Generator) -> list[dict]:
    scheme = BucketScheme.log_spaced(min_input=32, max_input=16384, min_output=8, max_output=4096)
    slo = SLOS["relaxed"]
    counts = np.bincount([scheme.index(p, o) for p, o in
                          np.concatenate([SHORT.sample(8000, rng), LONG.sample(2000, rng)])],
                         minlength=len(scheme)) + 5  # every bucket active
    w = WorkloadProfile(MODEL.name, scheme, tuple(64.0 * counts / counts.sum()), 1.0)
    types = [(g, 1) for g in ALL_GPUS] + [("A100-80GB", 2)]
    caps = {}
    for g, n in types:
        caps[f"{g}x{n}"] = capacities(MODEL, [(g, n)], scheme, slo)[g]
    names = list(caps)
    rows = []
    for t in (2, 4, 8):
        options = tuple(PoolOption(n, caps[n], gpu_spec(caps[n].gpu_type).price_per_hour)
                        for n in names[-t:])
        for form, s in [("continuous", 1)] + [("sliced", s) for s in (1, 2, 4, 8, 16)]:
            problem = PlacementProblem((w,), options, form=form, slice_factor=s)
            times, plan = [], None
            for _ in range(3):
                plan = solve_placement(problem)
                times.append(plan.solve_time_s)
            rows.append({"types": t, "buckets": len(scheme), "form": form, "slice_factor": s,
                         "seconds": statistics.median(times), "cost": plan.cost_per_hour,
                         "status": plan.status})
            line = (f"types {t}  {form:<10} S={s:<3} {rows[-1]['seconds'] * 1e3:8.1f} ms  "
                    f"${plan.cost_per_hour:.2f}/h {plan.status}")
            if form == "sliced" and s in (2, 8):
                seconds, proved, found = binary_form(problem, BINARY_TIME_LIMIT_S)
                rows[-1] |= {"binary_form_seconds": seconds, "binary_form_optimal": proved,
                             "binary_form_cost": found}
                line += (f"   one binary per slice: {seconds * 1e3:8.1f} ms, ${found or math.nan:.2f}/h"
                         + ("" if proved else " (time limit)"))
            print(line, flush=True)
    return rows


def binary_form(problem: PlacementProblem, time_limit_s: float) -> tuple[float, bool, float | None]:
    """Seconds HiGHS takes on the paper's literal program — one binary per (slice, pool) —
    whether it proved optimality within `time_limit_s`, and its cost; for comparison with the
    counted form `policies.placement` solves (identical optimum, no symmetric copies)."""
    (w,), options, s = problem.workloads, problem.pools, problem.slice_factor
    slices = [(b, rate / s) for b, _, rate in w.active() for _ in range(s)]
    edges = [(k, j, r / p.capacity.rate(b)) for k, (b, r) in enumerate(slices)
             for j, p in enumerate(options) if p.capacity.rate(b) > 0]
    n_pools = len(options)
    n = n_pools + len(edges)
    a = lil_matrix((len(slices) + n_pools, n))
    for e, (k, j, load) in enumerate(edges):
        a[k, n_pools + e] = 1.0
        a[len(slices) + j, n_pools + e] = load
    for j in range(n_pools):
        a[len(slices) + j, j] = -1.0
    lo = np.concatenate([np.ones(len(slices)), np.full(n_pools, -np.inf)])
    hi = np.concatenate([np.ones(len(slices)), np.zeros(n_pools)])
    cost = np.concatenate([[p.price_per_replica for p in options], np.zeros(len(edges))])
    began = time.perf_counter()
    result = milp(cost, integrality=np.ones(n), bounds=Bounds(np.zeros(n), np.concatenate(
        [np.full(n_pools, np.inf), np.ones(len(edges))])), constraints=LinearConstraint(a.tocsr(), lo, hi),
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9})
    cost_found = None if result.x is None else float(result.fun)
    return time.perf_counter() - began, result.status == 0, cost_found


# -- 3. re-planning ---------------------------------------------------------------------

def shifting_trace() -> tuple[TraceRequest, ...]:
    """conv's first 30 min, then code's first 30 min."""
    half = 1800.0
    conv = [r for r in load_trace("conv") if r.arrival_s < half]
    code = [TraceRequest(r.arrival_s + half, r.prompt_tokens, r.output_tokens)
            for r in load_trace("code") if r.arrival_s < half]
    return tuple(conv + code)


def replanning(rate_scale: float = 8.0) -> dict:
    """Re-plan every 60 s over the last 300 s of the shifting trace at `rate_scale` × its rate."""
    slo = SLOS["medium"]
    options = pools(MELANGE_GPUS, slo)
    windows = [w.scaled(rate_scale) for w in sliding_windows(
        shifting_trace(), window_s=300.0, step_s=60.0, scheme=SCHEME, model=MODEL.name)]
    # (settings, headroom: the plan is made for (1 + headroom) × the window's rates)
    policies = {"follow every plan": (ReplanSettings(0.0, 0.0, 0.0, 1.0), 0.0),
                "hysteresis + dwell": (ReplanSettings(0.10, 600.0, 0.10, 3600.0), 0.0),
                "hysteresis + dwell + 15% headroom": (ReplanSettings(0.10, 600.0, 0.10, 3600.0), 0.15)}
    runs = {}
    for label, (settings, headroom) in policies.items():
        fleet, last, trace = {}, None, []
        changes = moves = short = 0
        for w in windows:
            problem = PlacementProblem((w,), options)
            plan = solve_placement(PlacementProblem((w.scaled(1 + headroom),), options))
            current = fleet_mix(problem, fleet)
            decision = decide(current, plan, now_s=w.end_s, last_change_s=last, settings=settings)
            short += not current.carries_load
            if decision.action == "change":
                fleet = dict(plan.replicas)
                last, changes, moves = w.end_s, changes + 1, moves + decision.transition.moves
            trace.append({"t": w.end_s, "fleet_cost": fleet_mix(problem, fleet).cost_per_hour,
                          "optimal_cost": plan.cost_per_hour, "mix": {k: v for k, v in fleet.items() if v}})
        step_h = 60.0 / 3600
        dollars = sum(p["fleet_cost"] for p in trace) * step_h + moves * MOVE_COST
        runs[label] = {"changes": changes, "replica_moves": moves, "windows_short_of_capacity": short,
                       "dollars": dollars, "trajectory": trace}
        print(f"{label:<34} changes {changes:>3}  moves {moves:>4}  windows short {short:>3}  "
              f"${dollars:.2f} over the hour", flush=True)
    optimal = sum(p["optimal_cost"] for p in runs["follow every plan"]["trajectory"]) * step_h
    print(f"{'per-window optimum':<34} ${optimal:.2f} over the hour (a lower bound)")
    return {"rate_scale": rate_scale, "slo": vars(slo), "gpus": MELANGE_GPUS, "runs": runs,
            "optimal_dollars": optimal}


# -- output -----------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, scipy {scipy.__version__} (HiGHS)"


def plots(savings: list[dict], times: list[dict], replan: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in (2, 4, 8):
        sliced = [r for r in times if r["types"] == t and r["form"] == "sliced"]
        ax.plot([r["slice_factor"] for r in sliced], [r["seconds"] * 1e3 for r in sliced], "o-",
                label=f"sliced, {t} types")
        cont = next(r for r in times if r["types"] == t and r["form"] == "continuous")
        ax.axhline(cont["seconds"] * 1e3, ls="--", lw=0.8, color=ax.lines[-1].get_color(),
                   label=f"continuous, {t} types")
    ax.set(xscale="log", xlabel="slice factor", ylabel="solve time (ms)",
           title=f"Placement solve time, {times[0]['buckets']} buckets")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_solve_time.png", dpi=120)

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, run in replan["runs"].items():
        t = [p["t"] / 60 for p in run["trajectory"]]
        ax.step(t, [p["fleet_cost"] for p in run["trajectory"]], where="post", label=label)
    best = replan["runs"]["follow every plan"]["trajectory"]
    ax.plot([p["t"] / 60 for p in best], [p["optimal_cost"] for p in best],
            ":", color="gray", label="per-window optimum")
    ax.axvline(30, color="k", lw=0.5)
    ax.set(xlabel="trace minute (conv, then code)", ylabel="fleet $/h",
           title="Re-planning on a shifting workload")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_replanning.png", dpi=120)

    fig, ax = plt.subplots(figsize=(9, 4))
    shown = [r for r in savings if r.get("melange4_saving") is not None]
    labels = [f"{r['workload']}\n{r['slo']} {r['rate']:g}/s" for r in shown]
    x = np.arange(len(shown))
    ax.bar(x - 0.2, [100 * r["melange4_saving"] for r in shown], 0.4, label="Mélange's 4 types")
    ax.bar(x + 0.2, [100 * (r.get("all7_saving") or 0) for r in shown], 0.4, label="all 7 types")
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set(ylabel="saving vs cheapest single type (%)", title="Optimal GPU mix vs one GPU type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement_savings.png", dpi=120)


def markdown(savings: list[dict], times: list[dict], replan: dict, where: str) -> str:
    lines = [f"Machine: {where}", "", "| workload | SLO | req/s | mix (4 types) | $/h | sliced S=8 | "
             "cheapest single | $/h | saving | saving (7 types) |", "|" + " --- |" * 10]
    for r in savings:
        if not r["melange4_feasible"]:
            lines.append(f"| {r['workload']} | {r['slo']} | {r['rate']:g} | infeasible | | | | | | |")
            continue
        mix = " + ".join(f"{k}×{v}" for k, v in r["melange4_mix"].items())
        single = r["melange4_single"] or "none"
        sc = f"{r['melange4_single_cost']:.2f}" if r["melange4_single_cost"] else "—"
        sv = f"{r['melange4_saving']:.0%}" if r["melange4_saving"] is not None else "—"
        s7 = f"{r['all7_saving']:.0%}" if r.get("all7_saving") is not None else "—"
        lines.append(f"| {r['workload']} | {r['slo']} | {r['rate']:g} | {mix} | {r['melange4_cost']:.2f} | "
                     f"{r['melange4_sliced_cost']:.2f} | {single} | {sc} | {sv} | {s7} |")
    lines += ["", "| types | form | slice factor | solve ms | one binary per slice, ms |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['types']} | {r['form']} | {r['slice_factor'] if r['form'] == 'sliced' else '—'} | "
              f"{r['seconds'] * 1e3:.1f} | {_binary_cell(r)} |" for r in times]
    lines += ["", "| re-planning | changes | replica moves | windows short of capacity | $ over the hour |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['changes']} | {v['replica_moves']} | {v['windows_short_of_capacity']} | "
              f"{v['dollars']:.2f} |" for k, v in replan["runs"].items()]
    lines.append(f"| per-window optimum | | | | {replan['optimal_dollars']:.2f} |")
    return "\n".join(lines) + "\n"


def _binary_cell(row: dict) -> str:
    if "binary_form_seconds" not in row:
        return ""
    limit = "" if row["binary_form_optimal"] else " (hit the time limit)"
    return f"{row['binary_form_seconds'] * 1e3:.0f}{limit}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="4,32", help="total req/s each workload is scaled to")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    where = machine()
    print(f"machine: {where}\n")
    began = time.perf_counter()
    savings = savings_table(workloads(rng), [float(r) for r in args.rates.split(",")])
    print()
    times = solve_times(rng)
    print()
    replan = replanning()
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": where, "model": MODEL.name, "slos": {k: vars(v) for k, v in SLOS.items()},
              "savings": savings, "solve_times": times, "replanning": replan,
              "bench_seconds": time.perf_counter() - began}
    (RESULTS / "placement_cost.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / "placement_cost.md").write_text(markdown(savings, times, replan, where))
    plots(savings, times, replan)
    print(f"\nwrote {RESULTS}/placement_cost.{{json,md}} and placement_*.png")


if __name__ == "__main__":
    main()
