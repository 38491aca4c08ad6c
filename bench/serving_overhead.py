"""Benchmark (a): what serving through Flotilla costs over vLLM's own OpenAI server.

    python -m bench.serving_overhead [--rates 1.5,5] [--duration 35] [--order direct,flotilla,flotilla,direct]

Both systems serve the same tiny Llama on this machine's CPU with the same vLLM engine
settings (bench/configs/one_vllm.yaml: max_model_len 1024, block_size 32, max_num_seqs
64, prefix caching, eager mode, the checkpoint's dtype, VLLM_CPU_KVCACHE_SPACE=1):
- direct: `python -m vllm.entrypoints.openai.api_server`;
- flotilla: `flotilla up --config bench/configs/one_vllm.yaml`, whose requests go Serve
  proxy -> ingress -> router agent -> ModelReplica actor -> vLLM.
One system runs at a time (each is started, warmed up, loaded, stopped), in the order
given, which by default is A B B A to cancel drift. This machine is shared: before each
run the benchmark waits for the load average to fall (`--max-load`), and Flotilla runs
from a copy of its packages taken at the start (their digest is printed), so that every
Flotilla run is the same code even while the tree is being edited. Each load level is the identical
open-loop schedule for every run (`bench.loadgen`, same seed): Poisson arrivals, lengths
from the Azure conversation trace. Per level it prints Flotilla/direct throughput, added
TTFT (p50, p99) and the TPOT ratio, pooled over repetitions, and the CPU seconds each
process of each system spent per 1,000 output tokens (where the overhead goes). Writes
bench/results/serving_overhead.json and one PNG per level; servers' logs go to
bench/results/logs/.

`--order` may also name `flotilla-variant`: Flotilla with the extra environment of
`--variant-env KEY=VALUE` (a Ray or Serve setting) and/or the code change of
`--variant-patch FILE.diff` applied to its copy of the sources, to measure a change side
by side without touching the tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import httpx

from bench import loadgen, traces
from bench.report import (
    RESULTS_DIR,
    LoadSummary,
    Overhead,
    Pooled,
    RequestRecord,
    cpu_by_process,
    cpu_delta,
    machine,
    overhead,
    plot_runs,
    pool,
    source_digest,
    summarize,
    wait_for_quiet,
    write_json,
)
from orchestrator.config import FleetConfig, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "one_vllm.yaml"
SYSTEMS = ("direct", "flotilla", "flotilla-variant")  # the variant: Flotilla with --variant-env
TARGETS = {"throughput_ratio_min": 0.95, "added_ttft_p50_ms_max": 5.0}


@dataclass(frozen=True)
class ServerCommand:
    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    cwd: Path = REPO

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def direct_command(config: FleetConfig, port: int) -> ServerCommand:
    """vLLM's own server with the engine settings Flotilla's replica gives vLLM."""
    pool = config.pools[0]
    model = config.model(pool.model)
    path = model.resolved_path
    dtype = _checkpoint_dtype(path)
    argv = (sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
            "--served-model-name", model.name, "--max-model-len", str(model.max_model_len),
            "--block-size", str(model.block_size), "--max-num-seqs", str(pool.engine_args.get("max_num_seqs", 64)),
            "--enable-prefix-caching", "--enforce-eager", "--dtype", dtype, "--disable-log-stats",
            "--host", "127.0.0.1", "--port", str(port))
    return ServerCommand("direct", argv, dict(pool.env), port)


def flotilla_command(config_path: Path, port: int, sources: Path, name: str = "flotilla",
                     env: dict[str, str] | None = None) -> ServerCommand:
    """`flotilla up` running the packages under `sources` (a snapshot, or PYTHONPATH in `env`);
    `env` reaches every Ray process of the fleet (they inherit the head's)."""
    # RAY_ADDRESS=local: always a fresh Ray head, never a cluster someone else started here
    env = {"RAY_ADDRESS": "local", "PYTHONPATH": str(sources), **(env or {})}
    argv = (str(Path(sys.executable).with_name("flotilla")), "up", "--config", str(config_path.resolve()),
            "--port", str(port))
    return ServerCommand(name, argv, env, port, cwd=Path(env["PYTHONPATH"].split(os.pathsep)[0]))


def snapshot_sources(settle_s: float = 15.0, tries: int = 8) -> Path:
    """A copy of Flotilla's packages that did not change for `settle_s` while it was taken.

    Others edit the tree while the benchmark runs; a copy makes every Flotilla run of one
    benchmark the same code, and never a half-edited one. Its `.flotilla` links to the
    tree's (the built model). The caller removes it.
    """
    for _ in range(tries):
        before = source_digest()
        root = Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
        for package in ("orchestrator", "actors", "policies"):
            shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
        (root / ".flotilla").symlink_to(REPO / ".flotilla")
        time.sleep(settle_s)
        if before == source_digest(root) == source_digest():
            return root
        shutil.rmtree(root)
    raise RuntimeError(f"Flotilla's sources kept changing; no stable copy after {tries} tries")


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype Flotilla's vLLM engine uses: the checkpoint's own (config.json)."""
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def patched_copy(sources: Path, diff: Path) -> Path:
    """A copy of the snapshot `sources` with `diff` applied: the code change a variant measures."""
    root = Path(tempfile.mkdtemp(prefix="flotilla-variant-"))
    shutil.rmtree(root)
    shutil.copytree(sources, root, symlinks=True)
    result = subprocess.run(["patch", "-p1", "--forward", "-i", str(diff.resolve())], cwd=root,
                            capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(root)
        raise RuntimeError(f"{diff} does not apply to Flotilla's sources:\n{result.stdout}{result.stderr}")
    return root


# one server at a time -----------------------------------------------------------------------

@dataclass
class Running:
    command: ServerCommand
    process: subprocess.Popen
    ready_s: float  # seconds from launch to /health 200


def free_port() -> int:
    """A TCP port nothing listens on now (the machine is shared: fixed ports collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: ServerCommand, log_path: Path, timeout_s: float) -> Running:
    """Launch in a session of its own (so every process it spawns can be found) and wait for /health."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", command.port)) == 0:
            raise RuntimeError(f"port {command.port} is taken: something else would answer for {command.name}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **command.env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command.argv, cwd=command.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Running(command, process, 0.0)
    try:
        while time.monotonic() - began < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"{command.name} exited with {process.returncode} while starting; see {log_path}")
            if _healthy(command.base_url):
                running.ready_s = time.monotonic() - began
                return running
            time.sleep(1.0)
        raise TimeoutError(f"{command.name} not healthy within {timeout_s:.0f}s; see {log_path}")
    except BaseException:
        stop(running)
        raise


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def stop(running: Running, grace_s: float = 90.0) -> None:
    """SIGTERM (both servers shut down cleanly on it), then SIGKILL whatever of its session is left."""
    process = running.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in _session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    """Processes still alive in the session the server was started in (they are ours)."""
    return list(cpu_by_process(sid))


# a run: one system, every load level ---------------------------------------------------------

@dataclass(frozen=True)
class LevelRun:
    system: str
    repetition: int
    rate: float
    summary: LoadSummary
    cpu_s: dict[str, float]  # process name -> CPU seconds spent during the level
    client_cpu_s: float
    load_average: float  # the machine's 1-minute load average as the level ended (others' work shows here)
    source: str  # source_digest() when the system started
    records: tuple[RequestRecord, ...]


def run_system(command: ServerCommand, repetition: int, plans: Sequence[loadgen.Plan], model: str,
               vocabulary, log_dir: Path, start_timeout_s: float) -> tuple[float, list[LevelRun]]:
    """Start one system, warm it up, offer every level's plan in turn, stop it."""
    source = "" if command.name == "direct" else source_digest(command.cwd)
    print(f"[{command.name} #{repetition}] starting{f' (Flotilla sources {source})' if source else ''} ...",
          flush=True)
    try:
        running = start(command, log_dir / f"{command.name}-{repetition}.log", start_timeout_s)
    except RuntimeError as e:  # on a loaded machine Ray's head can time out starting: once more
        print(f"[{command.name} #{repetition}] {e}; trying once more", flush=True)
        running = start(command, log_dir / f"{command.name}-{repetition}-retry.log", start_timeout_s)
    print(f"[{command.name} #{repetition}] healthy after {running.ready_s:.0f}s; warming up", flush=True)
    base_url = f"{command.base_url}/v1"
    runs = []
    try:
        warm = asyncio.run(loadgen.warm_up(base_url, model, vocabulary, requests=8))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"{command.name}: warm-up failed: {sorted({r.error for r in warm if not r.ok})}")
        for plan in plans:
            time.sleep(2.0)  # let the previous level's stragglers clear
            before, client_before = cpu_by_process(running.process.pid), time.process_time()
            records = asyncio.run(loadgen.run_load(base_url, model, plan.requests))
            cpu = cpu_delta(before, cpu_by_process(running.process.pid))
            summary = summarize(records)
            load = os.getloadavg()[0]
            runs.append(LevelRun(command.name, repetition, plan.spec.rate, summary, cpu,
                                 time.process_time() - client_before, load, source, tuple(records)))
            print(f"[{command.name} #{repetition}] rate {plan.spec.rate:g}: {summary.ok}/{summary.sent} ok, "
                  f"{summary.output_token_throughput:.0f} tok/s, TTFT p50 {_ms(summary, 'ttft', 'p50')} ms, "
                  f"TPOT p50 {_ms(summary, 'tpot', 'p50')} ms; load average {load:.1f}", flush=True)
    finally:
        print(f"[{command.name} #{repetition}] stopping", flush=True)
        stop(running)
    return running.ready_s, runs


