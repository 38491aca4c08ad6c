"""`flotilla plan`: the cheapest GPU mix for a trace within an SLO, printed as a table.

    flotilla plan --trace conv --slo ttft=0.5,tpot=0.05 --model llama-2-7b \
        [--gpus H100,A100-80GB:2,L4] [--window 600] [--rate-scale 4] [--form sliced] [--json]

Without `--trace` it asks the running fleet instead (its observed workload, its pools):
`flotilla plan [--rate-scale 2] [--rate MODEL:PROMPT:OUTPUT:RPS]` is a dry run and
`flotilla plan --apply` moves the fleet to the plan now (see `orchestrator.cli._plan_api`).

A dry run of the placement solver (`policies.placement`) on a workload characterised from
a trace (`conv`, `code` or a CSV with the Azure columns), with capacities from the
performance model, optionally replaced by measured tables (`--capacity GPU=FILE`: rates
per bucket; `--step-profile GPU=FILE`: step times from `flotilla profile`). Prints the mix,
its cost next to the cheapest single GPU type, where each bucket goes and why, and the
binding constraints. Exit status 1 when no plan meets the SLO (the table says why).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.cli._api import add_api_arguments
from orchestrator.cli._plan_api import run_api
from policies.capacity import CapacityProfile, Slo, derive_capacity, override_rates, parse_rate_table, split_conditions
from policies.gpu_catalog import GPU_CATALOG, gpu_spec
from policies.measured_profile import MeasuredProfile
from policies.placement import PlacementPlan, PlacementProblem, PoolOption, solve_placement
from policies.transformer_spec import MODEL_PRESETS, TransformerSpec
from policies.workload import BucketScheme, WorkloadProfile, characterise, characterise_span

DEFAULT_GPUS = tuple(name for name in GPU_CATALOG if name != "CPU")


def register(commands) -> None:
    plan = commands.add_parser("plan", help="the cheapest GPU mix for a trace, or for the running fleet")
    plan.add_argument("--trace", default=None,
                      help="conv, code or a CSV file (Azure columns); without it, ask the running fleet")
    plan.add_argument("--slo", type=parse_slo, help="ttft=SECONDS,tpot=SECONDS (with --trace)")
    plan.add_argument("--apply", action="store_true",
                      help="move the running fleet to its plan now (skips dwell and hysteresis)")
    plan.add_argument("--rate", action="append", default=[], metavar="MODEL:PROMPT:OUTPUT:RPS",
                      help="the running fleet: plan for this traffic instead of the observed (repeatable)")
    plan.add_argument("--model", default="llama-2-7b",
                      help=f"a preset ({', '.join(MODEL_PRESETS)}) or a checkpoint directory")
    plan.add_argument("--gpus", default=",".join(DEFAULT_GPUS),
                      help="GPU types, each optionally TYPE:GPUS_PER_REPLICA (default: all)")
    plan.add_argument("--window", type=float, default=None,
                      help="plan for the last S seconds of the trace (default: all of it)")
    plan.add_argument("--rate-scale", type=float, default=1.0, help="multiply every rate")
    plan.add_argument("--form", choices=("continuous", "sliced"), default="continuous")
    plan.add_argument("--slice-factor", type=int, default=8)
    plan.add_argument("--max", default="", help="pool limits, TYPE=N,...")
    plan.add_argument("--power-budget", type=float, default=None, help="watts (Σ TDP)")
    plan.add_argument("--max-cost", type=float, default=None, help="$/h")
    plan.add_argument("--capacity", action="append", default=[], metavar="TYPE=FILE",
                      help="measured rates per bucket (CSV: prompt_tokens,output_tokens,max_rate_per_s)")
    plan.add_argument("--step-profile", action="append", default=[], metavar="TYPE=FILE",
                      help="measured step times (the CSV `flotilla profile` writes)")
    plan.add_argument("--max-num-seqs", type=int, default=256)
    add_api_arguments(plan)  # --url, --token (the running fleet) and --json
    plan.set_defaults(run=run)


def parse_slo(text: str) -> Slo:
    """`ttft=0.5,tpot=0.05` -> Slo (seconds)."""
    fields = dict(_pairs(text))
    unknown = sorted(set(fields) - {"ttft", "tpot"})
    if unknown or len(fields) != 2:
        raise argparse.ArgumentTypeError(f"--slo needs ttft=SECONDS,tpot=SECONDS, got {text!r}")
    try:
        return Slo(float(fields["ttft"]), float(fields["tpot"]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def model_spec(name: str) -> TransformerSpec:
    """A preset by name, else the config.json of a checkpoint directory."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    config = Path(name) / "config.json"
    if not config.is_file():
        raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(MODEL_PRESETS)}) "
                         f"and no {config}")
    return TransformerSpec.from_hf_config(json.loads(config.read_text()), name=Path(name).name)


