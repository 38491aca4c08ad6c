"""Run a scenario file's variants and write what came out: what `flotilla simulate` does.

Outputs go to `<out>/<scenario name>/`: `summary.json` (every variant's summary),
`records-<variant>.csv` (or `.jsonl`; one row per request) and the plots of
`bench.simulator.plots`. Variants run one after the other in this process, each
from the same seed (so from the same requests).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.simulator.metrics import headline, summarize
from bench.simulator.plots import plot_all
from bench.simulator.scenario import Scenario, ScenarioError, load_scenarios
from bench.simulator.simulation import SimResult, Simulation

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def run_file(path: str | Path, *, variants: Sequence[str] = (), out: Path = RESULTS_DIR,
             records: str | None = None, plots: bool | None = None, seed: int | None = None,
             progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Simulate the chosen variants of the scenario in `path` (all when none are named);
    `records`, `plots` and `seed` override the file's. Returns the summaries."""
    scenarios = load_scenarios(path)
    unknown = sorted(set(variants) - set(scenarios))
    if unknown:
        raise ScenarioError(f"{path}: no variant(s) {unknown} (variants: {sorted(scenarios)})")
    chosen = {name: _override(s, seed) for name, s in scenarios.items() if not variants or name in variants}
    first = next(iter(chosen.values()))
    target = out / first.name
    results: list[SimResult] = []
    summaries: list[dict[str, Any]] = []
    for name, scenario in chosen.items():
        progress(f"simulating {scenario.name} [{name}] ...")
        result = Simulation(scenario, name).run()
        summary = summarize(result)
        progress(headline(summary))
        fmt = records or scenario.output.records
        if fmt != "none":
            path_out = target / f"records-{name}.{fmt}"
            result.records.write(path_out, fmt)
            summary["records"] = str(path_out)
        results.append(result)
        summaries.append(summary)
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.json").write_text(json.dumps(summaries, indent=1))
    if plots if plots is not None else first.output.plots:
        written = plot_all(results, summaries, target)
        progress("plots: " + ", ".join(str(p) for p in written))
    progress(f"summary: {target / 'summary.json'}")
    return summaries


def _override(scenario: Scenario, seed: int | None) -> Scenario:
    if seed is None:
        return scenario
    return scenario.model_copy(update={"simulation": scenario.simulation.model_copy(update={"seed": seed})})