def _ms(summary: LoadSummary, metric: str, stat: str) -> str:
    d = getattr(summary, metric)
    return "-" if d is None else f"{getattr(d, stat) * 1e3:.1f}"


# comparing -----------------------------------------------------------------------------------

def cpu_per_kilotoken(runs: Sequence[LevelRun]) -> dict[str, float]:
    """CPU seconds per 1,000 output tokens, by process name, over the runs given."""
    tokens = sum(r.output_tokens for run in runs for r in run.records if r.ok)
    spent: dict[str, float] = {}
    for run in runs:
        for name, cpu in run.cpu_s.items():
            spent[name] = spent.get(name, 0.0) + cpu
        spent["(load generator)"] = spent.get("(load generator)", 0.0) + run.client_cpu_s
    return {name: cpu * 1000 / tokens for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1])}


# printing ------------------------------------------------------------------------------------

def print_report(pooled: dict[tuple[str, float], Pooled], overheads: list[Overhead],
                 cpu: dict[tuple[str, float], dict[str, float]]) -> None:
    print(f"\n{'system':<18}{'rate':>6}{'runs':>5}{'tok/s':>8}{'req/s':>7}{'TTFT p50':>10}{'p99':>9}"
          f"{'TPOT p50':>10}{'p99':>8}{'E2E p50':>9}{'errors':>7}{'TTFT p50 spread':>17}{'load':>6}")
    for p in pooled.values():
        print(f"{p.system:<18}{p.rate:>6g}{p.runs:>5}{p.output_token_throughput:>8.0f}{p.request_throughput:>7.2f}"
              f"{p.ttft_p50_s * 1e3:>8.1f}ms{p.ttft_p99_s * 1e3:>7.0f}ms{p.tpot_p50_s * 1e3:>8.2f}ms"
              f"{p.tpot_p99_s * 1e3:>6.1f}ms{p.e2e_p50_s:>8.2f}s{p.errors:>7}{p.ttft_p50_spread_s * 1e3:>15.1f}ms"
              f"{p.load_average:>6.1f}")
    print(f"\nFlotilla vs direct (targets: throughput ratio >= {TARGETS['throughput_ratio_min']}, "
          f"added TTFT p50 <= {TARGETS['added_ttft_p50_ms_max']:g} ms)")
    print(f"{'system':<18}{'rate':>6}{'throughput':>12}{'+TTFT p50':>11}{'+TTFT p99':>11}{'TPOT p50 x':>12}"
          f"{'TPOT p99 x':>12}{'E2E p50 x':>11}")
    for o in overheads:
        print(f"{o.system:<18}{o.rate:>6g}{o.throughput_ratio:>12.3f}{o.added_ttft_p50_ms:>9.1f}ms{o.added_ttft_p99_ms:>9.0f}ms"
              f"{o.tpot_p50_ratio:>12.2f}{o.tpot_p99_ratio:>12.2f}{o.e2e_p50_ratio:>11.2f}")
    print("\nCPU seconds per 1,000 output tokens, by process (the load generator shares the machine)")
    for (system, rate), by_name in cpu.items():
        top = ", ".join(f"{name} {s:.2f}" for name, s in list(by_name.items())[:9])
        print(f"  {system:<18}{rate:>5g}/s  total {sum(by_name.values()):.2f}: {top}")


