"""Open-loop load generator for any OpenAI-compatible server (Flotilla, `vllm serve`, ...).

    python -m bench.loadgen --base-url http://127.0.0.1:8000/v1 --model tiny-llama \
        --rate 4 --duration 60 --arrivals poisson|bursty|trace --trace conv

Arrivals are open loop (a request is sent at its time whatever the server is doing):
Poisson at `rate`; bursty, a gamma renewal process whose inter-arrival times have the
mean 1/rate and squared coefficient of variation `burstiness` (1 is Poisson, 4 comes in
clumps); or a trace's own timestamps, time-compressed to `rate`. Request lengths come
from the Azure traces (`bench.traces`), fitted into the model's context.

Prompts are token ids (`/v1/completions` takes a list of ints, vLLM's server too),
drawn uniformly from the model's ordinary vocabulary: the prompt has exactly the
trace's length on every server, and no two prompts share a cached prefix. Each request
streams (SSE, `stream_options.include_usage`) with `ignore_eos`, so it generates
exactly its trace's output length; per request the client records its send time, the
arrival time of every chunk, the server's output token count and any error.

The plan (arrivals, lengths, prompt ids) is a pure function of the arguments and the
seed, so two servers can be loaded with the identical schedule. Records, summaries and
plots: `bench.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from bench import traces
from bench.report import RESULTS_DIR, RequestRecord, format_summary, machine, plot_runs, summarize, write_json
from bench.traces import TraceRequest

ARRIVALS = ("poisson", "bursty", "trace")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".flotilla" / "models" / "tiny-llama"


# arrivals ------------------------------------------------------------------------------

def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s) in [0, duration_s) of a Poisson process of `rate` requests/s."""
    return gamma_arrivals(rate, duration_s, rng, burstiness=1.0)


def gamma_arrivals(rate: float, duration_s: float, rng: np.random.Generator,
                   burstiness: float) -> np.ndarray:
    """Send times (s) in [0, duration_s) of a gamma renewal process.

    Inter-arrival times are gamma with mean 1/rate and squared coefficient of variation
    `burstiness` (shape 1/burstiness): 1 is Poisson; above 1, short gaps cluster into
    bursts separated by long lulls, at the same mean rate.
    """
    if not rate > 0 or not duration_s > 0:
        raise ValueError(f"rate and duration_s must be > 0, got {rate} and {duration_s}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    shape = 1.0 / burstiness
    expected = rate * duration_s
    times = np.zeros(0)
    while not len(times) or times[-1] < duration_s:
        # draw in chunks: enough for the whole run almost always, more if not
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(expected + 10 * np.sqrt(expected) + 16))
        start = times[-1] if len(times) else 0.0
        times = np.concatenate([times, start + np.cumsum(gaps)])
    return times[times < duration_s]


def trace_window(trace: Sequence[TraceRequest], duration_s: float, rate: float | None,
                 start_s: float = 0.0) -> tuple[TraceRequest, ...]:
    """The trace's requests from `start_s` (trace time) on, compressed to `rate`, for `duration_s`.

    The speed-up is `rate` over the whole trace's mean rate (1 when `rate` is None), so
    the window keeps the trace's own burstiness and only its pace changes.
    """
    speedup = 1.0 if rate is None else rate / traces.mean_rate(trace)
    picked = traces.window(trace, start_s, start_s + duration_s * speedup)
    if not picked:
        raise ValueError(f"no trace requests in [{start_s}, {start_s + duration_s * speedup}) s")
    return traces.compress(picked, speedup)


# the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadSpec:
    """What load to offer: arrivals, pace, lengths, and the seed that fixes them all."""

    arrivals: str = "poisson"  # one of ARRIVALS
    rate: float | None = 4.0  # requests/s; None with "trace" keeps the trace's pace
    duration_s: float = 60.0  # span of send times
    trace: str = "conv"  # where lengths (and with "trace", arrivals) come from
    burstiness: float = 4.0  # "bursty": squared CV of inter-arrival times
    trace_start_s: float = 0.0  # "trace": where in the trace the window starts
    max_model_len: int = 1024  # prompt + output tokens must fit in it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {self.arrivals!r}")
        if self.rate is None and self.arrivals != "trace":
            raise ValueError(f"arrivals {self.arrivals!r} needs a rate")


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    at_s: float  # send time, seconds after the run's start
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Plan:
    spec: LoadSpec
    requests: tuple[PlannedRequest, ...]
    clipped: int  # requests shortened to fit max_model_len

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


