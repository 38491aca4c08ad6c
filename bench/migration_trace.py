"""Benchmark: a bursty trace through Flotilla four ways: migration on, migration off, round
robin, power of two choices. Live (a fleet started in this process) and in the simulator.

    python -m bench.migration_trace [--time-scale 4] [--order migration-on,migration-off,round-robin,power-of-two]
                                    [--skip-live] [--skip-sim]

One file says what runs: bench/scenarios/migration_trace.yaml (the fleet, the trace
slice and its pace, and one variant per configuration). Live, each configuration gets a
fresh fleet of that scenario's replicas (sim engines) and the identical open-loop
schedule (`bench.loadgen`, same seed): the trace slice's arrivals and lengths, random
prompts. The configurations differ only where the scenario's variants say:
- migration-on: `migration.enabled` (the Llumnix-style policy moves requests);
- migration-off: no policy moves (drains only; none happen here);
- round-robin / power-of-two: routing `weights: {round_robin | power_of_two: 1}`,
  `load_guard: 1.0`, migration off: the baselines, scorers over the same router.

The sim engines run `time_scale` times slower than the GPU they simulate and the
arrivals are spread as much (the scenario's pace divided by `time_scale`), so that this
2-core machine carries the streamed tokens with small overhead (`bench.time_scale`).
Latencies are printed in the simulated GPU's seconds (measured / scale).

Per configuration: TTFT p50/p99, TPOT p99, preemptions (engine stats), migrations
(controller counter), the load while requests arrived (mean KV usage, and output
tokens/s over the replicas' capacity); then the p99 TTFT ratio off/on (target >= 3), and
each live run's slowest requests next to the TTFT the simulator gives the same request.
The simulator runs the same scenario's variants in virtual time (`bench.simulator`).
Writes bench/results/migration_trace.json and .png (and the simulator's outputs under
bench/results/migration_trace/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from actors.replica_client import ReplicaClient
from bench import loadgen, traces
from bench.migration_fleet import FleetHandle, running_fleet
from bench.migration_trace_report import (
    SCENARIO,
    LiveRun,
    plot,
    print_slowest,
    print_tables,
    sim_rows,
    simulated_ttfts,
    slowest,
    summarize_live,
    ttft_interval,
)
from bench.report import RESULTS_DIR, machine, write_json
from bench.simulator.scenario import Scenario, load_scenarios
from bench.time_scale import slowed
from orchestrator.view_builder import replica_speed

CONFIGS = ("migration-on", "migration-off", "round-robin", "power-of-two")
SLOWEST = 5  # requests listed per live run, next to the simulator's TTFT for them
_BY = ("reason", "outcome")  # flotilla_migrations_total keyed "reason/outcome"


# the live fleet of one variant --------------------------------------------------------------

def live_overrides(scenario: Scenario, time_scale: float) -> dict[str, Any]:
    """The scenario variant's fleet as a live config: its migration and routing, the sim
    engines and the durations that shape the fleet `time_scale` times slower (`slowed`)."""
    fleet = slowed(scenario.fleet, time_scale).model_dump(mode="json")
    fleet.pop("admin", None)
    fleet["migration"]["enabled"] = any(h.name == "migration" for h in scenario.hooks)
    if scenario.routing is not None:
        fleet["routing"] = {**fleet["routing"], **scenario.routing.model_dump(mode="json")}
    return fleet


def live_plan(scenario: Scenario, time_scale: float, seed: int) -> loadgen.Plan:
    """The scenario's trace slice at its pace / `time_scale`: arrivals, lengths, prompts."""
    source = scenario.workload.trace
    if source is None or source.window_s is None:
        raise ValueError(f"scenario {scenario.name}: the live run replays a trace window (workload.trace.window_s)")
    trace = traces.load_trace(source.name)
    pace = source.speedup / time_scale  # trace seconds per real second
    start, end = source.window_s
    model = scenario.fleet.model(scenario.model_name)
    spec = loadgen.LoadSpec("trace", pace * traces.mean_rate(trace), (end - start) / pace, source.name,
                            trace_start_s=start, max_model_len=model.max_model_len, seed=seed)
    return loadgen.build_plan(spec, trace, np.arange(32, 127))  # printable bytes of the byte tokenizer


@dataclass(frozen=True)
class Sample:
    """The replicas at one moment of a run (admin API): real seconds since its start."""

    t: float
    kv_usage: float  # mean over replicas
    tokens_per_s: float  # summed, in simulated seconds (the engines' own clock)
    waiting: int


def run_live(path: Path, name: str, scenario: Scenario, time_scale: float, plan: loadgen.Plan,
             run: int) -> LiveRun:
    print(f"\n[{name} #{run}] starting the fleet", flush=True)
    with running_fleet(path, live_overrides(scenario, time_scale)) as fleet:
        return asyncio.run(_load(name, scenario, fleet, plan, time_scale, run))


