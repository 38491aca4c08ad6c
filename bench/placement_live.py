"""The live placement manager following a workload shift, in the cluster simulator.

    python -m bench.placement_live [--speedup 4] [--seed 7]

The controller's own `PlacementManager` (the code the live controller runs: workload
window, capacities, solver, hysteresis and dwell, scale-out-then-drain transitions) drives
a simulated fleet of L4, A10G, A100-80GB and H100 pools serving Llama-2-7B, in virtual
time, fed with the simulator's finished requests. The workload: the `conv` trace (chat:
long answers) followed by the `code` trace (long prompts, few output tokens), each whole
and time-compressed by `speedup`; TTFT 2 s and TPOT 0.1 s (means, as planned). Three
fleets see the same requests:
- static: the cheapest fixed mix that carries each bucket's peak rate over both traces
  (the best a fleet sized once can do), held all run;
- live: starts like static, re-plans every 60 s over a 300 s window with the defaults
  (10% hysteresis, 600 s dwell, $0.10 per replica moved);
- eager: the same with no hysteresis, dwell or move cost.
A new replica takes 60 s to start (the simulator's default). Reported per fleet: $ (GPU
time × price, each replica from launch to stop), mean-SLO attainment, requests
completed / rejected / failed, the changes made, and the replicas per GPU type over time.

Writes bench/results/placement_live.{json,md} and placement_live.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.simulator.fleet import SimFleet
from bench.simulator.hooks import Actions, Tick
from bench.simulator.metrics import summarize
from bench.simulator.records import RecordBook
from bench.simulator.scenario import parse_scenario
from bench.simulator.simulation import Simulation
from bench.traces import load_trace
from orchestrator.config import FleetConfig, parse_config
from orchestrator.metrics import MetricsRegistry
from orchestrator.placement_manager import PlacementManager
from orchestrator.placement_planner import PlacementPlanner
from orchestrator.request_log import FinishedRequest
from policies.placement import PlacementProblem, PoolOption, solve_placement
from policies.workload import WorkloadProfile, characterise_span

RESULTS = Path(__file__).parent / "results"
MODEL = "llama-2-7b"
POOLS = (("l4", "L4"), ("a10g", "A10G"), ("a100", "A100-80GB"), ("h100", "H100"))
EAGER = {"min_relative_saving": 0.0, "min_dwell_s": 0.0, "move_cost_per_replica": 0.0}


def fleet_data(replicas: dict[str, int], placement: dict) -> dict:
    return {
        "models": [{"name": MODEL, "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096}],
        "pools": [{"name": name, "gpu_type": gpu, "model": MODEL, "replicas": replicas.get(name, 0),
                   "max_replicas": 64} for name, gpu in POOLS],
        "slo_classes": [{"name": "interactive", "ttft_s": 2.0, "tpot_s": 0.1, "priority": 10}],
        "placement": {"window_s": 300, "replan_period_s": 60, **placement},
    }


def shifted_trace(path: Path) -> tuple[list, list]:
    """conv then code, back to back, as one CSV (in a temporary directory: the traces stay
    where they are); returns both traces' rows."""
    conv, code = load_trace("conv"), load_trace("code")
    offset = conv[-1].arrival_s + (conv[-1].arrival_s - conv[0].arrival_s) / (len(conv) - 1)
    base = np.datetime64("2024-01-01T00:00:00", "ns")
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t, r in [(r.arrival_s, r) for r in conv] + [(offset + r.arrival_s, r) for r in code]:
        stamp = str(base + np.timedelta64(int(t * 1e9), "ns")).replace("T", " ")
        lines.append(f"{stamp},{r.prompt_tokens},{r.output_tokens}")
    path.write_text("\n".join(lines) + "\n")
    return list(conv), list(code)


def static_mix(config: FleetConfig, phases: list[list], speedup: float) -> dict[str, int]:
    """The cheapest fixed mix carrying, in every bucket, the higher of the two traces' rates
    (plus the planned headroom)."""
    planner, scheme = PlacementPlanner(), config.placement.buckets.scheme()
    profiles = [characterise_span(rows, scheme=scheme, model=MODEL).scaled(speedup) for rows in phases]
    peak = WorkloadProfile(MODEL, scheme, tuple(max(r) for r in zip(*(p.rates for p in profiles))), 1.0)
    pools = tuple(PoolOption(p.name, planner.capacity(config, p, scheme), p.price_per_hour,
                             max_replicas=p.max_replicas) for p in config.pools)
    plan = solve_placement(PlacementProblem((peak.scaled(1 + config.placement.headroom),), pools))
    assert plan.feasible, plan.problems
    return dict(plan.replicas)


class _SimPools:
    """`PoolSizes` over the simulator's fleet: a drain that does not replace shrinks the pool."""

    def __init__(self, fleet: SimFleet):
        self.fleet = fleet

    @property
    def desired(self) -> dict[str, int]:
        return self.fleet.desired

    def set_desired(self, pool: str, replicas: int) -> None:
        self.fleet.set_desired(pool, replicas)

    def drain(self, replica_id: str, replace: bool) -> None:
        pool = self.fleet.state.get(replica_id).pool
        if not replace:
            self.fleet.set_desired(pool, self.fleet.desired[pool] - 1)
        self.fleet.drain(replica_id)