def prompt_vocabulary(model_dir: Path) -> np.ndarray:
    """Token ids fit for prompts: the model's vocabulary minus its special (added) tokens."""
    try:
        vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read the vocabulary of {model_dir}: {e}") from None
    return np.setdiff1d(np.arange(vocab_size), [t["id"] for t in added])


def timed_requests(spec: LoadSpec, trace: Sequence[TraceRequest],
                   rng: np.random.Generator) -> tuple[TraceRequest, ...]:
    """Arrival times and lengths of the spec's requests, before fitting into the context."""
    if spec.arrivals == "trace":
        return trace_window(trace, spec.duration_s, spec.rate, spec.trace_start_s)
    if spec.arrivals == "poisson":
        times = poisson_arrivals(spec.rate, spec.duration_s, rng)
    else:
        times = gamma_arrivals(spec.rate, spec.duration_s, rng, spec.burstiness)
    lengths = traces.sample_lengths(trace, len(times), rng)
    return tuple(TraceRequest(float(t), int(p), int(o)) for t, (p, o) in zip(times, lengths))


def build_plan(spec: LoadSpec, trace: Sequence[TraceRequest], vocabulary: np.ndarray) -> Plan:
    """The whole schedule, prompts included; a pure function of its arguments."""
    rng = np.random.default_rng(spec.seed)
    fitted = traces.clip_to_context(timed_requests(spec, trace, rng), spec.max_model_len)
    planned = tuple(
        PlannedRequest(i, r.arrival_s, tuple(int(t) for t in rng.choice(vocabulary, r.prompt_tokens)),
                       r.output_tokens)
        for i, r in enumerate(fitted.requests))
    return Plan(spec, planned, fitted.clipped)


# sending -------------------------------------------------------------------------------

