"""Decision time of `Router.pick` and build time of `RoutingTable.from_view`, by fleet size.

    python -m bench.routing_decision_time [--requests 3000] [--seed 7]

Builds synthetic fleet views of 16, 256 and 1,024 replicas: two models, a mix of
H100/A100/L4 replicas with their speeds, load spread from idle to full, and prefix
caches made of shared system prompts (Zipf-popular) plus the conversations each
replica served. Requests draw their prompt sizes from the Azure LLM inference trace
(conversation set) and either continue a cached conversation, start one on a system
prompt, or share nothing. One router agent picks, books each pick and expires its
bookings against a fresh view every simulated second, at 500 requests/s.

Prints p50/p99 per size, and writes a plot and the figures (JSON) to bench/results/.
Target: p99 of `pick` under 1 ms at 1,024 replicas.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from policies.bookings import Bookings
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, SloClass
from policies.routing import Router, RoutingTable

TRACE = Path("/work/shared/data/traces/azure_llm_inference_2023_conv.csv")
RESULTS = Path(__file__).parent / "results"
SIZES = (16, 256, 1024)
BLOCK = 16
MODELS = ("llama-3-8b", "qwen-2.5-32b")
# gpu type: (share, max_batch_tokens_per_s, prefill_tokens_per_s, decode_step_s, kv_blocks_total);
# rough figures for an 8B model: routing only compares them
GPUS = {
    "H100": (0.4, 6000.0, 20000.0, 0.025, 30000),
    "A100": (0.35, 3500.0, 11000.0, 0.035, 18000),
    "L4": (0.25, 900.0, 3000.0, 0.06, 4000),
}
SLOS = (SloClass("default", ttft_s=2.0, tpot_s=0.1), SloClass("interactive", 0.5, 0.05, 1))
REQUESTS_PER_S = 500.0
VIEW_PERIOD_S = 1.0


@dataclasses.dataclass
class Prefixes:
    """Synthetic chained block hashes of one model: system prompts and conversations."""

    systems: list[np.ndarray]
    popularity: np.ndarray  # Zipf weights over systems
    conversations: list[np.ndarray]  # each extends a system prompt
    holder: list[int]  # replica index holding each conversation


def prompt_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    with TRACE.open() as f:
        tokens = np.array([int(row["ContextTokens"]) for row in csv.DictReader(f)])
    return rng.choice(np.clip(tokens, BLOCK, 16384), size=n)


def new_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63, size=n, dtype=np.uint64)


def build_view(rng: np.random.Generator, n: int) -> tuple[FleetView, dict[str, Prefixes]]:
    """A fleet of `n` replicas with load and prefix caches, and each model's prefixes."""
    gpus = rng.choice(list(GPUS), size=n, p=[g[0] for g in GPUS.values()])
    models = rng.choice(MODELS, size=n, p=[0.7, 0.3])
    prefixes = {m: _prefixes(rng, np.flatnonzero(models == m)) for m in MODELS}
    replicas = []
    for i in range(n):
        p = prefixes[models[i]]
        held = [p.systems[s] for s in rng.choice(len(p.systems), 6, p=p.popularity)]
        held += [c for c, h in zip(p.conversations, p.holder) if h == i]
        _, cap, prefill, step, kv_total = GPUS[gpus[i]]
        load = rng.uniform(0.0, 1.0)
        waiting = int(rng.poisson(8 * load))
        replicas.append(
            ReplicaSnapshot(
                replica_id=f"{models[i]}-{gpus[i].lower()}-{i:04d}",
                model=str(models[i]),
                pool=f"{gpus[i].lower()}-pool",
                gpu_type=str(gpus[i]),
                node_id=f"node-{i // 8}",
                state=ReplicaState.READY if rng.random() > 0.02 else ReplicaState.DRAINING,
                running=int(64 * load),
                waiting=waiting,
                waiting_prompt_tokens=waiting * 900,
                kv_blocks_used=int(kv_total * load * 0.9),
                kv_blocks_total=kv_total,
                tokens_per_s=cap * load * 0.8,
                observed_at=0.0,
                prefill_tokens_per_s=prefill,
                decode_step_s=step,
                max_batch_tokens_per_s=cap,
                max_queue=64,
                cached_block_hashes=frozenset(int(h) for b in held for h in b),
            )
        )
    return FleetView(1, 0.0, tuple(replicas), SLOS), prefixes


def _prefixes(rng: np.random.Generator, rows: np.ndarray) -> Prefixes:
    systems = [new_hashes(rng, int(k)) for k in rng.integers(8, 64, size=32)]
    popularity = 1.0 / np.arange(1, 33) ** 1.1
    popularity /= popularity.sum()
    conversations, holder = [], []
    for row in rows:  # each replica served ~12 conversations of 10..150 blocks
        for _ in range(12):
            s = systems[rng.choice(32, p=popularity)]
            conversations.append(np.concatenate([s, new_hashes(rng, int(rng.integers(10, 150)))]))
            holder.append(int(row))
    return Prefixes(systems, popularity, conversations, holder)


