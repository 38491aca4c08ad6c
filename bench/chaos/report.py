"""What a chaos run shows: the client-side outcome of every request, and how fast the fleet mended.

Pure functions over the run's facts (stream records, injections, the fault records the
admin API reported, the monitor's samples). Run-clock times are seconds since the load
began; fault records carry wall-clock times, compared with each injection's wall-clock
time. Detection is from the injection to the fault record; for the controller, to the
restarted controller's first tick (its "restarted" record).

Recovery of a stream that lived through a fault (it is among the fault's affected
requests): `stall_s` is the client's stall across it (its longest silence around the
fault, from the last chunk before to the first resumed one) and `resume_s` is from the
fault (or that last chunk, if later) to the first resumed chunk: the issue's "fault ->
first resumed token".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.chaos.injector import STORE_PREFIX, Injection
from bench.chaos.load import COMPLETED, FAILED, LOST, REJECTED, StreamRecord
from bench.chaos.monitor import Monitor, Sample
from bench.report import percentile

REPLICA_KINDS = ("kill_replica", "ray_kill_replica", "hang_replica")
_DRILLS = ("kill_replica", "hang_replica", "kill_router")  # through the admin API, so through the controller
_COMPONENT = {"kill_replica": "replica", "ray_kill_replica": "replica", "hang_replica": "replica",
              "remove_node": "node", "kill_router": "router", "kill_controller": "controller",
              "kill_store": "kvstore"}


@dataclass(frozen=True)
class Recovery:
    """One affected stream's recovery from one fault (seconds)."""

    kind: str
    stream_id: str
    resume_s: float
    stall_s: float


def match_faults(injections: Sequence[Injection], faults: Iterable[Mapping]) -> dict[int, dict]:
    """Injection index -> the first fault record of its component and target detected after it."""
    matched: dict[int, dict] = {}
    taken: set[str] = set()
    ordered = sorted(faults, key=lambda f: f["detected_at"])
    for i, inj in enumerate(injections):
        if inj.skipped:
            continue
        component = _COMPONENT[inj.kind]
        for f in ordered:
            if f["fault_id"] in taken or f["component"] != component or f["detected_at"] < inj.at_wall - 0.5:
                continue
            if component == "controller" or f["target"] in (inj.target, inj.target.removeprefix(STORE_PREFIX)):
                matched[i] = f
                taken.add(f["fault_id"])
                break
    return matched


def recoveries(injections: Sequence[Injection], matched: Mapping[int, dict],
               records: Sequence[StreamRecord]) -> list[Recovery]:
    by_id = {r.stream_id: r for r in records if r.stream_id}
    found = []
    for i, fault in matched.items():
        inj = injections[i]
        for request_id in fault.get("affected_requests", ()):
            record = by_id.get(request_id)
            if record is None:
                continue
            stall = _stall(record, inj.at_s)
            if stall is not None:
                last, first = stall
                found.append(Recovery(inj.kind, request_id, first - max(last, inj.at_s), first - last))
    return found


def _stall(record: StreamRecord, at_s: float, window_s: float = 10.0) -> tuple[float, float] | None:
    """The stream's longest silence ending after a fault at `at_s` and beginning before
    `at_s + window_s`, as (last chunk before it, first chunk after it). The fault's time
    is when it was asked for, so a chunk may still come between it and the actual death."""
    times = [record.sent_s, *record.chunk_times_s]
    gaps = [(a, b) for a, b in zip(times, times[1:]) if b > at_s and a < at_s + window_s]
    return max(gaps, key=lambda g: g[1] - g[0], default=None)


