"""PNG plots of one scenario's variants, side by side (matplotlib, no display needed).

- `latency.png`: CDFs of TTFT, TPOT and end-to-end latency, one line per variant;
- `timeline.png`: requests in flight, running batch, queue and fleet tokens/s over
  time, from the control ticks;
- `summary.png`: bars of p99 TTFT, p99 TPOT, SLO attainment and $ per million output
  tokens per variant;
- `power.png` (when the fleet's draw is tracked): its draw against the power budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.simulator.simulation import SimResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(results: Sequence[SimResult], summaries: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [latency_cdfs(results, out / "latency.png"), timeline(results, out / "timeline.png"),
               summary_bars(summaries, out / "summary.png")]
    if any(s.power_w is not None for r in results for s in r.samples):
        written.append(power_timeline(results, out / "power.png"))
    return written


def latency_cdfs(results: Sequence[SimResult], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for result in results:
        book = result.records
        ok = book.labelled("status") == "ok"
        for ax, column in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
            values = np.sort(book.column(column)[ok])
            values = values[~np.isnan(values)]
            if values.size:
                ax.plot(values * 1e3, np.arange(1, values.size + 1) / values.size, label=result.variant)
    for ax, title in zip(axes, ("TTFT", "TPOT", "end-to-end")):
        ax.set(xscale="log", xlabel=f"{title} (ms)", ylabel="fraction of requests", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results[0].scenario.name}: latency CDFs")
    return _save(fig, plt, path)


def timeline(results: Sequence[SimResult], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
    panels = (("in_flight", "requests in the ingress"), ("running", "running (batched) on replicas"),
              ("waiting", "queued on replicas"), ("tokens_per_s", "output tokens/s, fleet"))
    for result in results:
        t = np.array([s.t for s in result.samples])
        for ax, (field, _) in zip(axes.flat, panels):
            ax.plot(t, [getattr(s, field) for s in result.samples], label=result.variant, lw=1)
        for fault in result.faults:
            for ax in axes.flat:
                ax.axvline(fault.disruption.at, color="red", ls=":", lw=0.8)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set(title=title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set(xlabel="virtual time (s)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{results[0].scenario.name}: fleet over time (red: faults)")
    return _save(fig, plt, path)


def power_timeline(results: Sequence[SimResult], path: Path) -> Path:
    """The fleet's draw (averaged over each control period) against its budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 4.5))
    budget_drawn = False
    for result in results:
        samples = [s for s in result.samples if s.power_w is not None]
        t = np.array([s.t for s in samples])
        ax.plot(t, np.array([s.power_w for s in samples]) / 1e3, label=result.variant, lw=0.8)
        budget = [np.nan if s.budget_w is None else s.budget_w / 1e3 for s in samples]
        if not budget_drawn and not np.all(np.isnan(budget)):
            ax.plot(t, budget, color="black", ls="--", lw=1.2, label="budget")
            budget_drawn = True
    ax.set(xlabel="virtual time (s)", ylabel="GPU power (kW)",
           title=f"{results[0].scenario.name}: fleet power against its budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def summary_bars(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    names = [s["variant"] for s in summaries]
    panels = (
        ("p99 TTFT (ms)", [_ms(s["latency_s"]["ttft"]["p99"]) for s in summaries]),
        ("p99 TPOT (ms)", [_ms(s["latency_s"]["tpot"]["p99"]) for s in summaries]),
        ("SLO attainment (%)", [100 * (s["slo"]["all"] or 0) for s in summaries]),
        ("$ per million output tokens", [s["cost"]["usd_per_million_output_tokens"] or 0 for s in summaries]),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(names)), values, color=plt.get_cmap("tab10")(np.arange(len(names)) % 10))
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(title=title)
    fig.suptitle(f"{summaries[0]['scenario']}: variants compared")
    return _save(fig, plt, path)


def _ms(seconds: float | None) -> float:
    return 0.0 if seconds is None else seconds * 1e3


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
