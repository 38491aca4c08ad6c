"""Power oversubscription, measured: `bench/scenarios/power_oversubscription.yaml` in the
cluster simulator, compared side by side against its no-oversubscription baseline.

    python -m bench.power_oversubscription [--scenario PATH] [--out DIR]

Runs every variant (same seed, same trace), then writes under `<out>/<scenario name>/`:
`summary.json` (each variant's full summary), `comparison.json` and `comparison.md`
(per variant against the baseline: time above the budget and beyond one control period,
p99 TTFT/TPOT change, SLO attainment, extra throughput, capping events) and the plots,
`power.png` (the fleet's draw against the budget over time) among them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.simulator.metrics import headline, summarize
from bench.simulator.plots import plot_all
from bench.simulator.power_hook import PowerHook
from bench.simulator.runner import RESULTS_DIR
from bench.simulator.scenario import load_scenarios
from bench.simulator.simulation import Simulation

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "power_oversubscription.yaml"
BASELINE = "baseline"


def compare(summary: dict[str, Any], base: dict[str, Any], escalations: list) -> dict[str, Any]:
    """One variant against the baseline; changes are relative (+0.05 is 5 % more)."""
    def p99(s, metric):
        return s["latency_s"][metric]["p99"]

    power = summary["power"] or {}
    return {
        "variant": summary["variant"],
        "replicas": summary["simulator"]["replicas"],
        "time_above_budget_s": power.get("time_above_budget_s"),
        "above_budget_beyond_one_period_s": power.get("above_budget_beyond_one_period_s"),
        "longest_above_budget_s": power.get("longest_above_budget_s"),
        "peak_over_budget": power.get("peak_over_budget"),
        "p99_ttft_s": p99(summary, "ttft"), "p99_ttft_change": p99(summary, "ttft") / p99(base, "ttft") - 1,
        "p99_tpot_s": p99(summary, "tpot"), "p99_tpot_change": p99(summary, "tpot") / p99(base, "tpot") - 1,
        "slo_attainment": summary["slo"]["all"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "extra_throughput": summary["throughput"]["output_tokens_per_s"]
        / base["throughput"]["output_tokens_per_s"] - 1,
        "energy_kwh": summary["energy"]["kwh"],
        "capping_events": len(escalations),
    }


def markdown(rows: list[dict[str, Any]], budget_w: float, period_s: float) -> str:
    lines = [f"Budget {budget_w:.0f} W; power control period {period_s:g} s. Changes against `{BASELINE}`.", "",
             "| variant | replicas | above budget (s) | beyond one period (s) | longest (s) | peak / budget | "
             "p99 TTFT | p99 TPOT | SLO attainment | output tok/s | extra throughput | capping events |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['replicas']} | {r['time_above_budget_s']:.1f} | "
            f"{r['above_budget_beyond_one_period_s']:.1f} | {r['longest_above_budget_s']:.1f} | "
            f"{r['peak_over_budget']:.2f} | {r['p99_ttft_s'] * 1e3:.0f} ms ({r['p99_ttft_change']:+.1%}) | "
            f"{r['p99_tpot_s'] * 1e3:.0f} ms ({r['p99_tpot_change']:+.1%}) | {r['slo_attainment']:.1%} | "
            f"{r['output_tokens_per_s']:.0f} | {r['extra_throughput']:+.1%} | {r['capping_events']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    scenarios = load_scenarios(args.scenario)
    if BASELINE not in scenarios:
        parser.error(f"{args.scenario}: needs a variant named {BASELINE!r} (has {sorted(scenarios)})")
    results, summaries, escalations = [], {}, {}
    for name, scenario in scenarios.items():
        print(f"simulating {scenario.name} [{name}] ...", flush=True)
        sim = Simulation(scenario, name)
        result = sim.run()
        summaries[name] = summarize(result)
        escalations[name] = [e for h in sim.hooks if isinstance(h, PowerHook) for e in h.escalations]
        results.append(result)
        print(headline(summaries[name]), flush=True)
    target = args.out / next(iter(scenarios.values())).name
    target.mkdir(parents=True, exist_ok=True)
    base = summaries[BASELINE]
    rows = [compare(s, base, escalations[name]) for name, s in summaries.items()]
    fleet = scenarios[BASELINE].fleet
    (target / "summary.json").write_text(json.dumps(list(summaries.values()), indent=1))
    (target / "comparison.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, fleet.power.cluster_budget_w, fleet.controller.control_period_s)
    (target / "comparison.md").write_text(table)
    written = plot_all(results, list(summaries.values()), target)
    print(table)
    print("written: " + ", ".join(str(p) for p in [target / "comparison.md", *written]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
