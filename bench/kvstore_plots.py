"""Plots of the KV-store benchmarks (`bench.kvstore_ttft`, `bench.kvstore_throughput`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 — after choosing the headless backend


def plot_ttft(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    """Grouped bars: TTFT of each way of serving a long prefix, one group per engine and length."""
    groups = list(results)
    ways = list(next(iter(results.values()))) if results else []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(ways))
    for i, way in enumerate(ways):
        values = [results[g][way]["ttft_s"] * 1e3 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=way)
    ax.set_xticks([x + width * (len(ways) - 1) / 2 for x in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("A long shared prefix: cold, own prefix cache, a store on the same node, on another node")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(results: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Throughput of put and get against a memory copy, by block size, with and without checksums."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, checksum in zip(axes, ("on", "off")):
        rows = {k: v for k, v in results.items() if k.rstrip().endswith(checksum)}
        sizes = [k.split("KiB")[0].strip() + " KiB" for k in rows]
        for what in next(iter(rows.values()), {}):
            ax.plot(sizes, [row[what] for row in rows.values()], marker="o", label=what)
        ax.set_title(f"checksums {checksum}")
        ax.set_xlabel("block size")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s of block bytes")
    axes[0].legend(fontsize=8)
    fig.suptitle("KV-store put/get against a plain memory copy of the same bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
