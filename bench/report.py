"""What a load run records per request, and how runs are summarised, printed and plotted.

`RequestRecord` is the raw fact of one request as the client saw it; every figure
(throughput, TTFT, TPOT, end-to-end latency, errors) is derived from records by the
pure functions here, so the same numbers come out of a live run and of a saved JSON.
Times are seconds since the start of the run (the client's monotonic clock).

Where a server's CPU goes: `cpu_by_process` reads the CPU seconds of every process of a
session from /proc (a server started with `start_new_session` and all it spawns), and
`cpu_delta` turns two such snapshots into seconds spent per process name.

The conditions of a measurement, printed with every result: `machine()` (CPU, cores),
`source_digest()` (which Flotilla code ran) and `wait_for_quiet()` (this machine is
shared: a run waits for others' load to fall before it starts).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RequestRecord:
    """One request of a run, as the client saw it (seconds since the run's start)."""

    index: int  # position in the plan
    scheduled_s: float  # when the plan said to send it
    sent_s: float  # when it was sent
    prompt_tokens: int
    max_tokens: int  # output tokens asked for (exactly, with ignore_eos)
    chunk_times_s: tuple[float, ...]  # arrival of each streamed chunk carrying output
    output_tokens: int  # the server's usage count, else the number of chunks
    done_s: float  # when the stream ended (or the error arrived)
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None  # why it failed, None when it succeeded

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: send to the first chunk with output."""
        return self.chunk_times_s[0] - self.sent_s if self.chunk_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None below two tokens."""
        if not self.chunk_times_s or self.output_tokens < 2:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.sent_s

    @property
    def lateness_s(self) -> float:
        """How far behind its schedule the client sent it (the client's own lag)."""
        return self.sent_s - self.scheduled_s


@dataclass(frozen=True)
class Distribution:
    """Percentiles of one latency, in seconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    n: int


@dataclass(frozen=True)
class LoadSummary:
    """The figures of one run."""

    sent: int
    ok: int
    errors: dict[str, int]  # error kind -> count
    short: int  # succeeded with fewer output tokens than asked
    duration_s: float  # first send to last stream end
    request_throughput: float  # successful requests per second
    output_token_throughput: float  # output tokens of successful requests per second
    ttft: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    lateness_p99_s: float  # the client's own lag sending; large means the client was the bottleneck


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def distribution(values: Sequence[float]) -> Distribution | None:
    if len(values) == 0:
        return None
    return Distribution(percentile(values, 50), percentile(values, 90), percentile(values, 99),
                        float(np.mean(values)), len(values))


def summarize(records: Sequence[RequestRecord]) -> LoadSummary:
    """Throughput over the run's span, latency percentiles over successful requests."""
    if not records:
        raise ValueError("no records to summarise")
    ok = [r for r in records if r.ok]
    duration = max(r.done_s for r in records) - min(r.sent_s for r in records)
    per_s = 1.0 / duration if duration > 0 else 0.0
    return LoadSummary(
        sent=len(records),
        ok=len(ok),
        errors=dict(Counter(r.error for r in records if not r.ok and r.error)),
        short=sum(r.output_tokens < r.max_tokens for r in ok),
        duration_s=duration,
        request_throughput=len(ok) * per_s,
        output_token_throughput=sum(r.output_tokens for r in ok) * per_s,
        ttft=distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e=distribution([r.e2e_s for r in ok]),
        lateness_p99_s=percentile([r.lateness_s for r in records], 99),
    )


@dataclass(frozen=True)
class Pooled:
    """One system at one level, every repetition's requests together."""

    system: str
    rate: float
    runs: int
    output_token_throughput: float  # output tokens / seconds, summed over runs
    request_throughput: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    errors: int
    ttft_p50_spread_s: float  # largest minus smallest TTFT p50 of single runs: the noise between runs
    load_average: float  # mean over runs of the machine's load average as each ended


def pool(system: str, rate: float, runs: Sequence[tuple[LoadSummary, Sequence[RequestRecord]]],
         load_average: float = 0.0) -> Pooled:
    """Several runs of one system at one level as one: latencies over all their successful
    requests, throughput as all their output tokens over all their durations."""
    ok = [r for _, records in runs for r in records if r.ok]
    if not ok:
        raise ValueError(f"{system} at rate {rate:g}: no request succeeded")
    seconds = sum(summary.duration_s for summary, _ in runs)
    p50s = [summary.ttft.p50 for summary, _ in runs if summary.ttft]
    ttft, tpot = [r.ttft_s for r in ok], [r.tpot_s for r in ok if r.tpot_s is not None]
    return Pooled(system, rate, len(runs), sum(r.output_tokens for r in ok) / seconds, len(ok) / seconds,
                  percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50), percentile(tpot, 99),
                  percentile([r.e2e_s for r in ok], 50), sum(summary.sent - summary.ok for summary, _ in runs),
                  max(p50s) - min(p50s), load_average)


@dataclass(frozen=True)
class Overhead:
    """A system (Flotilla) against a reference (direct vLLM) at one level, both pooled."""

    system: str
    rate: float
    throughput_ratio: float  # Flotilla / direct output tokens/s; target >= 0.95
    added_ttft_p50_ms: float  # target <= 5 ms
    added_ttft_p99_ms: float
    tpot_p50_ratio: float
    tpot_p99_ratio: float
    e2e_p50_ratio: float