async def _load(name: str, scenario: Scenario, fleet: FleetHandle, plan: loadgen.Plan, time_scale: float,
                run: int) -> LiveRun:
    base = f"{fleet.base_url}/v1"
    model = scenario.model_name
    async with httpx.AsyncClient(timeout=30.0) as http:
        warm = await loadgen.warm_up(base, model, np.arange(32, 127), requests=4)
        if not all(r.ok for r in warm):
            raise RuntimeError(f"{name}: warm-up failed: {sorted({r.error for r in warm if not r.ok})}")
        replicas = await fleet.ready_replicas(http, scenario.fleet.pools[0].name)
        preempted = await _preemptions(fleet, replicas)
        moved = await fleet.counter(http, "flotilla_migrations_total", _BY)
        samples: list[Sample] = []
        sampling = asyncio.create_task(_sample(fleet, http, samples))
        began, load_before = time.monotonic(), os.getloadavg()[0]
        try:
            records = await loadgen.run_load(base, model, plan.requests, timeout_s=3600.0)
        finally:
            sampling.cancel()
        wall = time.monotonic() - began
        after = await fleet.counter(http, "flotilla_migrations_total", _BY)
        moves = {k: v - moved.get(k, 0) for k, v in after.items()}
        preemptions = await _preemptions(fleet, replicas) - preempted
    arrivals_end = plan.requests[-1].at_s
    window = [s for s in samples if s.t <= arrivals_end] or samples
    capacity = _capacity(scenario)
    live = LiveRun(name, run, time_scale, tuple(records), preemptions, moves,
                   float(np.mean([s.kv_usage for s in window])) if window else float("nan"),
                   float(np.mean([s.tokens_per_s for s in window])) / capacity if window else float("nan"),
                   wall, (load_before + os.getloadavg()[0]) / 2, tuple(asdict(s) for s in samples))
    print(f"[{name} #{run}] {summarize_live([live])[0]['line']}", flush=True)
    return live


async def _preemptions(fleet: FleetHandle, replicas: list[str]) -> int:
    clients = [ReplicaClient.lookup(r, fleet.config.namespace) for r in replicas]
    return sum(s.preemptions for s in await asyncio.gather(*(c.stats(timeout_s=10.0) for c in clients)))


async def _sample(fleet: FleetHandle, http: httpx.AsyncClient, out: list[Sample], period_s: float = 2.0) -> None:
    began = time.monotonic()
    while True:
        try:
            reps = [r for r in await fleet.admin(http, "GET", "/replicas") if r["state"] == "ready"]
            if reps:
                out.append(Sample(time.monotonic() - began, float(np.mean([r["kv_usage"] for r in reps])),
                                  float(sum(r["tokens_per_s"] for r in reps)), int(sum(r["waiting"] for r in reps))))
        except (httpx.HTTPError, RuntimeError):
            pass  # a missed sample; the next one comes
        await asyncio.sleep(period_s)


def _capacity(scenario: Scenario) -> float:
    """Output tokens/s (simulated) the pools can produce: what routing takes as capacity."""
    total = 0.0
    for pool in scenario.fleet.pools:
        arch = scenario.fleet.model(pool.model).transformer_spec()
        total += pool.replicas * replica_speed(pool.gpu_type, arch, max(1, pool.gpus_per_replica))[2]
    return total


# the simulator ---------------------------------------------------------------------------------

def run_simulator(path: Path, variants: list[str], out: Path) -> list[dict[str, Any]]:
    from bench.simulator.runner import run_file

    return run_file(path, variants=variants, out=out, records="none", plots=True)


# the command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="sim engines run this many times slower than the GPU they simulate")
    parser.add_argument("--order", default=",".join(CONFIGS), help="live runs in this order (repeat to repeat)")
    parser.add_argument("--seed", type=int, default=0, help="the live schedule's seed (prompts)")
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="fleet, trace slice and variants")
    parser.add_argument("--out", default="migration_trace")
    args = parser.parse_args(argv)
    scenarios = load_scenarios(args.scenario)
    order = args.order.split(",")
    unknown = sorted(set(order) - set(scenarios))
    if unknown:
        parser.error(f"--order: no variant(s) {unknown} in {args.scenario} (variants: {sorted(scenarios)})")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    result: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:], "scenario": str(args.scenario)}
    if not args.skip_live:
        first = scenarios[order[0]]
        plan = live_plan(first, args.time_scale, args.seed)
        print(f"live plan: {loadgen.describe_plan(plan)}; time scale {args.time_scale:g}", flush=True)
        runs, seen = [], {}
        for name in order:
            seen[name] = seen.get(name, 0) + 1
            runs.append(run_live(args.scenario, name, scenarios[name], args.time_scale, plan, seen[name]))
        result["live"] = {"plan": loadgen.describe_plan(plan), "time_scale": args.time_scale,
                          "configs": summarize_live(runs), "ttft_p99_ratio_interval": ttft_interval(runs),
                          "runs": [asdict(r) for r in runs]}  # asdict recurses into the records
        # the live runs took many minutes: on disk before anything else can fail
        write_json(RESULTS_DIR / f"{args.out}.json", result)
        simulated = {name: simulated_ttfts(scenarios[name], name) for name in dict.fromkeys(order)}
        result["live"]["slowest"] = [{"config": r.name, "run": r.run,
                                      "requests": [asdict(x) for x in slowest(r, SLOWEST, simulated[r.name])]}
                                     for r in runs]
    if not args.skip_sim:
        summaries = run_simulator(args.scenario, [n for n in CONFIGS if n in scenarios], RESULTS_DIR)
        result["simulator"] = sim_rows(summaries)
    print_tables(result)
    if "live" in result:
        print_slowest(runs, SLOWEST, simulated)
    write_json(RESULTS_DIR / f"{args.out}.json", result)
    plot(result, RESULTS_DIR / f"{args.out}.png")
    print(f"wrote {RESULTS_DIR / (args.out + '.json')} and {RESULTS_DIR / (args.out + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