def summarize(records: Sequence[StreamRecord], injections: Sequence[Injection], monitor: Monitor,
              desired: Mapping[str, int], max_replicas: Mapping[str, int]) -> dict:
    matched = match_faults(injections, monitor.faults.values())
    found = recoveries(injections, matched, records)
    affected = {rid for f in monitor.faults.values() for rid in f.get("affected_requests", ())}
    outcomes = Counter(r.outcome for r in records)
    corrupted = [r for r in records if r.corrupted]
    done = [r for r in records if r.outcome == COMPLETED]
    return {
        "requests": {
            "sent": len(records),
            "accepted": sum(r.accepted for r in records),
            "completed": outcomes[COMPLETED],
            "failed_clear": outcomes[FAILED],
            "rejected_clear": outcomes[REJECTED],
            "lost": outcomes[LOST],
            "corrupted": len(corrupted),
            "by_model": {m: dict(Counter(r.outcome for r in records if r.model == m))
                         for m in sorted({r.model for r in records})},
        },
        "faults_injected": dict(Counter(i.kind for i in injections if not i.skipped)),
        "faults_skipped": [f"{i.kind}: {i.skipped}" for i in injections if i.skipped],
        "faults_detected": dict(Counter(f"{f['component']}/{f['cause']}" for f in monitor.faults.values())),
        "undetected": [f"{i.kind} {i.target}" for n, i in enumerate(injections)
                       if not i.skipped and n not in matched],
        "detection_s": _by_kind((i.kind, f["detected_at"] - i.at_wall) for n, i in enumerate(injections)
                                if (f := matched.get(n)) is not None),
        "recovery": {
            "affected_streams": len(found),
            "resume_s": _dist([r.resume_s for r in found]),
            "stall_s": _dist([r.stall_s for r in found]),
            "resume_s_by_kind": _by_kind((r.kind, r.resume_s) for r in found),
        },
        "replacement_s": _dist([f["recovered_at"] - i.at_wall for n, i in enumerate(injections)
                                if i.kind in REPLICA_KINDS and (f := matched.get(n)) and f["recovered_at"]]),
        "replacement_s_by_pool": _by_kind((i.target.rsplit("-", 1)[0], f["recovered_at"] - i.at_wall)
                                          for n, i in enumerate(injections)
                                          if i.kind in REPLICA_KINDS and (f := matched.get(n)) and f["recovered_at"]),
        "unreplaced": [i.target for n, i in enumerate(injections)
                       if i.kind in REPLICA_KINDS and (f := matched.get(n)) and not f["recovered_at"]],
        "node_whole_again_s": _dist([w - i.at_s for i in injections if i.kind == "remove_node" and not i.skipped
                                     and (w := monitor.whole_again(i.at_s, dict(desired))) is not None]),
        "admin_unanswered": dict(Counter(s.why for s in monitor.samples if not s.controller_up)),
        "max_live_per_pool": _max_live(monitor.samples),
        "duplicates": {p: n for p, n in _max_live(monitor.samples).items() if n > max_replicas.get(p, n)},
        "drill_s": _dist([i.took_s for i in injections if i.kind in _DRILLS and not i.skipped]),
        "max_gap_s_unaffected": _dist([r.max_gap_s for r in done if r.stream_id not in affected]),
        "corrupted_examples": [{"stream_id": r.stream_id, "prompt": r.prompt, "got": r.text[:120]}
                               for r in corrupted[:5]],
        "lost_examples": [{"stream_id": r.stream_id, "status": r.status, "error": r.error, "chunks":
                           len(r.chunk_times_s)} for r in records if r.outcome == LOST][:5],
        "failed_examples": sorted({r.error or "" for r in records if r.outcome in (FAILED, REJECTED)})[:10],
    }


def _dist(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3),
            "max": round(max(values), 3)}


def _by_kind(pairs: Iterable[tuple[str, float]]) -> dict[str, dict]:
    grouped: dict[str, list[float]] = {}
    for kind, value in pairs:
        grouped.setdefault(kind, []).append(value)
    return {k: _dist(v) for k, v in sorted(grouped.items())}


def _max_live(samples: Sequence[Sample]) -> dict[str, int]:
    most: dict[str, int] = {}
    for s in samples:
        for pool, n in s.live.items():
            most[pool] = max(most.get(pool, 0), n)
    return most