def overhead(direct: Pooled, flotilla: Pooled) -> Overhead:
    """`flotilla` measured against `direct` at the same level."""
    return Overhead(flotilla.system, direct.rate, flotilla.output_token_throughput / direct.output_token_throughput,
                    (flotilla.ttft_p50_s - direct.ttft_p50_s) * 1e3, (flotilla.ttft_p99_s - direct.ttft_p99_s) * 1e3,
                    flotilla.tpot_p50_s / direct.tpot_p50_s, flotilla.tpot_p99_s / direct.tpot_p99_s,
                    flotilla.e2e_p50_s / direct.e2e_p50_s)


def token_rate_series(records: Sequence[RequestRecord], bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second over time, in bins of `bin_s`: (bin starts, tokens/s).

    A request's tokens are spread evenly over its chunks (a chunk usually holds one).
    """
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    times, weights = [], []
    for r in records:
        if r.ok and r.chunk_times_s:
            times.extend(r.chunk_times_s)
            weights.extend([r.output_tokens / len(r.chunk_times_s)] * len(r.chunk_times_s))
    if not times:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, max(times) + bin_s, bin_s)
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    return edges[:-1], counts / bin_s


def format_summary(s: LoadSummary) -> str:
    """A plain-text table of one run."""
    errors = ", ".join(f"{n} {kind}" for kind, n in sorted(s.errors.items())) or "none"
    lines = [
        f"requests: {s.sent} sent, {s.ok} ok, {s.short} short; errors: {errors}",
        f"duration {s.duration_s:.1f} s; throughput {s.request_throughput:.2f} req/s, "
        f"{s.output_token_throughput:.0f} output tokens/s",
        f"{'':<10}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for name, d, scale, unit in (("TTFT", s.ttft, 1e3, "ms"), ("TPOT", s.tpot, 1e3, "ms"),
                                 ("E2E", s.e2e, 1.0, "s")):
        if d is None:
            lines.append(f"{name + ' (' + unit + ')':<10}{'-':>10}{'-':>10}{'-':>10}{'-':>10}")
            continue
        cells = "".join(f"{v * scale:>10.1f}" if unit == "ms" else f"{v * scale:>10.2f}"
                        for v in (d.p50, d.p90, d.p99, d.mean))
        lines.append(f"{name + ' (' + unit + ')':<10}{cells}")
    lines.append(f"client send lag p99: {s.lateness_p99_s * 1e3:.1f} ms")
    return "\n".join(lines)


def machine() -> str:
    """The CPU model, core count and OS of this machine, for every printed result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def source_digest(root: Path = REPO_ROOT) -> str:
    """A digest of Flotilla's Python sources, so runs of different code are not pooled unnoticed
    (others edit the tree while the benchmark runs)."""
    digest = hashlib.sha256()
    for path in sorted(p for package in ("orchestrator", "actors", "policies") for p in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 10.0) -> float:
    """Wait until the 1-minute load average is at most `max_load` (others share this machine);
    gives up after `timeout_s` and says so. Returns the load average it went on with."""
    deadline = time.monotonic() + timeout_s
    load = os.getloadavg()[0]
    if load > max_load:
        print(f"  load average {load:.1f} > {max_load:g}: waiting up to {timeout_s:.0f}s for a quieter machine",
              flush=True)
    while load > max_load and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    if load > max_load:
        print(f"  still {load:.1f}; going on (figures of this run are suspect)", flush=True)
    return load


def write_json(path: Path, data: Mapping) -> None:
    """Write `data` (dataclasses become dicts) as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _session_processes(sid: int) -> Iterator[tuple[int, str, float]]:
    """(pid, name, CPU seconds so far) of every live process in session `sid`, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) != sid:
            continue
        yield int(entry.name), process_name(cmdline), (int(fields[11]) + int(fields[12])) * _TICK_S


def process_name(cmdline: list[bytes]) -> str:
    """`ray::ProxyActor`, `VLLM::EngineCore`, `gcs_server`, `vllm api_server`, ... for a cmdline."""
    args = [a.decode(errors="replace") for a in cmdline if a]
    if not args:
        return "?"
    if args[0].startswith("ray::"):  # "ray::Class.method" while a task runs, "ray::Class" between
        return args[0].split()[0].split(".")[0]
    if args[0].startswith("VLLM::"):
        return args[0].split()[0]
    if "vllm.entrypoints.openai.api_server" in args:
        return "vllm api_server"
    script = next((Path(a).name for a in args[1:] if a.endswith(".py") or a.endswith("/flotilla")), "")
    return script or Path(args[0]).name


def cpu_by_process(sid: int) -> dict[int, tuple[str, float]]:
    """Name and CPU seconds so far of each live process of the session, by pid."""
    return {pid: (name, cpu) for pid, name, cpu in _session_processes(sid)}


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by process name (a new process from 0)."""
    spent: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        spent[name] = spent.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
    return spent


def plot_runs(runs: Mapping[str, Sequence[RequestRecord]], path: Path, title: str) -> None:
    """Latency CDFs (TTFT, TPOT, E2E) and output tokens/s over time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    metrics = (("TTFT (ms)", lambda r: r.ttft_s, 1e3), ("TPOT (ms)", lambda r: r.tpot_s, 1e3),
               ("E2E (s)", lambda r: r.e2e_s, 1.0))
    for label, records in runs.items():
        ok = [r for r in records if r.ok]
        for ax, (name, get, scale) in zip(axes, metrics):
            values = np.sort([get(r) * scale for r in ok if get(r) is not None])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
            ax.set(xlabel=name, ylabel="fraction of requests", title=f"{name.split()[0]} CDF")
        starts, rates = token_rate_series(records)
        axes[3].plot(starts, rates, label=label)
    axes[3].set(xlabel="time since start (s)", ylabel="output tokens/s", title="throughput over time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
