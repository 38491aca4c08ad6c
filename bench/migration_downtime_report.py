"""Tables and the plot of `bench.migration_downtime`: per engine, mode and context length,
the median downtime and its spread over repetitions, against one decode step.

Pure over the measured points (`migration_downtime.Point`), so a saved JSON can be
summarised again. Times in the tables are milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _stats(values: Sequence[float | None]) -> dict[str, float] | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def summarize(points: Sequence[Any], sim_step_s: Callable[[int], float]) -> list[dict[str, Any]]:
    """One row per (engine, context): both modes' downtimes, the decode step, the ratios."""
    rows = []
    for engine, context in sorted({(p.engine, p.context) for p in points}):
        mine = [p for p in points if (p.engine, p.context) == (engine, context)]
        measured_step = _stats([p.tpot_before_s for p in mine])
        step = sim_step_s(context) if engine == "sim" else (measured_step or {}).get("median")
        row: dict[str, Any] = {"engine": engine, "context": context, "decode_step_s": step,
                               "measured_tpot_s": measured_step}
        for mode in ("precopy", "naive"):
            done = [p for p in mine if p.mode == mode and p.outcome == "done"]
            row[mode] = {
                "attempts": sum(p.mode == mode for p in mine),
                "done": len(done),
                "failures": sorted({p.outcome for p in mine if p.mode == mode and p.outcome != "done"}),
                "client_s": _stats([p.client_downtime_s for p in done]),
                "ingress_s": _stats([p.ingress_downtime_s for p in done]),
                "precopy_s": _stats([p.precopy_s for p in done]),
                "rounds": _stats([p.rounds for p in done]),
                "source_slowdown": _stats([p.tpot_precopy_s / p.tpot_before_s - 1 for p in done
                                           if p.tpot_precopy_s and p.tpot_before_s]),
            }
        pre, naive = _median(row, "precopy"), _median(row, "naive")
        row["precopy_steps"] = pre / step if pre is not None and step else None
        row["naive_over_precopy"] = naive / pre if pre and naive is not None else None
        rows.append(row)
    return rows


def _median(row: dict, mode: str, key: str = "ingress_s") -> float | None:
    s = row[mode][key] or row[mode]["client_s"]
    return None if s is None else s["median"]


def checks(rows: Sequence[dict], target_steps: float) -> dict[str, Any]:
    """The targets: pre-copy flat in context and under `target_steps` decode steps at the
    longest sim context; naive growing with context (its least-squares slope and fit)."""
    out: dict[str, Any] = {}
    for engine in sorted({r["engine"] for r in rows}):
        mine = [r for r in rows if r["engine"] == engine]
        pre = [(r["context"], _median(r, "precopy")) for r in mine if _median(r, "precopy") is not None]
        naive = [(r["context"], _median(r, "naive")) for r in mine if _median(r, "naive") is not None]
        check: dict[str, Any] = {}
        if pre:
            longest = max(mine, key=lambda r: r["context"])
            check["precopy_longest_over_shortest"] = pre[-1][1] / pre[0][1]
            check["precopy_steps_at_longest"] = longest["precopy_steps"]
            check["precopy_below_target_steps"] = (longest["precopy_steps"] is not None
                                                   and longest["precopy_steps"] < target_steps)
        if len(naive) >= 2:
            x, y = np.array(naive, dtype=float).T
            slope, intercept = np.polyfit(x, y, 1)
            fit = 1 - np.sum((y - (slope * x + intercept)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)
            check["naive_ms_per_1k_tokens"] = slope * 1e6
            check["naive_linear_r2"] = float(fit)
            check["naive_longest_over_shortest"] = naive[-1][1] / naive[0][1]
        out[engine] = check
    return out


def print_tables(rows: Sequence[dict], check: dict[str, Any]) -> None:
    print("\nMigration downtime (the client's stall: last token from the source -> first from the target), "
          "ms: median [min-max] over repetitions; ingress = flotilla_migration_downtime_seconds")
    head = (f"{'engine':<6}{'context':>8}{'step':>7} | {'pre-copy ingress':>22}{'client':>20}{'steps':>6} | "
            f"{'naive ingress':>22}{'client':>20} | {'naive/pre':>9} | {'source slowdown':>20} {'n':>5}")
    print(head)
    for r in rows:
        pre, naive = r["precopy"], r["naive"]
        print(f"{r['engine']:<6}{r['context']:>8}{_ms(r['decode_step_s']):>7} | {_spread(pre['ingress_s']):>22}"
              f"{_spread(pre['client_s']):>20}{_num(r['precopy_steps']):>6} | {_spread(naive['ingress_s']):>22}"
              f"{_spread(naive['client_s']):>20} | {_num(r['naive_over_precopy']):>9} | "
              f"{_pct(pre['source_slowdown']):>20} {pre['done']}/{naive['done']:<3}")
    print("\nchecks:", {e: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()}
                        for e, c in check.items()})


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _spread(s: dict | None) -> str:
    return "-" if s is None else f"{s['median'] * 1e3:.1f} [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"


def _pct(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:+.1%} [{s['min']:+.0%},{s['max']:+.0%}]"


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({r["engine"] for r in rows})
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.6), squeeze=False)
    for ax, engine in zip(axes[0], engines):
        mine = [r for r in rows if r["engine"] == engine]
        x = np.array([r["context"] for r in mine])
        for mode, color in (("precopy", "tab:blue"), ("naive", "tab:red")):
            for key, style in (("ingress_s", "-o"), ("client_s", "--x")):
                s = [r[mode][key] for r in mine]
                keep = [i for i, v in enumerate(s) if v is not None]
                if not keep:
                    continue
                med = np.array([s[i]["median"] for i in keep]) * 1e3
                err = np.array([[s[i]["median"] - s[i]["min"], s[i]["max"] - s[i]["median"]] for i in keep]).T * 1e3
                ax.errorbar(x[keep], med, yerr=err, fmt=style, color=color, capsize=3,
                            label=f"{mode} ({key.removesuffix('_s')})")
        step = np.array([r["decode_step_s"] or np.nan for r in mine]) * 1e3
        ax.plot(x, step, ":", color="gray", label="1 decode step")
        ax.plot(x, 2 * step, ":", color="black", label="2 decode steps")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("downtime (ms)")
        ax.set_title(f"{engine}: {mine[0]['precopy']['attempts']} + {mine[0]['naive']['attempts']} moves per point")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(points: Sequence[Any], sim_step_s: Callable[[int], float], png: Path, target_steps: float,
           title: str = "live migration downtime vs context: pre-copy against abort-and-recompute") -> dict[str, Any]:
    """Summarise, print and plot; the JSON-ready summary."""
    rows = summarize(points, sim_step_s)
    check = checks(rows, target_steps)
    print_tables(rows, check)
    plot(rows, png, title)
    return {"rows": rows, "checks": check}
