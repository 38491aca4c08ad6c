"""What the KV-store index costs routing: `Router.pick` with and without store hits.

    python -m bench.kvstore_routing [--replicas 1024] [--per-node 8] [--requests 3000]

Takes `bench.routing_decision_time`'s synthetic fleet (its replicas, prefix caches and
requests), puts the replicas on nodes of `--per-node` each, and gives every node a
KV-cache store holding what its replicas hold plus every system prompt (a warm
cluster-wide cache). Times the same requests through the same router with
`store_hit_weight` 0 (stores ignored: the code path of a fleet without stores) and
0.5, side by side in one run; prints p50/p99 of wall and CPU time per pick and the
table build time, and writes bench/results/kvstore_routing.json and .png. Target: p99
pick under 1 ms at 1,024 replicas.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import RESULTS_DIR, machine, write_json
from bench.routing_decision_time import build_view, make_requests, time_picks
from policies.fleet_view import FleetView, StoreSnapshot
from policies.routing import Router, RoutingTable


def with_stores(view: FleetView, prefixes, per_node: int, weight: float) -> FleetView:
    replicas = tuple(dataclasses.replace(r, node_id=f"node-{i // per_node}") for i, r in enumerate(view.replicas))
    systems = frozenset(int(h) for p in prefixes.values() for s in p.systems for h in s)
    held: dict[str, set[int]] = {}
    for r in replicas:
        held.setdefault(r.node_id, set(systems)).update(r.cached_block_hashes)
    stores = tuple(StoreSnapshot(f"kvstore-{n}", n, frozenset(h)) for n, h in sorted(held.items()))
    return dataclasses.replace(view, replicas=replicas, stores=stores, store_hit_weight=weight)


def percentiles(seconds: np.ndarray) -> str:
    p50, p99 = np.percentile(seconds * 1e3, [50, 99])
    return f"p50 {p50:.3f} p99 {p99:.3f} ms"


def _ms(seconds: np.ndarray) -> dict[str, float]:
    p50, p99 = np.percentile(seconds * 1e3, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(2)
    for i, row in enumerate(rows):
        values = [row["cpu"]["p50_ms"], row["cpu"]["p99_ms"]]
        ax.bar(x + (i - 0.5) * 0.4, values, 0.4, label=f"store_hit_weight {row['store_hit_weight']:.1f}")
    ax.set_xticks(x, ["p50", "p99"])
    ax.set_ylabel("CPU ms per pick")
    ax.axhline(1.0, color="grey", linestyle=":", label="target (p99)")
    ax.set_title(f"Router.pick with and without the KV-store index ({rows[0]['replicas']} replicas)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1024)
    parser.add_argument("--per-node", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="kvstore_routing")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    view, prefixes = build_view(rng, args.replicas)
    requests = make_requests(rng, prefixes, args.requests)
    router = Router()
    print(f"{args.replicas} replicas on {args.replicas // args.per_node} nodes; "
          f"load average {os.getloadavg()[0]:.2f} (shared machine: compare the rows, not the numbers)")
    rows = []
    for weight in (0.0, 0.5):
        staged = with_stores(view, prefixes, args.per_node, weight)
        began = time.perf_counter()
        table = RoutingTable.from_view(staged)
        build_s = time.perf_counter() - began
        wall, cpu = time_picks(router, staged, requests, with_bookings=True)
        score = np.mean([router.pick(q, table, None, 0.0).scores.get("prefix", 0.0) for q in requests])
        print(f"store_hit_weight {weight:.1f}: pick wall {percentiles(wall)}, CPU {percentiles(cpu)}; "
              f"from_view {build_s * 1e3:.0f} ms; mean prefix score of the picks {score:.3f}")
        rows.append({"store_hit_weight": weight, "replicas": args.replicas, "nodes": args.replicas // args.per_node,
                     "wall": _ms(wall), "cpu": _ms(cpu), "from_view_ms": build_s * 1e3,
                     "mean_prefix_score": float(score)})
    out = RESULTS_DIR / args.out
    write_json(out.with_suffix(".json"), {"machine": machine(), "argv": sys.argv[1:], "rows": rows})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