def make_requests(
    rng: np.random.Generator, prefixes: dict[str, Prefixes], count: int
) -> list[RoutingRequest]:
    lengths = prompt_lengths(rng, count)
    out = []
    for i, tokens in enumerate(lengths):
        model = MODELS[int(rng.random() > 0.7)]
        p = prefixes[model]
        kind = rng.random()
        if kind < 0.5 and p.conversations:  # next turn of a cached conversation
            base = p.conversations[rng.integers(len(p.conversations))]
        elif kind < 0.9:  # new conversation on a system prompt
            base = p.systems[rng.choice(len(p.systems), p=p.popularity)]
        else:
            base = np.empty(0, dtype=np.uint64)
        blocks = np.concatenate([base, new_hashes(rng, max(1, int(tokens) // BLOCK))])
        out.append(
            RoutingRequest(
                request_id=f"req-{i}",
                model=model,
                prompt_tokens=len(blocks) * BLOCK + 7,
                max_tokens=int(rng.integers(16, 512)),
                block_hashes=tuple(int(h) for h in blocks),
                slo_class="interactive" if rng.random() < 0.3 else "default",
            )
        )
    return out


def time_picks(
    router: Router, view: FleetView, requests: list[RoutingRequest], with_bookings: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-request `pick` wall and CPU times (seconds), booking each pick and expiring
    the bookings against a refreshed view every simulated second."""
    table = RoutingTable.from_view(view)
    bookings = Bookings("bench-agent") if with_bookings else None
    wall, cpu = np.empty(len(requests)), np.empty(len(requests))
    picks_per_view = int(REQUESTS_PER_S * VIEW_PERIOD_S)
    for i, request in enumerate(requests):
        now = i / REQUESTS_PER_S
        if bookings is not None and i and i % picks_per_view == 0:
            bookings.expire(_refreshed(view, now - 0.2), now)
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        decision = router.pick(request, table, bookings, now)
        cpu[i] = (time.thread_time_ns() - c0) * 1e-9
        wall[i] = (time.perf_counter_ns() - t0) * 1e-9
        if bookings is not None and decision.routed:
            bookings.book(decision.replica_id, request.prompt_tokens, now)
    return wall, cpu


def _refreshed(view: FleetView, observed_at: float) -> FleetView:
    replicas = tuple(dataclasses.replace(r, observed_at=observed_at) for r in view.replicas)
    return dataclasses.replace(view, replicas=replicas)


def time_builds(view: FleetView, repeats: int) -> np.ndarray:
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        RoutingTable.from_view(view)
        times[i] = (time.perf_counter_ns() - t0) * 1e-9
    return times


def machine() -> str:
    """CPU model, cores and versions: what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, {platform.system()} {platform.release()}"
    )


def stats(times: np.ndarray) -> dict[str, float]:
    ms = times * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "n": int(ms.size),
    }


def plot(results: dict[int, dict[str, dict[str, float]]], host: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].axhline(1.0, color="red", lw=0.8, label="1 ms target (p99)")
    for ax, keys, title in (
        (axes[0], ("pick", "pick_cpu"), "Router.pick (per request; wall and CPU time)"),
        (axes[1], ("from_view",), "RoutingTable.from_view (per view)"),
    ):
        for key in keys:
            for q, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
                ax.plot(sizes, [results[s][key][q] for s in sizes], style, label=f"{key} {q[:3]}")
        ax.set(xscale="log", yscale="log", xlabel="replicas", ylabel="ms", title=title)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(host, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(router: Router, rng: np.random.Generator, n: int, args) -> dict[str, dict]:
    view, prefixes = build_view(rng, n)
    requests = make_requests(rng, prefixes, args.requests)
    time_picks(router, view, requests[:200], with_bookings=True)  # warm caches and code paths
    wall, cpu = time_picks(router, view, requests, with_bookings=True)
    bare_wall, _ = time_picks(router, view, requests, with_bookings=False)
    return {
        "pick": stats(wall),
        "pick_cpu": stats(cpu),
        "pick_no_bookings": stats(bare_wall),
        "from_view": stats(time_builds(view, args.builds)),
        "cached_block_hashes": {"total": sum(len(r.cached_block_hashes) for r in view.replicas)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="picks timed per fleet size")
    parser.add_argument("--builds", type=int, default=20, help="table builds timed per size")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    router = Router()
    host = machine()
    print(f"machine: {host}; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for n in SIZES:
        r = results[n] = measure(router, rng, n, args)
        print(
            f"{n:5d} replicas, {r['cached_block_hashes']['total'] / n:5.0f} cached hashes each | "
            f"pick p50 {r['pick']['p50_ms']:.3f} p99 {r['pick']['p99_ms']:.3f} ms "
            f"(CPU p50 {r['pick_cpu']['p50_ms']:.3f} p99 {r['pick_cpu']['p99_ms']:.3f}; "
            f"no bookings p50 {r['pick_no_bookings']['p50_ms']:.3f} "
            f"p99 {r['pick_no_bookings']['p99_ms']:.3f}) | from_view "
            f"p50 {r['from_view']['p50_ms']:.1f} p99 {r['from_view']['p99_ms']:.1f} ms"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} (others share this machine)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "routing_decision_time"
    out.with_suffix(".json").write_text(json.dumps({"machine": host, "results": results}, indent=2))
    plot(results, host, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