async def run_load(base_url: str, model: str, plan: Sequence[PlannedRequest], *, api_key: str = "unused",
                   timeout_s: float = 600.0, temperature: float = 0.0,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[RequestRecord]:
    """Send every planned request at its time (open loop), streaming; one record each.

    `transport` replaces the network (httpx's own default when None).

    HTTP and SSE are handled here with httpx rather than the `openai` client: profiled on
    this 2-core machine, about half of that client's CPU went to walking each prompt id
    through its request transform and to building a pydantic model per chunk; without it
    the load generator spends several times less CPU, which it would otherwise take from
    the server being measured.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    headers = {"Authorization": f"Bearer {api_key}"}
    url = base_url.rstrip("/") + "/completions"
    loop = asyncio.get_running_loop()
    start = loop.time()

    def now() -> float:
        return loop.time() - start

    tasks = []
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=timeout_s, transport=transport) as client:
        try:
            for p in plan:
                delay = p.at_s - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = {"model": model, "prompt": list(p.prompt_token_ids), "max_tokens": p.max_tokens,
                        "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
                        "ignore_eos": True}
                tasks.append(asyncio.create_task(_one(client, url, body, p, now)))
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


DONE = "[DONE]"


def read_event(line: str) -> dict | str | None:
    """One SSE line: its JSON payload, DONE at the end of the stream, None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == DONE else json.loads(data)


async def _one(client: httpx.AsyncClient, url: str, body: dict, p: PlannedRequest, now) -> RequestRecord:
    sent = now()
    chunks: list[float] = []
    usage: int | None = None
    status: int | None = None
    error: str | None = None
    try:
        async with client.stream("POST", url, json=body) as response:
            status = response.status_code
            if status != 200:
                await response.aread()
                error = f"HTTP {status}"
            else:
                async for line in response.aiter_lines():
                    event = read_event(line)
                    if event is None:
                        continue
                    if event == DONE:
                        break
                    if "error" in event:  # the server gave up mid-stream
                        error = f"stream error: {str(event['error'].get('code') or event['error'])[:60]}"
                        break
                    if event.get("usage"):
                        usage = event["usage"]["completion_tokens"]
                    if event.get("choices"):
                        chunks.append(now())
    except httpx.TimeoutException:
        error = "timeout"
    except (httpx.TransportError, ValueError) as e:  # ValueError: a line that is not JSON
        error = f"{type(e).__name__}"
    return RequestRecord(index=p.index, scheduled_s=p.at_s, sent_s=sent, prompt_tokens=len(p.prompt_token_ids),
                         max_tokens=p.max_tokens, chunk_times_s=tuple(round(t, 6) for t in chunks),
                         output_tokens=usage if usage is not None else len(chunks), done_s=now(),
                         status=status, error=error)


async def warm_up(base_url: str, model: str, vocabulary: np.ndarray, *, requests: int = 4,
                  api_key: str = "unused", seed: int = 0) -> list[RequestRecord]:
    """A few short requests, two at a time, that are not measured: the server's first requests
    and this client's first use (its lazy imports, its connection pool) are slow."""
    rng = np.random.default_rng(seed)
    plan = [PlannedRequest(i, 0.05 * (i // 2), tuple(int(t) for t in rng.choice(vocabulary, 64)), 16)
            for i in range(requests)]
    return await run_load(base_url, model, plan, api_key=api_key, timeout_s=120.0)


# the command line ----------------------------------------------------------------------

def describe_plan(plan: Plan) -> str:
    spec = plan.spec
    n = len(plan.requests)
    span = plan.requests[-1].at_s if plan.requests else 0.0
    prompt = np.mean([len(r.prompt_token_ids) for r in plan.requests]) if n else 0.0
    output = plan.output_tokens / n if n else 0.0
    return (f"{n} requests ({spec.arrivals} arrivals, {n / spec.duration_s:.2f} req/s offered over "
            f"{spec.duration_s:g} s, last at {span:.1f} s), lengths from the {spec.trace} trace: mean "
            f"prompt {prompt:.0f}, mean output {output:.0f} tokens; {plan.clipped} clipped to fit "
            f"{spec.max_model_len} positions; seed {spec.seed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny-llama", help="the served model's name")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="the model's checkpoint folder (its vocabulary makes the prompts)")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s (default 4; with --arrivals trace, the trace's own pace)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--trace", default="conv", help="code, conv or a CSV path")
    parser.add_argument("--burstiness", type=float, default=4.0, help="bursty: CV^2 of inter-arrival times")
    parser.add_argument("--trace-start", type=float, default=0.0, help="trace: window start, trace seconds")
    parser.add_argument("--max-model-len", type=int, default=1024, help="prompt + output fit in this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests sent first")
    parser.add_argument("--out", default="loadgen", help="name of the JSON and PNG under bench/results/")
    args = parser.parse_args(argv)

    rate = args.rate if args.rate is not None or args.arrivals == "trace" else 4.0
    spec = LoadSpec(args.arrivals, rate, args.duration, args.trace, args.burstiness, args.trace_start,
                    args.max_model_len, args.seed)
    vocabulary = prompt_vocabulary(args.model_dir)
    plan = build_plan(spec, traces.load_trace(args.trace), vocabulary)
    print(f"machine: {machine()}\nplan: {describe_plan(plan)}\nserver: {args.base_url} ({args.model})")
    records = asyncio.run(_warm_then_run(args, plan, vocabulary))
    summary = summarize(records)
    print(format_summary(summary))
    json_path, png_path = RESULTS_DIR / f"{args.out}.json", RESULTS_DIR / f"{args.out}.png"
    write_json(json_path, {"machine": machine(), "base_url": args.base_url,
                           "model": args.model, "spec": asdict(spec), "clipped": plan.clipped,
                           "summary": summary, "records": records})
    plot_runs({args.base_url: records}, png_path, f"{args.model} at {args.base_url}: {describe_plan(plan)}")
    print(f"wrote {json_path} and {png_path}")
    return 0 if summary.ok == summary.sent else 1


async def _warm_then_run(args: argparse.Namespace, plan: Plan, vocabulary: np.ndarray) -> list[RequestRecord]:
    if args.warmup:
        failed = [r.error for r in await warm_up(args.base_url, args.model, vocabulary, requests=args.warmup,
                                                 api_key=args.api_key) if not r.ok]
        if failed:
            raise SystemExit(f"warm-up failed: {', '.join(sorted(set(failed)))}")
    return await run_load(args.base_url, args.model, plan.requests, api_key=args.api_key)


if __name__ == "__main__":
    sys.exit(main())
