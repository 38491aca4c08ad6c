"""The chaos run: steady load on a multi-node fleet while replicas, nodes, agents and the controller die.

    python -m bench.chaos [--requests 500] [--faults 20] [--seed N] [--short] [--out PATH]

It starts its own `ray.cluster_utils.Cluster` (head, two H100 and two L4 sim nodes, a
CPU node for vLLM), deploys a fleet with sim pools on both GPU types and vLLM on the
CPU, learns every prompt's fault-free text, then sends open-loop streaming load while
it injects faults on a timeline (see `bench.chaos.injector`). It prints requests
accepted, completed, failed with a clear error, lost and corrupted, recovery times and
replacement times; writes the JSON (`--out`, default bench/results/chaos.json) and a
timeline plot beside it. Exit status 1 when a request was lost or a stream corrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.chaos import report
from bench.chaos.cluster import OPERATOR_TOKEN, ChaosCluster, fleet_config, free_port
from bench.chaos.injector import ALL_KINDS, Injector, plan_faults, store_names
from bench.chaos.load import LoadClient, arrival_times, prompts, run_load
from bench.chaos.monitor import Monitor
from bench.report import RESULTS_DIR, machine, write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=None, help="requests to send (default 500; --short 60)")
    p.add_argument("--faults", type=int, default=None, help="faults to inject (default 21; --short 7)")
    p.add_argument("--rate", type=float, default=None, help="requests per second (default 2.5; --short 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short", action="store_true", help="a small run for the tests: one fault of each kind")
    p.add_argument("--vllm-replicas", type=int, default=None, help="vLLM-on-CPU replicas (default 2; --short 1)")
    p.add_argument("--hang-timeout", type=float, default=3.0, help="recovery.hang_timeout_s of the fleet")
    p.add_argument("--no-stores", action="store_true", help="run the fleet without KV-cache stores")
    p.add_argument("--deadline", type=float, default=180.0, help="a stream not ended this long after it was sent "
                                                                  "is lost (s)")
    p.add_argument("--kinds", default=",".join(ALL_KINDS), help="fault kinds to inject, comma separated")
    p.add_argument("--out", type=Path, default=None, help="the JSON to write (default bench/results/chaos.json, "
                                                          "chaos-short.json with --short)")
    args = p.parse_args(argv)
    short = args.short
    args.requests = args.requests or (60 if short else 500)
    args.faults = args.faults or (7 if short else 21)
    args.rate = args.rate or (1.5 if short else 2.5)
    args.vllm_replicas = (1 if short else 2) if args.vllm_replicas is None else args.vllm_replicas
    args.out = args.out or RESULTS_DIR / ("chaos-short.json" if short else "chaos.json")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(ALL_KINDS))
    if unknown:
        p.error(f"--kinds: unknown fault kind(s) {unknown} (known: {', '.join(ALL_KINDS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = None
    if args.vllm_replicas:
        from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

        model_dir = str(build_local_model(DEFAULT_MODEL_DIR, progress=None))
    config = fleet_config(model_dir or "", free_port(), args.vllm_replicas, args.hang_timeout, not args.no_stores)
    began = time.monotonic()
    print(f"chaos: starting a {len(config.pools)}-pool fleet on a local multi-node Ray cluster", flush=True)
    cluster = ChaosCluster.start()
    try:
        cluster.deploy(config)
        print(f"chaos: fleet ready in {time.monotonic() - began:.0f}s", flush=True)
        # the load on its own thread; this one adds nodes when asked (see MainThreadCalls)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(asyncio.run, _run(args, cluster))
            cluster.main.serve_until(running)
            result, timeline = running.result()
    finally:
        cluster.shutdown()
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["machine"] = machine()
    result["command"] = "python -m bench.chaos " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out, result)
    report.plot(*timeline, args.out.with_suffix(".png"),
                f"chaos: {args.requests} requests, {sum(i['kind'] != 'add_node' for i in result['injections'])} faults "
                f"(seed {args.seed})")
    print(report.format_table(result["summary"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    q = result["summary"]["requests"]
    return 1 if q["lost"] or q["corrupted"] else 0


async def _run(args: argparse.Namespace, cluster: ChaosCluster) -> tuple[dict, tuple]:
    """The load and the faults; returns the result to write and what the timeline plot needs."""
    config = cluster.config
    rng = np.random.default_rng(args.seed)
    zero = time.monotonic()

    def clock() -> float:
        return time.monotonic() - zero

    vllm = next((p.model for p in config.pools if p.engine == "vllm"), None)
    client = LoadClient(cluster.base_url, prompts("sim-llama-7b", vllm), args.deadline, clock)
    await client.learn_references()
    print(f"chaos: references of {len(client.references)} prompts learned", flush=True)
    duration = args.requests / args.rate
    kinds = args.kinds
    if "kill_store" in kinds and not store_names(config.namespace):
        print("chaos: this fleet runs no KV-cache stores; no store kills", flush=True)
        kinds = [k for k in kinds if k != "kill_store"]
    plan = plan_faults(args.faults, kinds, duration, rng)
    admin = f"{cluster.base_url}/admin/v1"
    monitor = Monitor(admin, OPERATOR_TOKEN, clock)
    injector = Injector(cluster, admin, OPERATOR_TOKEN, config.namespace, rng, clock)
    stop = asyncio.Event()
    print(f"chaos: {args.requests} requests over ~{duration:.0f}s, {len(plan)} faults", flush=True)
    start = time.monotonic()
    zero = start  # the run's clock starts with the load
    watching = asyncio.create_task(monitor.run(stop))
    injecting = asyncio.create_task(injector.run(plan, start))
    records = await run_load(client, arrival_times(args.requests, duration, rng), rng, start)
    injections = await injecting
    await asyncio.sleep(2.0)  # a last fault's records reach the log
    stop.set()
    await watching
    await injector.close()
    await client.close()
    desired = {p.name: p.replicas for p in config.pools}
    summary = report.summarize(records, injections, monitor, desired, {p.name: p.max_replicas for p in config.pools})
    timeline = (records, injections + injector.readded, monitor.samples)
    return {
        "summary": summary,
        "references": {str(i): t for i, t in client.references.items()},
        "prompts": [asdict(p) for p in client.prompts],
        "injections": [asdict(i) for i in injections + injector.readded],
        "faults": sorted(monitor.faults.values(), key=lambda f: f["detected_at"]),
        "requests": [_compact(r) for r in records],
    }, timeline


def _compact(r) -> dict:
    return {"index": r.index, "prompt": r.prompt, "model": r.model, "stream_id": r.stream_id, "status": r.status,
            "outcome": r.outcome, "corrupted": r.corrupted, "sent_s": round(r.sent_s, 3),
            "done_s": round(r.done_s, 3) if r.done_s is not None else None, "chunks": len(r.chunk_times_s),
            "max_gap_s": round(r.max_gap_s, 3), "error": r.error}


if __name__ == "__main__":
    sys.exit(main())
