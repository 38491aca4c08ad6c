"""Benchmark: live-migration downtime against context length, pre-copy against naive.

    python -m bench.migration_downtime [--engines sim,vllm] [--reps 6] [--order precopy,naive,naive,precopy]

One request at a time streams from a fleet started in this process
(bench/configs/migration_downtime.yaml: two sim replicas of llama-2-7b on simulated
H100s in real time, two vLLM replicas of the tiny Llama on the CPU); after its first
tokens it is migrated by hand (`POST /admin/v1/requests/{id}/migrate`) to the other
replica of its pool, and streams on to its end. Two mechanisms, one fleet each:
- precopy (`migration.precopy_rounds: 3`): the target warms its cache with the context
  while the source keeps decoding, then the switch; the target computes only the tail;
- naive (`precopy_rounds: 0`): the switch at once, and the target recomputes the whole
  context while the client waits (abort and re-prefill).
The fleets alternate in `--order` (A B B A cancels drift), one per engine and mode (only
that engine's replicas run); each runs `reps / blocks` repetitions of every context
length, each with a fresh prompt (no cache reuse).

Downtime is the stall the client saw: last token from the source to first token from
the target. Measured twice: at the client (the SSE chunks' arrival times: the longest
of the first three gaps ending after the controller's switch time, since a token or two
from the source may still be in flight then) and by the ingress
(`flotilla_migration_downtime_seconds`, the histogram's sum over that one migration).
Next to it: one decode step at that context (sim: the performance model's, batch 1;
vLLM: the median gap between tokens before the migration) and the source's slowdown
during the pre-copy (time per token while the target warms up, against before it).
Prints the tables; writes bench/results/migration_downtime.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml

from bench.loadgen import DONE, prompt_vocabulary, read_event
from bench.migration_downtime_report import report
from bench.migration_fleet import FleetHandle, running_fleet
from bench.report import RESULTS_DIR, machine, write_json
from policies.perfmodel import MODEL_PRESETS, StepTimeModel, gpu_spec

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "migration_downtime.yaml"
METRIC = "flotilla_migration_downtime_seconds"
MODES = {"precopy": 3, "naive": 0}  # mode -> migration.precopy_rounds
TARGET_STEPS = 2.0  # pre-copy downtime at the longest context: below this many decode steps


@dataclass(frozen=True)
class Case:
    """One engine's pool, model and the contexts it is measured at (tokens)."""

    engine: str
    pool: str
    model: str
    contexts: tuple[int, ...]
    max_model_len: int
    max_tokens: int  # output asked for: enough to cover listing, pre-copy and some tokens after
    warm_chunks: int = 24  # tokens streamed before the migration is asked for


CASES = {
    "sim": Case("sim", "h100", "sim-llama-7b", (1024, 2048, 4096, 8192, 16384, 32768), 34816, 600),
    "vllm": Case("vllm", "cpu", "tiny-llama", (128, 256, 512, 896), 1024, 384, warm_chunks=16),
}


@dataclass(frozen=True)
class Point:
    """One migration of one request, as measured (seconds)."""

    engine: str
    mode: str
    context: int  # prompt tokens
    rep: int
    outcome: str  # "done", an abort reason, or why it could not be asked for
    rounds: int = 0  # pre-copy rounds it ran
    client_downtime_s: float | None = None
    ingress_downtime_s: float | None = None
    tpot_before_s: float | None = None  # median gap between tokens on the source before
    tpot_precopy_s: float | None = None  # mean time per token on the source during the pre-copy
    precopy_s: float | None = None  # from the migration's start to the switch


def sim_decode_step_s(context: int) -> float:
    """One decode step of one sequence at `context` tokens: llama-2-7b on an H100, by the
    performance model the sim replicas step by (seconds of real time at time_scale 1)."""
    return StepTimeModel(gpu_spec("H100"), MODEL_PRESETS["llama-2-7b"]).decode_time(1, context)


# one migration ----------------------------------------------------------------------

