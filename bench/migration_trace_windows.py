"""Benchmark: does migration's p99 TTFT gain hold beyond one stretch of the trace, and
beyond one replay of it?

    python -m bench.migration_trace_windows [--starts 1420,1460,1500,1540,1580,1620] [--length 40]
                                            [--draws 10 --jitter-s 0.01]

`bench.migration_trace` replays one 40 s window of the conv trace (the one in
bench/scenarios/migration_trace.yaml). A p99 over ~280 requests is set by its three or
four slowest, so one window can flatter or hide a policy. This runs the same scenario,
its `migration-on` and `migration-off` variants only, in the simulator over several
adjacent windows of the same length and pace, and prints per window the requests, p90
and p99 TTFT on and off and their ratio, then the median ratio over the windows. With
the scenario's `migration-on-kv-copy` variant too (a move copies the KV at
`migration.bandwidth_bytes_per_s` while the source decodes, rather than recomputing it
on the target: see `bench.simulator.migration`), both mechanisms side by side.

Which few requests end up slowest in a burst turns on the order of arrivals milliseconds
apart, so one replay can flatter or hide a policy too. With `--draws N` each window is
replayed N times, each arrival moved by a uniform draw in +-`--jitter-s` seconds
(`workload.trace.jitter_s`, seeded by `simulation.seed` + the draw's number), as a live
load generator's sends move; per window it prints the median of the draws' p99s and of
their ratios (with the range), and the ratio of the p99s of all draws' requests pooled.
Virtual time: a few seconds per window and draw. Writes
bench/results/migration_trace_windows.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.migration_trace_report import SCENARIO
from bench.report import RESULTS_DIR, machine, write_json
from bench.simulator.metrics import summarize
from bench.simulator.scenario import Scenario, load_scenarios
from bench.simulator.simulation import Simulation

OFF = "migration-off"
ON = ("migration-on", "migration-on-kv-copy")  # those the scenario has are compared with OFF


def in_window(scenario: Scenario, start_s: float, length_s: float, draw: int = 0, jitter_s: float = 0.0) -> Scenario:
    """The scenario with its trace cut to [start_s, start_s + length_s) instead; with
    `jitter_s`, replay number `draw` of it (arrivals jittered, seed moved on by `draw`)."""
    trace = scenario.workload.trace
    if trace is None:
        raise ValueError(f"scenario {scenario.name!r} replays no trace: nothing to window")
    trace = trace.model_copy(update={"window_s": (start_s, start_s + length_s), "jitter_s": jitter_s})
    simulation = scenario.simulation.model_copy(update={"seed": scenario.simulation.seed + draw})
    return scenario.model_copy(update={"workload": scenario.workload.model_copy(update={"trace": trace}),
                                       "simulation": simulation})


def run_window(scenarios: dict[str, Scenario], variants: list[str], start_s: float, length_s: float,
               draws: int = 1, jitter_s: float = 0.0) -> dict:
    """The variants over one window, `draws` replays each: per variant the requests of one
    replay, the median over the replays of TTFT p90/p99 (seconds) and migrations, each
    replay's p99 and the p99 of all replays' requests pooled; `p99_ratio` maps each "on"
    variant to the median of the replays' off/on ratios, `p99_ratios` to each replay's,
    `pooled_ratio` to the ratio of the pooled p99s."""
    row: dict = {"start_s": start_s, "length_s": length_s, "draws": draws, "jitter_s": jitter_s}
    for name in variants:
        summaries, ttfts = [], []
        for draw in range(draws):
            result = Simulation(in_window(scenarios[name], start_s, length_s, draw, jitter_s), name).run()
            summaries.append(summarize(result))
            ok = result.records.labelled("status") == "ok"
            ttfts.append(result.records.column("ttft_s")[ok])
        p99s = [s["latency_s"]["ttft"]["p99"] for s in summaries]
        row[name] = {"requests": summaries[0]["requests"]["total"],
                     "ttft_p90_s": float(np.median([s["latency_s"]["ttft"]["p90"] for s in summaries])),
                     "ttft_p99_s": float(np.median(p99s)), "ttft_p99s_s": p99s,
                     "pooled_ttft_p99_s": float(np.percentile(np.concatenate(ttfts), 99)),
                     "migrations": float(np.median([s["disruptions"]["migrations"] for s in summaries]))}
    ons = [v for v in variants if v != OFF]
    row["p99_ratios"] = {on: [off / x for off, x in zip(row[OFF]["ttft_p99s_s"], row[on]["ttft_p99s_s"])]
                         for on in ons}
    row["p99_ratio"] = {on: float(np.median(row["p99_ratios"][on])) for on in ons}
    row["pooled_ratio"] = {on: row[OFF]["pooled_ttft_p99_s"] / row[on]["pooled_ttft_p99_s"] for on in ons}
    return row


def print_table(rows: list[dict], variants: list[str]) -> None:
    ons = [v for v in variants if v != OFF]
    draws, jitter = rows[0]["draws"], rows[0]["jitter_s"]
    if draws > 1:
        print(f"\n{draws} replays per window, arrivals jittered by up to {jitter * 1e3:g} ms: p99s and ratios are "
              f"medians over the replays, [range], and the ratio of the replays' requests pooled")
    print(f"\n{'window':>13} {'requests':>8} " + " ".join(f"{'p99 ' + v:>22}" for v in variants)
          + " " + " ".join(f"{'off/' + v.removeprefix('migration-'):>14}" for v in ons)
          + ("".join(f"{'range':>14}{'pooled':>8}" for _ in ons) if draws > 1 else ""))
    for r in rows:
        window = f"{r['start_s']:.0f}-{r['start_s'] + r['length_s']:.0f} s"
        line = (f"{window:>13} {r[OFF]['requests']:>8} " + " ".join(f"{r[v]['ttft_p99_s']:>21.2f}s" for v in variants)
                + " " + " ".join(f"{r['p99_ratio'][v]:>13.2f}x" for v in ons))
        if draws > 1:
            line += "".join(f"{min(r['p99_ratios'][v]):>7.2f}-{max(r['p99_ratios'][v]):.2f}x"
                            f"{r['pooled_ratio'][v]:>7.2f}x" for v in ons)
        print(line)
    for on in ons:
        ratios = [r["p99_ratio"][on] for r in rows]
        print(f"p99 TTFT off / {on}: median {np.median(ratios):.2f}x, range {min(ratios):.2f}x to "
              f"{max(ratios):.2f}x over {len(rows)} windows")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    names = [k for k in rows[0] if isinstance(rows[0][k], dict) and "ttft_p99_s" in rows[0][k]]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [r[name]["ttft_p99_s"] for r in rows], width, label=name)
    ax.set_xticks(x, [f"{r['start_s']:.0f} s" for r in rows])
    ax.set_xlabel("trace window start (conv trace)")
    ax.set_ylabel("p99 TTFT (s, simulated)")
    ax.set_title("Migration on/off across windows of the trace (simulator)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--starts", default="1420,1460,1500,1540,1580,1620",
                        help="window starts, seconds into the trace")
    parser.add_argument("--length", type=float, default=40.0, help="window length, seconds of the trace")
    parser.add_argument("--draws", type=int, default=1, help="replays per window (arrivals jittered when > 1)")
    parser.add_argument("--jitter-s", type=float, default=0.01,
                        help="with --draws > 1: each arrival moves by up to this many seconds")
    parser.add_argument("--out", default="migration_trace_windows")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    if args.jitter_s < 0:
        parser.error(f"--jitter-s must not be negative, got {args.jitter_s}")
    jitter = args.jitter_s if args.draws > 1 else 0.0
    scenarios = load_scenarios(args.scenario)
    variants = [v for v in ON if v in scenarios] + [OFF]
    if OFF not in scenarios or len(variants) < 2:
        parser.error(f"{args.scenario} needs variants {OFF!r} and at least one of {ON}")
    starts = [float(s) for s in args.starts.split(",")]
    print(f"machine: {machine()}\nscenario: {args.scenario}, {len(starts)} windows of {args.length:.0f} s"
          + (f", {args.draws} replays each (arrivals jittered by up to {jitter:g} s)" if args.draws > 1 else ""))
    rows = []
    for start in starts:
        rows.append(run_window(scenarios, variants, start, args.length, args.draws, jitter))
        ratios = ", ".join(f"{on} {x:.2f}x" for on, x in rows[-1]["p99_ratio"].items())
        print(f"  window at {start:.0f} s: p99 TTFT off/on: {ratios}", flush=True)
    print_table(rows, variants)
    out = RESULTS_DIR / args.out
    write_json(out.with_suffix(".json"), {"machine": machine(), "argv": sys.argv[1:], "scenario": str(args.scenario),
                                          "windows": rows})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