def gpu_choices(text: str) -> list[tuple[str, int]]:
    """`H100,A100-80GB:2` -> [("H100", 1), ("A100-80GB", 2)]; unknown types refused."""
    choices = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, gpus = item.partition(":")
        gpu_spec(name)  # KeyError naming the known types
        choices.append((name, int(gpus) if gpus else 1))
    if not choices:
        raise ValueError("--gpus names no GPU type")
    return choices


def load_workload(trace: str, model: str, scheme: BucketScheme, window_s: float | None,
                  rate_scale: float) -> WorkloadProfile:
    """The trace's rates per bucket over its span, or over its last `window_s` seconds."""
    from bench.traces import load_trace

    records = load_trace(trace)
    if window_s is None:
        profile = characterise_span(records, scheme=scheme, model=model)
    else:
        profile = characterise(records, now=records[-1].arrival_s, window_s=window_s, scheme=scheme,
                               model=model)
    return profile.scaled(rate_scale)


def capacities(spec: TransformerSpec, gpus: list[tuple[str, int]], scheme: BucketScheme, slo: Slo, *,
               max_num_seqs: int = 256, step_profiles: dict[str, Path] | None = None,
               rate_tables: dict[str, Path] | None = None) -> dict[str, CapacityProfile]:
    """A capacity profile per GPU type: the model's, with measured step times and measured
    rate tables where given."""
    out = {}
    for name, per_replica in gpus:
        profile = None
        if step_profiles and name in step_profiles:
            _, body = split_conditions(step_profiles[name].read_text())
            profile = MeasuredProfile.from_csv(io.StringIO(body))
        cap = derive_capacity(spec, gpu_spec(name), scheme, slo, gpus_per_replica=per_replica,
                              max_num_seqs=max_num_seqs, profile=profile)
        if rate_tables and name in rate_tables:
            _, rows = parse_rate_table(rate_tables[name].read_text())
            cap = override_rates(cap, rows, source=str(rate_tables[name]))
        out[name] = cap
    return out


def _files(items: list[str], flag: str) -> dict[str, Path]:
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"{flag} {item!r}: expected TYPE=FILE with an existing file")
        files[name] = Path(path)
    return files


@dataclass(frozen=True)
class Comparison:
    """The mix next to the cheapest single GPU type meeting the same SLO."""

    single_type: str | None  # None: no single type can serve the whole workload
    single_cost_per_hour: float  # inf when none can
    saving: float  # 1 - mix cost / single cost (0 when no single type can)


def cheapest_single(problem: PlacementProblem) -> Comparison:
    """Solve the problem once per pool alone; the cheapest feasible one."""
    best, best_cost = None, math.inf
    for pool in problem.pools:
        plan = solve_placement(PlacementProblem(problem.workloads, (pool,), form="continuous",
                                                power_budget_watts=problem.power_budget_watts,
                                                max_cost_per_hour=problem.max_cost_per_hour))
        if plan.feasible and plan.cost_per_hour < best_cost:
            best, best_cost = pool.name, plan.cost_per_hour
    return Comparison(best, best_cost, 0.0)


