"""Calibration: the simulator against the live system, the performance model against GPUs.

    python -m bench.calibration [--scenario bench/scenarios/calibration.yaml] [--seconds 60]
                                [--time-scale 1,8]

1. Live: the scenario's fleet (sim engines, every step sleeping its modelled time times
   the time scale) on an in-process Ray head (`orchestrator.embedded`), the scenario's
   trace slice replayed open loop over HTTP with `bench.loadgen` (streaming, the same
   arrival times and lengths, random byte prompts), its arrivals spread by the time scale
   and the latencies measured divided by it. At time scale 1 the fleet runs at the GPU's
   pace; on this 2-core machine the live path's own work (Serve's proxy, the ingress,
   the router agent and replica actors streaming every token through Python) then
   competes with itself for the CPU and grows with the load. At time scale k the same
   requests arrive k times more slowly into engines k times slower: the fleet sees the
   scenario's load in slow motion while the per-token CPU work per real second falls k
   times. What is compared there is the part the simulator models: batching, KV
   accounting, routing and queueing (`bench.time_scale`). Each scale is one live run.
2. Simulated: the same scenario through `bench.simulator`.
3. The gap the simulator does not model, measured rather than fudged: requests sent
   one at a time to the idle live fleet (a 16-token prompt for 2 tokens; one prompt for
   200 tokens) against the model's own times for them give the fixed per-request
   overhead (HTTP, ingress, router and replica calls) and the per-token streaming one.
4. The performance model's per-step times against Vidur's measured operator timings
   (`bench.perfmodel_check`, with the efficiencies the engines ship with), per GPU.

Prints p50/p99 TTFT and TPOT side by side with the % difference and writes
`bench/results/calibration/calibration.json` and `calibration.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import loadgen
from bench.report import RequestRecord, machine
from bench.simulator.scenario import Scenario, load_scenarios
from bench.simulator.simulation import SimResult, Simulation, build_workload
from bench.time_scale import slowed
from policies.perfmodel import BatchShape, StepTimeModel, gpu_spec

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "bench" / "scenarios" / "calibration.yaml"
OUT_DIR = REPO / "bench" / "results" / "calibration"
_BYTE_VOCABULARY = np.arange(256)  # the sim engines' byte tokenizer: ids 0-255 are bytes
_PROBE_SHORT, _PROBE_LONG = (16, 2), (64, 200)  # (prompt, output) tokens of the probes


@dataclass(frozen=True)
class Overhead:
    """What the live path adds to the model's times, from requests sent to an idle fleet."""

    ttft_s: float  # per request: live TTFT minus the modelled prefill step
    tpot_s: float  # per output token: live TPOT minus the modelled decode step


def with_window(scenario: Scenario, seconds: float) -> Scenario:
    """The scenario with its trace cut to its first `seconds`."""
    trace = scenario.workload.trace
    start = trace.window_s[0] if trace.window_s else 0.0
    workload = scenario.workload.model_copy(
        update={"trace": trace.model_copy(update={"window_s": (start, start + seconds)})})
    return scenario.model_copy(update={"workload": workload})


def plan_of(scenario: Scenario, time_scale: float = 1.0) -> list[loadgen.PlannedRequest]:
    """The simulator's requests (lengths, and times spread by `time_scale`) as a load plan
    with byte prompts."""
    rng = np.random.default_rng(scenario.simulation.seed)
    workload = build_workload(scenario, np.random.default_rng([scenario.simulation.seed, 0]))
    return [loadgen.PlannedRequest(a.number, a.time_s * time_scale,
                                   tuple(int(t) for t in rng.choice(_BYTE_VOCABULARY, a.prompt_tokens)),
                                   a.output_tokens) for a in workload.arrivals()]