async def measure(fleet: FleetHandle, http: httpx.AsyncClient, case: Case, mode: str, context: int, rep: int,
                  ids: Sequence[int]) -> Point:
    """Stream one request, migrate it after `case.warm_chunks` tokens, and time the switch."""
    labels = {"model": case.model}
    before = await fleet.histogram(http, METRIC, labels)
    body = {"model": case.model, "prompt": [int(i) for i in ids],
            "max_tokens": min(case.max_tokens, case.max_model_len - context),
            "temperature": 0.0, "stream": True, "ignore_eos": True}
    chunks: list[tuple[float, int]] = []  # (wall-clock arrival, tokens in it)
    asked: asyncio.Task | None = None
    async with http.stream("POST", f"{fleet.base_url}/v1/completions", json=body, timeout=600.0) as response:
        if response.status_code != 200:
            return Point(case.engine, mode, context, rep, f"HTTP {response.status_code}")
        async for line in response.aiter_lines():
            event = read_event(line)
            if event is None or event == DONE:
                continue
            if "error" in event:
                return Point(case.engine, mode, context, rep, f"stream error {event['error']}")
            if event.get("choices"):
                text = event["choices"][0].get("text", "")
                chunks.append((time.time(), len(text) if case.engine == "sim" else 1))
                if asked is None and len(chunks) >= case.warm_chunks:
                    asked = asyncio.create_task(ask_to_migrate(fleet, http, case, event["id"]))
    if asked is None:
        return Point(case.engine, mode, context, rep, "ended before the migration was asked for")
    migration = await asked
    if isinstance(migration, str):
        return Point(case.engine, mode, context, rep, migration)
    if migration["state"] != "done":
        return Point(case.engine, mode, context, rep, migration["abort_reason"] or migration["state"])
    if migration["queued"]:
        return Point(case.engine, mode, context, rep, "moved as a queued request")
    ingress = await ingress_downtime(fleet, http, labels, before)
    return timings(case, mode, context, rep, chunks, migration, ingress)


async def ask_to_migrate(fleet: FleetHandle, http: httpx.AsyncClient, case: Case, request_id: str) -> dict | str:
    """Once the controller lists the request: migrate it to its pool's other replica and
    wait for the migration to end. Its record, or why there is none."""
    deadline = time.monotonic() + 20.0
    source = None
    while source is None and time.monotonic() < deadline:
        # decoding as of the controller's last poll: one it still saw waiting would be moved
        # as a queued request (re-dispatched, no pre-copy), which is not what is measured here
        listed = await fleet.admin(http, "GET", "/requests")
        source = next((r["replica_id"] for r in listed if r["request_id"] == request_id
                       and r["running"] and r["output_tokens"] > 0), None)
        if source is None:
            await asyncio.sleep(0.05)
    if source is None:
        return "never listed as decoding"
    target = next(r for r in await fleet.ready_replicas(http, case.pool) if r != source)
    try:
        view = await fleet.admin(http, "POST", f"/requests/{request_id}/migrate", json={"target": target})
    except RuntimeError as e:
        return f"refused: {e}"
    while time.monotonic() < deadline + 120.0:
        for m in await fleet.admin(http, "GET", "/migrations"):
            if m["migration_id"] == view["migration_id"] and m["state"] in ("done", "aborted"):
                return m
        await asyncio.sleep(0.1)
    return "did not end"


