"""`flotilla simulate SCENARIO.yaml`: run Flotilla's policies on a simulated fleet.

Prints each variant's summary and writes records, `summary.json` and plots under
`bench/results/<scenario>/` (see `bench.simulator.runner`). No Ray cluster is started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(commands) -> None:
    sim = commands.add_parser("simulate", help="simulate a fleet scenario in virtual time")
    sim.add_argument("scenario", help="a scenario YAML file (see bench/scenarios/)")
    sim.add_argument("--variant", action="append", default=[], help="run only this variant (repeatable)")
    sim.add_argument("--out", default=None, help="results folder (default: bench/results)")
    sim.add_argument("--records", choices=("csv", "jsonl", "none"), default=None,
                     help="per-request records format (default: the scenario's)")
    sim.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sim.add_argument("--seed", type=int, default=None, help="override simulation.seed")
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.simulator.runner import RESULTS_DIR, run_file
    from bench.simulator.scenario import ScenarioError

    try:
        run_file(args.scenario, variants=args.variant, out=Path(args.out) if args.out else RESULTS_DIR,
                 records=args.records, plots=False if args.no_plots else None, seed=args.seed)
    except ScenarioError as e:
        print(e, file=sys.stderr)
        return 2
    return 0