def run(args: argparse.Namespace) -> int:
    if args.trace is None:
        return run_api(args)
    if args.apply or args.rate or args.slo is None:
        print("flotilla plan: with --trace, --slo is required and --apply/--rate do not apply "
              "(they ask the running fleet)", file=sys.stderr)
        return 2
    try:
        spec = model_spec(args.model)
        gpus = gpu_choices(args.gpus)
        limits = {k: int(v) for k, v in _pairs(args.max)}
        scheme = BucketScheme.log_spaced()
        workload = load_workload(args.trace, spec.name, scheme, args.window, args.rate_scale)
        caps = capacities(spec, gpus, scheme, args.slo, max_num_seqs=args.max_num_seqs,
                          step_profiles=_files(args.step_profile, "--step-profile"),
                          rate_tables=_files(args.capacity, "--capacity"))
        pools = tuple(PoolOption(name, caps[name], gpu_spec(name).price_per_hour,
                                 max_replicas=limits.get(name)) for name, _ in gpus)
        problem = PlacementProblem((workload,), pools, form=args.form, slice_factor=args.slice_factor,
                                   power_budget_watts=args.power_budget, max_cost_per_hour=args.max_cost)
    except (KeyError, ValueError, argparse.ArgumentTypeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"flotilla plan: {message}", file=sys.stderr)
        return 2
    with _stdout_to_stderr():
        plan = solve_placement(problem)
        single = cheapest_single(problem)
    if plan.feasible and math.isfinite(single.single_cost_per_hour) and single.single_cost_per_hour > 0:
        single = Comparison(single.single_type, single.single_cost_per_hour,
                            1 - plan.cost_per_hour / single.single_cost_per_hour)
    if args.json:
        print(json.dumps({"workload": _workload_summary(workload, args.trace), "slo": asdict(args.slo),
                          "plan": asdict(plan), "single_type": asdict(single)},
                         indent=2, default=_json_default))
    else:
        print(render(plan, workload, args.trace, args.slo, single))
    return 0 if plan.feasible else 1


@contextlib.contextmanager
def _stdout_to_stderr():
    """HiGHS prints an occasional debug line from C straight to file descriptor 1, which
    would corrupt --json output; send that descriptor to stderr while solving."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return None
    return str(value)


def _workload_summary(w: WorkloadProfile, trace: str) -> dict:
    return {"trace": trace, "model": w.model, "total_rate": w.total_rate, "window_s": w.window_s,
            "requests": w.requests, "clamped": w.clamped, "active_buckets": sum(1 for _ in w.active())}


def render(plan: PlacementPlan, w: WorkloadProfile, trace: str, slo: Slo, single: Comparison) -> str:
    """The plan as a text table."""
    lines = [f"workload: {trace}, {w.total_rate:.3g} req/s over {w.window_s:.0f} s, "
             f"{sum(1 for _ in w.active())} active buckets ({w.model})",
             f"SLO: {slo}   form: {plan.form}" + (f" (slice factor {plan.slice_factor})"
                                                  if plan.form == "sliced" else "")
             + f"   status: {plan.status}   solved in {plan.solve_time_s:.3f} s", ""]
    if not plan.feasible:
        lines.append("no plan meets the SLO:")
        lines += [f"  - {p}" for p in plan.problems]
        return "\n".join(lines)
    lines.append(f"{'POOL':<12} {'GPUS':>5} {'REPLICAS':>8} {'LOAD':>7} {'UTIL':>6} {'$/h':>9}")
    for a in plan.allocations:
        if a.replicas:
            lines.append(f"{a.pool:<12} {a.gpus:>5} {a.replicas:>8} {a.load:>7.2f} "
                         f"{a.utilisation:>6.0%} {a.cost_per_hour:>9.2f}")
    lines.append(f"total ${plan.cost_per_hour:.2f}/h, {plan.power_watts:g} W (TDP)")
    if single.single_type is None:
        lines.append("no single GPU type meets the SLO for the whole workload")
    else:
        lines.append(f"cheapest single GPU type: {single.single_type} at "
                     f"${single.single_cost_per_hour:.2f}/h (the mix saves {single.saving:.0%})")
    lines += ["", f"{'BUCKET':<30} {'REQ/S':>8}  {'POOL':<12} {'SHARE':>6}  WHY"]
    for a in sorted(plan.assignments, key=lambda a: (a.bucket, a.pool)):
        lines.append(f"{a.label:<30} {a.rate:>8.3g}  {a.pool:<12} {a.fraction:>6.0%}  {a.reason}")
    if plan.binding:
        lines += ["", "binding constraints:"]
        lines += [f"  {b.kind:<13} {b.subject:<12} {b.detail}" for b in plan.binding]
    return "\n".join(lines)