def format_table(summary: Mapping) -> str:
    q, rec = summary["requests"], summary["recovery"]

    def d(x: Mapping) -> str:
        return f"p50 {x['p50']:.2f}  p99 {x['p99']:.2f}  max {x['max']:.2f}  (n={x['n']})" if x.get("n") else "-"

    lines = [
        f"requests sent            {q['sent']}",
        f"  accepted               {q['accepted']}",
        f"  completed              {q['completed']}",
        f"  failed, clear error    {q['failed_clear']}",
        f"  rejected, clear error  {q['rejected_clear']}",
        f"  lost                   {q['lost']}",
        f"  corrupted streams      {q['corrupted']}   (gap, duplicate or restart vs the fault-free text)",
        f"faults injected          {sum(summary['faults_injected'].values())}  "
        + ", ".join(f"{k} {n}" for k, n in sorted(summary["faults_injected"].items())),
        "faults detected          " + ", ".join(f"{k} {n}" for k, n in sorted(summary["faults_detected"].items())),
        f"recovery, fault -> first resumed token (s)   {d(rec['resume_s'])}",
        f"client stall across the fault (s)            {d(rec['stall_s'])}",
    ]
    lines += [f"  {k:<22} resume (s)   {d(v)}" for k, v in rec["resume_s_by_kind"].items()]
    lines += [f"detection (s) {k:<17} {d(v)}" for k, v in summary["detection_s"].items()]
    lines.append(f"  (admin drills took {d(summary['drill_s'])} to carry out: part of their detection)")
    lines += [
        f"replica death -> replacement READY (s)       {d(summary['replacement_s'])}",
        *(f"  pool {k:<16}                          {d(v)}" for k, v in summary["replacement_s_by_pool"].items()),
        f"node removed -> every pool whole again (s)   {d(summary['node_whole_again_s'])}",
        f"duplicates (live replicas above a pool's max) {summary['duplicates'] or 'none'}",
        f"longest stall of streams no fault touched (s) {d(summary['max_gap_s_unaffected'])}",
    ]
    if summary["faults_skipped"]:
        lines.append("skipped: " + "; ".join(summary["faults_skipped"]))
    if summary["undetected"]:
        lines.append("not in the fault log: " + ", ".join(summary["undetected"]))
    return "\n".join(lines)


def plot(records: Sequence[StreamRecord], injections: Sequence[Injection], samples: Sequence[Sample],
         path: Path, title: str) -> None:
    """Throughput (streamed characters/s) and ready replicas per pool over time, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    end = max([r.done_s or r.sent_s for r in records] + [1.0])
    bins = np.arange(0.0, end + 1.0, 1.0)
    chars = np.zeros(len(bins) - 1)
    for r in records:
        times = np.asarray(r.chunk_times_s)
        if len(times):
            sizes = np.full(len(times), len(r.text) / len(times))
            chars += np.histogram(times, bins=bins, weights=sizes)[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(2, 1))
    top.plot(bins[:-1], chars, color="black", lw=1, label="streamed chars/s")
    top.set_ylabel("output characters / s")
    colors = dict(zip((*_COMPONENT, "add_node"), plt.cm.tab10.colors))
    seen = set()
    for inj in injections:
        if inj.skipped:
            continue
        top.axvline(inj.at_s, color=colors[inj.kind], lw=1.2, alpha=0.8,
                    label=None if inj.kind in seen else inj.kind)
        seen.add(inj.kind)
    top.legend(loc="upper right", fontsize=8, ncol=2)
    top.set_title(title)
    pools = sorted({p for s in samples for p in s.ready})
    for pool in pools:
        bottom.step([s.at_s for s in samples], [s.ready.get(pool, 0) if s.controller_up else np.nan for s in samples],
                    where="post", label=f"{pool} ready")
    bottom.set_ylabel("ready replicas")
    bottom.set_xlabel("seconds since the load began")
    bottom.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