# the command line ----------------------------------------------------------------------------

def report(runs: list[LevelRun], ready: dict[str, list[float]], rates: list[float], systems: list[str],
           plans: list[loadgen.Plan], model: str, args: argparse.Namespace) -> None:
    """Print the tables, plot each level, write the JSON."""
    sources = {run.source for run in runs if run.system != "direct"}
    if len(sources) > 1:
        print(f"WARNING: Flotilla's sources changed between runs ({', '.join(sorted(sources))}); "
              "pooled figures mix code versions")
    group = {(s, r): [run for run in runs if run.system == s and run.rate == r] for r in rates for s in systems}
    pooled = {(s, r): pool(s, r, [(run.summary, run.records) for run in level_runs],
                           sum(run.load_average for run in level_runs) / len(level_runs))
              for (s, r), level_runs in group.items()}
    overheads = [overhead(pooled["direct", r], pooled[s, r]) for r in rates for s in systems if s != "direct"]
    cpu = {key: cpu_per_kilotoken(level_runs) for key, level_runs in group.items()}
    print_report(pooled, overheads, cpu)
    starts = (f"{s} {', '.join(f'{t:.0f}s' for t in ready[s])}" for s in systems)
    print(f"\nstart-up to /health 200: {'; '.join(starts)}")

    for rate in rates:
        labelled = {f"{run.system} #{run.repetition}": run.records for run in runs if run.rate == rate}
        plot_runs(labelled, RESULTS_DIR / f"{args.out}_{rate:g}.png",
                  f"direct vLLM vs {', '.join(systems[1:])}, Poisson {rate:g} req/s, {model} on {machine()}")
    write_json(RESULTS_DIR / f"{args.out}.json", {
        "machine": machine(), "vllm": metadata.version("vllm-cpu"), "args": {k: str(v) for k, v in vars(args).items()},
        "targets": TARGETS, "plans": {f"{p.spec.rate:g}": {"spec": asdict(p.spec), "requests": len(p.requests),
                                                           "clipped": p.clipped} for p in plans},
        "ready_s": ready, "overheads": overheads, "pooled": list(pooled.values()),
        "cpu_s_per_1000_tokens": {f"{s} {r:g}": v for (s, r), v in cpu.items()},
        "runs": runs,
    })
    print(f"wrote {RESULTS_DIR / (args.out + '.json')} and {args.out}_<rate>.png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1.5,5", help="load levels, requests/s (Poisson)")
    parser.add_argument("--duration", type=float, default=35.0, help="seconds of arrivals per level")
    parser.add_argument("--order", default="direct,flotilla,flotilla,direct",
                        help=f"systems in run order, from {SYSTEMS}; direct and one other at least")
    parser.add_argument("--variant-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the flotilla-variant system (repeatable)")
    parser.add_argument("--variant-patch", type=Path, default=None,
                        help="a unified diff (patch -p1, from the repository root) the variant runs with")
    parser.add_argument("--trace", default="conv", help="where request lengths come from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=CONFIG, help="Flotilla's fleet (one vLLM pool)")
    parser.add_argument("--direct-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--flotilla-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--max-load", type=float, default=3.0,
                        help="before each run, wait for the 1-minute load average to fall to this")
    parser.add_argument("--quiet-timeout", type=float, default=300.0, help="seconds to wait for --max-load")
    parser.add_argument("--out", default="serving_overhead", help="name of the JSON and PNGs under bench/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    order = [s.strip() for s in args.order.split(",")]
    systems = [s for s in SYSTEMS if s in order]
    if set(order) - set(SYSTEMS) or "direct" not in systems or len(systems) < 2:
        raise SystemExit(f"--order must name direct and another of {SYSTEMS}, got {order}")
    variant_env = dict(kv.split("=", 1) for kv in args.variant_env)
    rates = [float(r) for r in args.rates.split(",")]
    config = load_config(args.config)
    model = config.model(config.pools[0].model)
    sources = snapshot_sources()
    variant = patched_copy(sources, args.variant_patch) if args.variant_patch else sources
    commands = {"direct": direct_command(config, args.direct_port or free_port()),
                "flotilla": flotilla_command(args.config, args.flotilla_port or free_port(), sources),
                "flotilla-variant": flotilla_command(args.config, free_port(), variant, "flotilla-variant",
                                                     variant_env)}
    trace, vocabulary = traces.load_trace(args.trace), loadgen.prompt_vocabulary(model.resolved_path)
    plans = [loadgen.build_plan(loadgen.LoadSpec("poisson", rate, args.duration, args.trace,
                                                 max_model_len=model.max_model_len, seed=args.seed),
                                trace, vocabulary) for rate in rates]
    print(f"machine: {machine()}\nvLLM {metadata.version('vllm-cpu')}, model {model.name} "
          f"({model.resolved_path}), order: {' '.join(order)}"
          + (f"; flotilla-variant env: {variant_env}" if "flotilla-variant" in systems else ""))
    for plan in plans:
        print(f"level {plan.spec.rate:g}/s: {loadgen.describe_plan(plan)}")

    runs: list[LevelRun] = []
    ready: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for system in order:
            repetition = len(ready[system]) + 1
            wait_for_quiet(args.max_load, args.quiet_timeout)
            ready_s, level_runs = run_system(commands[system], repetition, plans, model.name, vocabulary,
                                             RESULTS_DIR / "logs", args.start_timeout)
            ready[system].append(ready_s)
            runs.extend(level_runs)
    finally:
        for tree in {sources, variant}:
            shutil.rmtree(tree)

    report(runs, ready, rates, systems, plans, model.name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