async def ingress_downtime(fleet: FleetHandle, http: httpx.AsyncClient, labels: dict, before: tuple[float, int],
                           timeout_s: float = 15.0) -> float | None:
    """The histogram's sum over this one migration (the ingress ships observations ~1/s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total, count = await fleet.histogram(http, METRIC, labels)
        if count > before[1]:
            return (total - before[0]) if count == before[1] + 1 else None
        await asyncio.sleep(0.25)
    return None


def timings(case: Case, mode: str, context: int, rep: int, chunks: list[tuple[float, int]], m: dict,
            ingress: float | None) -> Point:
    """Downtime and source pace from the chunks' arrival times and the migration's record."""
    times = np.array([t for t, _ in chunks])
    tokens = np.array([n for _, n in chunks])
    switched, created = m["switched_at"], m["created_at"]
    after = int(np.searchsorted(times, switched, side="right"))  # first chunk after the switch
    gaps = np.diff(times[max(after - 1, 0):after + 3])
    client = float(gaps.max()) if gaps.size else None
    warm = slice(4, int(np.searchsorted(times, created)))  # the source, before the migration began
    before = float(np.median(np.diff(times[warm]) / np.maximum(tokens[warm][1:], 1))) \
        if times[warm].size > 2 else None
    during = (times >= created) & (times < switched)
    pace = float(np.ptp(times[during]) / max(tokens[during][1:].sum(), 1)) if during.sum() > 2 else None
    return Point(case.engine, mode, context, rep, "done", len(m["precopy_rounds"]), client, ingress, before, pace,
                 switched - created)


# a block: one fleet, every context ----------------------------------------------------------

def run_block(mode: str, block: int, cases: Sequence[Case], reps: int, seed: int) -> list[Point]:
    pools = [p for p in _pools() if p["name"] in {c.pool for c in cases}]
    overrides = {"pools": pools, "migration": {"precopy_rounds": MODES[mode]}}
    print(f"\n[{mode} #{block}] starting the fleet ({', '.join(c.engine for c in cases)})", flush=True)
    with running_fleet(CONFIG, overrides) as fleet:
        return asyncio.run(_measure_all(fleet, mode, block, cases, reps, seed))


async def _measure_all(fleet: FleetHandle, mode: str, block: int, cases: Sequence[Case], reps: int,
                       seed: int) -> list[Point]:
    points = []
    async with httpx.AsyncClient(timeout=60.0) as http:
        await _warm_up(fleet, http, cases)
        for case in cases:
            vocabulary = _vocabulary(case)
            for rep in range(block * reps, (block + 1) * reps):
                for context in case.contexts:
                    rng = np.random.default_rng([seed, rep, context, sorted(CASES).index(case.engine)])
                    ids = rng.choice(vocabulary, context)
                    await asyncio.sleep(1.0)  # the last request's stragglers (stats, metrics) settle
                    point = await measure(fleet, http, case, mode, context, rep, ids)
                    points.append(point)
                    print(f"[{mode} #{block}] {case.engine:>4} {context:>6} tokens rep {rep}: {_line(point)}",
                          flush=True)
    return points


async def _warm_up(fleet: FleetHandle, http: httpx.AsyncClient, cases: Sequence[Case]) -> None:
    """One short request per replica pool first: first requests pay lazy imports and connections."""
    for case in cases:
        for _ in range(2):
            body = {"model": case.model, "prompt": [int(i) for i in _vocabulary(case)[:32]], "max_tokens": 8}
            r = await http.post(f"{fleet.base_url}/v1/completions", json=body, timeout=120.0)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up of {case.model} failed: HTTP {r.status_code} {r.text[:200]}")


def _vocabulary(case: Case) -> np.ndarray:
    if case.engine == "sim":
        return np.arange(32, 127)  # printable bytes of the byte tokenizer
    return prompt_vocabulary(REPO / ".flotilla" / "models" / "tiny-llama")


def _pools() -> list[dict]:
    return yaml.safe_load(CONFIG.read_text())["pools"]


def _line(p: Point) -> str:
    if p.outcome != "done":
        return f"no downtime ({p.outcome})"
    return (f"client {_ms(p.client_downtime_s)}, ingress {_ms(p.ingress_downtime_s)}, source TPOT "
            f"{_ms(p.tpot_before_s)} -> {_ms(p.tpot_precopy_s)} during {p.rounds} pre-copy round(s)")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}ms"


# the command line ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sim,vllm", help=f"from {sorted(CASES)}")
    parser.add_argument("--reps", type=int, default=6, help="migrations per context length and mode")
    parser.add_argument("--order", default="precopy,naive,naive,precopy",
                        help="fleets in run order, each a mode; reps are split evenly among a mode's fleets")
    parser.add_argument("--contexts", default=None, help="override the sim contexts, e.g. 1024,32768")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="migration_downtime")
    args = parser.parse_args(argv)
    cases = [CASES[e] for e in args.engines.split(",")]
    if args.contexts:
        cases = [Case(**{**asdict(c), "contexts": tuple(int(x) for x in args.contexts.split(","))})
                 if c.engine == "sim" else c for c in cases]
    order = args.order.split(",")
    unknown = sorted(set(order) - set(MODES))
    if unknown:
        parser.error(f"--order: unknown mode(s) {unknown}; modes: {sorted(MODES)}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    seen: dict[str, int] = {}
    points: list[Point] = []
    for mode in order:
        block = seen.get(mode, 0)
        seen[mode] = block + 1
        per_block = max(1, args.reps // order.count(mode))
        for case in cases:  # one engine's replicas at a time: the other's idle processes stay out
            points += run_block(mode, block, [case], per_block, args.seed)
    summary = report(points, sim_decode_step_s, RESULTS_DIR / f"{args.out}.png", TARGET_STEPS)
    write_json(RESULTS_DIR / f"{args.out}.json", {"machine": machine(), "argv": sys.argv[1:], "summary": summary,
                                                   "points": [asdict(p) for p in points]})
    print(f"wrote {RESULTS_DIR / (args.out + '.json')} and {RESULTS_DIR / (args.out + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