@dataclass
class PlacementHook:
    """The live `PlacementManager` on the simulator's control ticks (virtual seconds). Wired
    to the simulation's fleet and record book after both exist (`attach`)."""

    config: FleetConfig
    observes_requests: bool = False
    now: float = 0.0
    trajectory: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t, replicas per GPU type)
    manager: PlacementManager | None = None
    _book: RecordBook | None = None
    _fed: int = 0  # record rows already handed to the manager

    def attach(self, sim: Simulation) -> None:
        self._book = sim.records
        self.manager = PlacementManager(self.config, sim.fleet.state, _SimPools(sim.fleet), MetricsRegistry(),
                                        lambda: self.now)

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        self.now = tick.now
        self.manager.advance(tick.now)
        if self.manager.replan_due(tick.now):
            self._feed()
            self.manager.replan_now()
        live: dict[str, int] = {}
        for r in tick.state.live():
            live[r.spec.gpu_type] = live.get(r.spec.gpu_type, 0) + 1
        self.trajectory.append((tick.now, live))

    def on_event(self, event, tick: Tick, actions: Actions) -> None:
        """The workload shift needs no timeline event."""

    def _feed(self) -> None:
        book = self._book
        rows = slice(self._fed, len(book))
        self.manager.record(FinishedRequest(MODEL, float(a), int(p), int(o)) for a, p, o in zip(
            book.column("arrival_s")[rows], book.column("prompt_tokens")[rows], book.column("output_tokens")[rows]))
        self._fed = rows.stop


def run_variant(name: str, csv: Path, replicas: dict[str, int], speedup: float, seed: int,
                placement: dict | None) -> tuple[dict, PlacementHook | None]:
    data = fleet_data(replicas, {"enabled": placement is not None, **(placement or {})})
    scenario = parse_scenario({"name": "placement-live", "fleet": data,
                               "workload": {"trace": {"name": str(csv), "speedup": speedup}},
                               "simulation": {"seed": seed}, "output": {"records": "none", "plots": False}})
    hook = PlacementHook(scenario.fleet) if placement is not None else None
    sim = Simulation(scenario, name, hooks=[hook] if hook else [])
    if hook:
        hook.attach(sim)
    result = sim.run()
    summary = summarize(result)
    changes = [{"at_s": t.started_at, "trigger": t.trigger, "state": t.state.value,
                "moves": {c.pool: c.target for c in t.steps.scale_out + t.steps.drain}}
               for t in (hook.manager.history if hook else ())]
    row = {"fleet": name, "usd": summary["cost"]["usd"], "gpu_hours": summary["cost"]["gpu_hours"],
           "slo_attainment": summary["slo"]["interactive"]["attainment"],
           "requests": summary["requests"], "changes": changes, "wall_s": result.perf.wall_s}
    return row, hook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=4.0, help="time compression of both traces")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rows, hooks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "conv-then-code.csv"
        phases = shifted_trace(csv)
        static = static_mix(parse_config(fleet_data({}, {})), phases, args.speedup)
        print(f"static mix (peak of each bucket over both traces): {static}", flush=True)
        for name, placement in (("static", None), ("live", {}), ("eager", EAGER)):
            row, hook = run_variant(name, csv, static, args.speedup, args.seed, placement)
            rows.append(row)
            hooks[name] = hook
            print(_line(row), flush=True)
    boundary = phases[0][-1].arrival_s / args.speedup
    report = {"speedup": args.speedup, "seed": args.seed, "static_mix": static, "shift_at_s": boundary,
              "fleets": rows, "trajectories": {n: h.trajectory[::20] for n, h in hooks.items() if h}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "placement_live.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "placement_live.md").write_text(_markdown(report))
    _plot(hooks, boundary, RESULTS / "placement_live.png")
    print(f"wrote {RESULTS / 'placement_live.json'}, .md and .png")


def _line(row: dict) -> str:
    r = row["requests"]
    return (f"{row['fleet']:<7} ${row['usd']:8.2f}  {row['gpu_hours']:7.2f} GPU-h  SLO {row['slo_attainment']:.1%}  "
            f"completed {r['completed']} rejected {r['rejected']} failed {r['failed']}  changes {len(row['changes'])}")


def _markdown(report: dict) -> str:
    lines = [f"# Live re-planning through a workload shift (conv then code, ×{report['speedup']:g})", "",
             f"Static mix: {report['static_mix']}; the traces switch at {report['shift_at_s']:.0f} s.", "",
             "| fleet | $ | GPU-h | SLO attainment | completed | rejected | failed | changes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["fleets"]:
        r = row["requests"]
        lines.append(f"| {row['fleet']} | {row['usd']:.2f} | {row['gpu_hours']:.2f} | {row['slo_attainment']:.1%} "
                     f"| {r['completed']} | {r['rejected']} | {r['failed']} | {len(row['changes'])} |")
    return "\n".join(lines) + "\n"


def _plot(hooks: dict[str, PlacementHook | None], boundary: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = {n: h for n, h in hooks.items() if h}
    fig, axes = plt.subplots(len(live), 1, figsize=(9, 3.2 * len(live)), sharex=True, squeeze=False)
    for ax, (name, hook) in zip(axes[:, 0], live.items()):
        t = np.array([p[0] for p in hook.trajectory])
        for _, gpu in POOLS:
            ax.step(t, [p[1].get(gpu, 0) for p in hook.trajectory], where="post", label=gpu)
        ax.axvline(boundary, color="grey", linestyle=":", label="conv → code")
        ax.set_ylabel("live replicas")
        ax.set_title(f"{name}: replicas per GPU type")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("virtual time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
