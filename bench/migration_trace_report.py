"""Summaries, tables and the plot of `bench.migration_trace`, live and simulated.

Live latencies are divided by the run's `time_scale`: seconds of the simulated GPU, the
unit the simulator reports in, so the two tables read alike. Pure over the records, save
`simulated_ttfts`, which runs the simulator.

A p99 over ~290 requests is set by its three slowest, so one run pair says little on its
own: the p99 ratio comes with a bootstrap 95% interval, and the live runs of several
invocations pool into one table:

    python -m bench.migration_trace_report bench/results/migration_trace*.json [--slowest 5]

Which requests set that p99 is the other half of the story: `--slowest N` lists each live
run's N slowest by TTFT, next to the TTFT the simulator gives the same request of the
trace under the same configuration (`simulated_ttfts`), so a tail that the fleet's
dynamics explain reads apart from one that only the live run shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import RequestRecord, percentile
from bench.simulator.scenario import Scenario, load_scenarios

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "migration_trace.yaml"

TARGET_RATIO = 3.0  # p99 TTFT, migration off / on


@dataclass(frozen=True)
class LiveRun:
    """One configuration's live run."""

    name: str
    run: int  # 1 for its first run, 2 for its second, ...
    time_scale: float
    records: tuple[RequestRecord, ...]
    preemptions: int  # over the fleet's engines, during the run
    migrations: Mapping[str, float]  # "reason/outcome" -> count, during the run
    kv_load: float  # mean KV usage over replicas while requests arrived, in [0, 1]
    throughput_load: float  # output tokens/s over the replicas' capacity, same window
    wall_s: float
    load_average: float  # the machine's, mean of start and end (others' work shows here)
    samples: tuple[dict, ...]


def summarize_live(runs: Sequence[LiveRun]) -> list[dict[str, Any]]:
    """One row per configuration, its runs pooled, in order of first appearance."""
    names = list(dict.fromkeys(r.name for r in runs))
    return [_pooled(name, [r for r in runs if r.name == name]) for name in names]


def _ttfts(runs: Sequence[LiveRun]) -> list[float]:
    """TTFT of every request that succeeded in `runs`, in the simulated GPU's seconds."""
    return [x.ttft_s / r.time_scale for r in runs for x in r.records if x.ok]


def _pooled(name: str, runs: Sequence[LiveRun]) -> dict[str, Any]:
    scale = runs[0].time_scale
    ok = [x for r in runs for x in r.records if x.ok]
    ttft = _ttfts(runs)
    tpot = [x.tpot_s / scale for x in ok if x.tpot_s is not None]
    p99s = [percentile(_ttfts([r]), 99) for r in runs if any(x.ok for x in r.records)]
    done = sum(v for r in runs for k, v in r.migrations.items() if k.endswith("/done"))
    row = {
        "config": name, "runs": len(runs), "requests": sum(len(r.records) for r in runs), "ok": len(ok),
        "ttft_p50_s": percentile(ttft, 50) if ttft else None, "ttft_p99_s": percentile(ttft, 99) if ttft else None,
        "ttft_p99_spread_s": (min(p99s), max(p99s)) if p99s else None,
        "tpot_p99_s": percentile(tpot, 99) if tpot else None,
        "preemptions": sum(r.preemptions for r in runs), "migrations_done": done,
        "migrations": _summed([r.migrations for r in runs]),
        "kv_load": float(np.mean([r.kv_load for r in runs])),
        "throughput_load": float(np.mean([r.throughput_load for r in runs])),
        "wall_s": sum(r.wall_s for r in runs), "load_average": float(np.mean([r.load_average for r in runs])),
        "errors": sorted({x.error for r in runs for x in r.records if not x.ok}),
    }
    row["line"] = (f"{row['ok']}/{row['requests']} ok, TTFT p50 {_s(row['ttft_p50_s'])} p99 {_s(row['ttft_p99_s'])}, "
                   f"TPOT p99 {_ms(row['tpot_p99_s'])}, {row['preemptions']} preemptions, {done:.0f} migrations, "
                   f"KV load {row['kv_load']:.0%}, throughput load {row['throughput_load']:.0%}, "
                   f"{row['wall_s']:.0f}s wall, machine load average {row['load_average']:.1f}")
    return row