def replay_live(scenario: Scenario, plan: list[loadgen.PlannedRequest], progress=print,
                time_scale: float = 1.0) -> tuple[list[RequestRecord], Overhead]:
    """Replay `plan` against the scenario's fleet served live, its sim engines `time_scale`
    times slower than the GPU (`plan_of(scenario, time_scale)` spreads the arrivals to
    match); then probe the overhead. Records are as measured (real seconds); the overhead
    is in the GPU's seconds (divided by `time_scale`).

    The fleet runs on a Ray cluster of its own (`ray.cluster_utils.Cluster`, one head
    with the resources `orchestrator.embedded` would give it), so a Ray already running
    on the machine is neither joined nor disturbed."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from orchestrator.app import build_app
    from orchestrator.controller_client import ControllerClient
    from orchestrator.embedded import APP_NAME, head_resources

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fleet = slowed(scenario.fleet, time_scale)
    config = fleet.model_copy(update={
        "server": fleet.server.model_copy(update={"port": _free_port()}),
        "controller": fleet.controller.model_copy(update={"metrics_port": 0})})
    model = scenario.model_name
    base = f"http://{config.server.host}:{config.server.port}/v1"
    res = head_resources(config)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": res.resources})
    try:
        ray.init(address=cluster.address, namespace=config.namespace, logging_level="ERROR",
                 log_to_driver=False)
        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
        controller = _wait(lambda: _lookup(ControllerClient, config.namespace), 120, "the controller")
        if not asyncio.run(controller.wait_ready(timeout_s=300)):
            raise RuntimeError("the live fleet did not become ready in 300 s")
        asyncio.run(loadgen.warm_up(base, model, _BYTE_VOCABULARY))
        progress(f"replaying {len(plan)} requests over {plan[-1].at_s:.0f} s ...")
        records = asyncio.run(loadgen.run_load(base, model, plan))
        overhead = asyncio.run(_probe(base, model, scenario, time_scale))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return records, overhead


def _lookup(client_type, namespace: str):
    try:
        return client_type.lookup(namespace)
    except Exception:  # noqa: BLE001 — not created yet
        return None


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


async def _probe(base: str, model: str, scenario: Scenario, time_scale: float) -> Overhead:
    rng = np.random.default_rng(1)
    ttft, tpot = [], []
    for i in range(8):  # one at a time: nothing else runs
        for (prompt, output), out in ((_PROBE_SHORT, ttft), (_PROBE_LONG, tpot)):
            p = loadgen.PlannedRequest(i, 0.0, tuple(int(t) for t in rng.choice(_BYTE_VOCABULARY, prompt)), output)
            (record,) = await loadgen.run_load(base, model, [p])
            value = record.ttft_s if out is ttft else record.tpot_s
            if record.ok and value is not None:
                out.append(value / time_scale)
    perf = _model(scenario)
    prefill = perf.step_time(BatchShape.from_requests([(_PROBE_SHORT[0], 0)]))
    prompt, output = _PROBE_LONG
    decode = float(np.mean([perf.decode_time(1, prompt + k) for k in range(1, output)]))
    return Overhead(float(np.median(ttft)) - prefill, float(np.median(tpot)) - decode)


def _model(scenario: Scenario) -> StepTimeModel:
    pool = scenario.fleet.pools[0]
    return StepTimeModel(gpu_spec(pool.gpu_type), scenario.fleet.model(pool.model).transformer_spec())


def compare(live: list[RequestRecord], sim: SimResult, overhead: Overhead,
            time_scale: float = 1.0) -> dict[str, dict[str, float]]:
    """p50/p99 of TTFT and TPOT: live (divided by `time_scale`, the GPU's seconds),
    simulated, their % difference, and the simulated value plus the measured overhead
    (TTFT: + the fixed one; TPOT: + the per-token one)."""
    ok = [r for r in live if r.ok]
    values = {"ttft": [r.ttft_s / time_scale for r in ok],
              "tpot": [r.tpot_s / time_scale for r in ok if r.tpot_s is not None]}
    book = sim.records
    done = book.labelled("status") == "ok"
    simulated = {"ttft": book.column("ttft_s")[done], "tpot": book.column("tpot_s")[done]}
    added = {"ttft": overhead.ttft_s, "tpot": overhead.tpot_s}
    table = {}
    for metric in ("ttft", "tpot"):
        s = simulated[metric][~np.isnan(simulated[metric])]
        for q in (50, 99):
            lv, sv = float(np.percentile(values[metric], q)), float(np.percentile(s, q))
            table[f"{metric}_p{q}"] = {"live_s": lv, "sim_s": sv, "diff_pct": 100 * (sv - lv) / lv,
                                       "sim_plus_overhead_s": sv + added[metric],
                                       "diff_with_overhead_pct": 100 * (sv + added[metric] - lv) / lv}
    table["requests"] = {"live_ok": len(ok), "live_sent": len(live), "sim_ok": int(done.sum())}
    return table


def perfmodel_errors() -> dict[str, dict[str, float]]:
    """Per GPU, the shipped performance model's error against Vidur's operator timings:
    `step` is a transformer layer's operators other than attention summed per measured
    shape (a step is `layers` of them plus attention and the LM head), the rest are
    operator groups. Median and p90 of |predicted - measured| / measured."""
    from bench import perfmodel_check as pc

    points = pc.load_points()
    shipped = {gpu: pc.default_efficiency(gpu_spec(gpu)) for gpu in pc.VIDUR_GPUS.values()}
    table = pc.error_table(points, pc.predict(points, shipped))
    out: dict[str, dict[str, float]] = {}
    for (gpu, group), stats in table.items():
        name = "step" if group == "layer" else group
        out.setdefault(gpu, {})[name] = {"n": stats.n, "median": stats.median, "p90": stats.p90}
    return out


def format_table(table: dict, overhead: Overhead, time_scale: float) -> str:
    lines = [f"time scale {time_scale:g} (latencies in the GPU's seconds):",
             f"{'metric':<10} {'live':>9} {'sim':>9} {'diff':>8}   {'sim+overhead':>12} {'diff':>8}"]
    for key, row in table.items():
        if key == "requests":
            continue
        lines.append(f"{key:<10} {row['live_s'] * 1e3:8.1f}ms {row['sim_s'] * 1e3:8.1f}ms {row['diff_pct']:+7.1f}%"
                     f"   {row['sim_plus_overhead_s'] * 1e3:10.1f}ms {row['diff_with_overhead_pct']:+7.1f}%")
    r = table["requests"]
    lines.append(f"requests: live {r['live_ok']}/{r['live_sent']} ok, sim {r['sim_ok']} ok")
    lines.append(f"live overhead the simulator does not model: {overhead.ttft_s * 1e3:.1f} ms per request "
                 f"(TTFT), {overhead.tpot_s * 1e3:.2f} ms per output token (TPOT)")
    return "\n".join(lines)


def format_errors(errors: dict) -> str:
    lines = ["performance model vs Vidur operator timings (median / p90 abs. relative error):"]
    for gpu, groups in errors.items():
        cells = ", ".join(f"{g} {s['median']:.1%}/{s['p90']:.1%}" for g, s in groups.items() if g != "embed")
        lines.append(f"  {gpu:<10} {cells}")
    return "\n".join(lines)


def plot(runs: list[tuple[float, list[RequestRecord]]], sim: SimResult, path: Path) -> None:
    """CDFs of TTFT and TPOT: each live run (time scale, records) in the GPU's seconds, and the simulator's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    book = sim.records
    done = book.labelled("status") == "ok"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((axes[0], "ttft_s"), (axes[1], "tpot_s")):
        curves = [(np.sort([getattr(r, metric) / scale for r in live if r.ok and getattr(r, metric) is not None]),
                   f"live, time scale {scale:g} (Ray Serve, HTTP)") for scale, live in runs]
        sv = np.sort(book.column(metric)[done])
        curves.append((sv[~np.isnan(sv)], "simulated"))
        for values, label in curves:
            ax.plot(values * 1e3, np.arange(1, len(values) + 1) / len(values), label=label)
        ax.set(xscale="log", xlabel=f"{metric[:-2].upper()} (ms)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"calibration: {sim.scenario.description}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--seconds", type=float, default=60.0, help="trace slice replayed")
    parser.add_argument("--time-scale", default="1,8",
                        help="comma-separated: one live run per scale (engines that many times slower)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    scales = [float(x) for x in args.time_scale.split(",")]
    if not scales or min(scales) <= 0:
        parser.error(f"--time-scale: positive numbers, got {args.time_scale!r}")
    scenario = with_window(next(iter(load_scenarios(args.scenario).values())), args.seconds)
    sim = Simulation(scenario).run()
    runs, results = [], []
    for scale in scales:
        load = os.getloadavg()
        began = time.monotonic()
        live, overhead = replay_live(scenario, plan_of(scenario, scale), time_scale=scale)
        table = compare(live, sim, overhead, scale)
        print(format_table(table, overhead, scale))
        print(f"(live run {time.monotonic() - began:.0f} s; load average before it {load[0]:.1f} on "
              f"{os.cpu_count()} cores)\n", flush=True)
        runs.append((scale, live))
        results.append({"time_scale": scale, "table": table, "overhead": vars(overhead), "load_average": load[0]})
    errors = perfmodel_errors()
    print(format_errors(errors))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(
        {"scenario": scenario.name, "seconds": args.seconds, "runs": results, "perfmodel_vs_vidur": errors,
         "machine": machine()}, indent=1))
    plot(runs, sim, args.out / "calibration.png")
    print(f"wrote {args.out / 'calibration.json'} and {args.out / 'calibration.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
