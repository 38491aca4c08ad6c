"""`flotilla bench [NAME [ARGS...]]`: list the benchmarks in `bench/`, or run one.

A benchmark is a module of the `bench` package with a `main` and a docstring whose
first line says what it measures; `flotilla bench NAME ARGS` is `python -m bench.NAME ARGS`
(each prints its figures, writes JSON and a plot under `bench/results/`).
"""

from __future__ import annotations

import argparse
import ast
import pkgutil
import runpy
import sys
from pathlib import Path

# helpers of the benchmarks, not benchmarks themselves
_NOT_BENCHMARKS = {"loadgen", "report", "traces", "migration_downtime_report", "migration_fleet",
                   "migration_trace_report", "simulator", "time_scale"}


def register(commands) -> None:
    bench = commands.add_parser("bench", help="list the benchmarks, or run one (`flotilla bench NAME --help`)")
    bench.add_argument("name", nargs="?", help="the benchmark (a module of bench/); none: list them")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    bench.set_defaults(run=run)


def benchmarks() -> dict[str, str]:
    """Benchmark name → the first line of its docstring."""
    import bench

    found = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name in _NOT_BENCHMARKS:
            continue
        path = Path(bench.__path__[0]) / (f"{info.name}/__main__.py" if info.ispkg else f"{info.name}.py")
        if not path.exists():
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[info.name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return dict(sorted(found.items()))


def run(args: argparse.Namespace) -> int:
    known = benchmarks()
    if not args.name:
        width = max(map(len, known))
        for name, what in known.items():
            print(f"{name:<{width}}  {what}")
        return 0
    if args.name not in known:
        print(f"no benchmark {args.name!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    sys.argv = [f"bench.{args.name}", *args.args]
    runpy.run_module(f"bench.{args.name}", run_name="__main__", alter_sys=True)
    return 0