def _summed(maps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return {k: v for k, v in sorted(out.items()) if v}


@dataclass(frozen=True)
class SlowRequest:
    """One of a live run's slowest requests by TTFT. Seconds of the simulated GPU."""

    index: int  # position in the live plan: the trace slice's request number
    arrival_s: float  # when the plan sent it, from the run's start
    prompt_tokens: int
    ttft_s: float  # live
    sim_ttft_s: float | None = None  # the simulator's, for the same request and configuration


def slowest(run: LiveRun, n: int, simulated: Mapping[int, tuple[int, float]] | None = None) -> list[SlowRequest]:
    """The `n` requests of `run` with the longest TTFT, longest first. `simulated` maps a
    request number to (prompt tokens, TTFT) in the simulator (`simulated_ttfts`); a
    request's simulated TTFT is given only where the prompt lengths agree, so a plan that
    numbers the trace differently shows no comparison rather than a wrong one."""
    scale, simulated = run.time_scale, simulated or {}
    timed = [(x.ttft_s / scale, x) for x in run.records if x.ok and x.ttft_s is not None]
    timed.sort(key=lambda pair: (-pair[0], pair[1].index))
    out = []
    for ttft, x in timed[:n]:
        sim = simulated.get(x.index)
        out.append(SlowRequest(x.index, x.scheduled_s / scale, x.prompt_tokens, ttft,
                               sim[1] if sim is not None and sim[0] == x.prompt_tokens else None))
    return out


def simulated_ttfts(scenario: Scenario, variant: str) -> dict[int, tuple[int, float]]:
    """Request number -> (prompt tokens, TTFT in virtual seconds) of the scenario variant
    run in the simulator (seconds of CPU for the trace slice); requests with no first token
    are left out."""
    from bench.simulator.simulation import Simulation

    records = Simulation(scenario, variant).run().records
    return {int(n): (int(p), float(t)) for n, p, t in zip(records.column("number"), records.column("prompt_tokens"),
                                                          records.column("ttft_s")) if t == t}


def print_slowest(runs: Sequence[LiveRun], n: int, simulated: Mapping[str, Mapping[int, tuple[int, float]]]) -> None:
    """Each run's `slowest`, the simulator's TTFT beside it where `simulated` has the run's
    configuration."""
    for run in runs:
        print(f"\n{run.name} #{run.run}: the {n} slowest requests (seconds of the simulated GPU)")
        print(f"{'request':>8}{'arrival':>9}{'prompt':>8}{'TTFT live':>11}{'simulator':>11}")
        for r in slowest(run, n, simulated.get(run.name)):
            print(f"{r.index:>8}{r.arrival_s:>8.1f}s{r.prompt_tokens:>8}{_s(r.ttft_s):>11}{_s(r.sim_ttft_s):>11}")


def sim_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The simulator's summaries (`bench.simulator.metrics.summarize`) as table rows."""
    return [{"config": s["variant"], "requests": s["requests"]["total"], "ok": s["requests"]["completed"],
             "ttft_p50_s": s["latency_s"]["ttft"]["p50"], "ttft_p99_s": s["latency_s"]["ttft"]["p99"],
             "tpot_p99_s": s["latency_s"]["tpot"]["p99"], "preemptions": s["disruptions"]["preemptions"],
             "migrations_done": s["disruptions"]["migrations"]} for s in summaries]


def ratio_interval(off: Sequence[float], on: Sequence[float], q: float = 99, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of percentile(off, q) / percentile(on, q): both samples
    resampled with replacement, independently, `draws` times (seeded, so repeatable)."""
    if not len(off) or not len(on):
        raise ValueError("ratio_interval needs requests in both configurations")
    rng = np.random.default_rng(seed)
    off_draws = np.percentile(rng.choice(np.asarray(off, float), (draws, len(off))), q, axis=1)
    on_draws = np.percentile(rng.choice(np.asarray(on, float), (draws, len(on))), q, axis=1)
    low, high = np.percentile(off_draws / on_draws, [2.5, 97.5])
    return float(low), float(high)


def ttft_interval(runs: Sequence[LiveRun]) -> tuple[float, float] | None:
    """`ratio_interval` of p99 TTFT, migration-off over -on, their runs pooled (None unless both ran)."""
    ttft = {name: _ttfts([r for r in runs if r.name == name]) for name in ("migration-off", "migration-on")}
    return ratio_interval(ttft["migration-off"], ttft["migration-on"]) if all(ttft.values()) else None


def ratio(rows: Sequence[dict[str, Any]], key: str = "ttft_p99_s") -> float | None:
    """`key` of migration-off over migration-on (None unless both ran)."""
    by = {r["config"]: r[key] for r in rows}
    on, off = by.get("migration-on"), by.get("migration-off")
    return off / on if on and off is not None else None


def print_tables(result: Mapping[str, Any]) -> None:
    for part, title in (("live", "live (seconds of the simulated GPU: measured / time scale)"),
                        ("simulator", "simulator (virtual seconds)")):
        if part not in result:
            continue
        rows = result[part]["configs"] if part == "live" else result[part]
        print(f"\n{title}")
        print(f"{'config':<15}{'ok':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'p99 spread':>16}{'TPOT p99':>10}"
              f"{'preempt':>9}{'migrated':>9}{'KV load':>9}{'tput load':>10}")
        for r in rows:
            spread = r.get("ttft_p99_spread_s")
            print(f"{r['config']:<15}{r['ok']:>5}/{r['requests']:<4}{_s(r['ttft_p50_s']):>10}{_s(r['ttft_p99_s']):>10}"
                  f"{(_s(spread[0]) + '-' + _s(spread[1])) if spread else '-':>16}{_ms(r['tpot_p99_s']):>10}"
                  f"{r['preemptions']:>9}{r['migrations_done']:>9.0f}{_pct(r.get('kv_load')):>9}"
                  f"{_pct(r.get('throughput_load')):>10}")
        for key in ("ttft_p99_s", "ttft_p50_s", "tpot_p99_s"):
            value = ratio(rows, key)
            shown = "-" if value is None else f"{value:.2f}x"
            target = f"  (target >= {TARGET_RATIO:g}x)" if key == "ttft_p99_s" else ""
            interval = result[part].get("ttft_p99_ratio_interval") if part == "live" else None
            if key == "ttft_p99_s" and interval:
                target = f"; 95% bootstrap interval {interval[0]:.2f}-{interval[1]:.2f}x" + target
            print(f"  {key.removesuffix('_s')} migration-off / migration-on: {shown}{target}")


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}ms"


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.0%}"


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 4.6))
    for run_name in dict.fromkeys(r["name"] for r in result.get("live", {}).get("runs", [])):
        runs = [r for r in result["live"]["runs"] if r["name"] == run_name]
        ttft = np.sort([(x["chunk_times_s"][0] - x["sent_s"]) / r["time_scale"] for r in runs for x in r["records"]
                        if x["error"] is None and x["chunk_times_s"]])
        if ttft.size:
            cdf.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=run_name)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s of the simulated GPU)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("live: TTFT distribution per configuration")
    cdf.grid(True, which="both", alpha=0.3)
    if cdf.lines:
        cdf.legend(fontsize=8)
    else:  # a simulator-only run (--skip-live)
        cdf.text(0.5, 0.5, "no live run", ha="center", va="center", transform=cdf.transAxes)
    parts = [(p, result[p]["configs"] if p == "live" else result[p]) for p in ("live", "simulator") if p in result]
    width = 0.8 / max(1, 2 * len(parts))
    for i, (part, rows) in enumerate(parts):
        x = np.arange(len(rows))
        for j, key in enumerate(("ttft_p50_s", "ttft_p99_s")):
            bars.bar(x + (2 * i + j) * width, [r[key] or 0 for r in rows], width, label=f"{part} {key[5:8]}")
        bars.set_xticks(np.arange(len(rows)) + width * (len(parts) - 0.5), [r["config"] for r in rows], fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("TTFT (s)")
    bars.set_title("TTFT p50 / p99 per configuration")
    bars.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def live_runs(result: Mapping[str, Any]) -> list[LiveRun]:
    """The live runs of one `bench.migration_trace` JSON result, records included."""
    return [LiveRun(**{**r, "records": tuple(RequestRecord(**{**x, "chunk_times_s": tuple(x["chunk_times_s"])})
                                              for x in r["records"]),
                       "samples": tuple(r["samples"])})
            for r in result.get("live", {}).get("runs", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pool the live runs of several bench.migration_trace results")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files that bench.migration_trace wrote")
    parser.add_argument("--slowest", type=int, default=0, metavar="N",
                        help="also list each run's N slowest requests, next to the simulator's TTFT for them")
    parser.add_argument("--scenario", type=Path, default=SCENARIO,
                        help="the scenario the runs replayed (for --slowest's simulator column)")
    args = parser.parse_args(argv)
    if args.slowest < 0:
        parser.error(f"--slowest must not be negative, got {args.slowest}")
    runs: list[LiveRun] = []
    for path in args.results:
        try:
            found = live_runs(json.loads(path.read_text()))
        except OSError as e:
            parser.error(f"{path}: {e.strerror or e}")
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a bench.migration_trace result
            parser.error(f"{path}: not a bench.migration_trace result ({type(e).__name__}: {e})")
        print(f"{path}: {len(found)} live run(s)" + (" (none: a --skip-live result)" if not found else ""))
        runs += found
    scales = sorted({r.time_scale for r in runs})
    if len(scales) != 1:
        parser.error(f"the results' live runs must share one time scale to pool, got {scales or 'no live run'}")
    print_tables({"live": {"configs": summarize_live(runs), "ttft_p99_ratio_interval": ttft_interval(runs)}})
    if args.slowest:
        scenarios = load_scenarios(args.scenario)
        names = [name for name in dict.fromkeys(r.name for r in runs) if name in scenarios]
        print_slowest(runs, args.slowest, {name: simulated_ttfts(scenarios[name], name) for name in names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
