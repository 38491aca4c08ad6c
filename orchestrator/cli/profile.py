"""`flotilla profile`: measure a real vLLM replica's step times for capacity profiles.

    flotilla profile --out bench/profiles/cpu-tiny-llama.csv \
        [--model-dir .flotilla/models/tiny-llama] [--gpu-type CPU] \
        [--prompts 1,16,64,256,512,768,992] [--batches 1,2,4,8] [--contexts 1,128,384,768,960]

Starts one `VllmEngine` on this machine's device (the CPU build here, the GPU build on a
GPU node) and sweeps, with prefix caching off and random prompts:
- prefill: one request of P prompt tokens and one output token on an idle engine; its
  time to first token is the prefill step (row `prefill`, size P, context 0);
- decode: B requests of C prompt tokens started together, each made to emit T tokens;
  the mean gap between a request's tokens after the first is one decode step of batch B
  (row `decode`, size B, context C + T/2, the mean KV tokens each sequence reads).
Each point is the median of `--repeats` runs. The CSV (`policies.measured_profile`
columns under `# key: value` condition lines: machine, model, engine arguments, vLLM
version, date) feeds `flotilla plan --step-profile TYPE=FILE`, which derives the capacity
per bucket from the measured steps (`policies.capacity`). The command ends by printing
that capacity table for --slo.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from orchestrator.cli.plan import parse_slo


def register(commands) -> None:
    profile = commands.add_parser("profile", help="measure a vLLM replica's step times")
    profile.add_argument("--out", required=True, type=Path, help="CSV file to write")
    profile.add_argument("--model-dir", type=Path, default=None,
                         help="checkpoint directory (default: the local tiny Llama, built if absent)")
    profile.add_argument("--gpu-type", default="CPU", help="the device type the table is for")
    profile.add_argument("--prompts", default="1,16,64,256,512,768,992", help="prefill prompt lengths")
    profile.add_argument("--batches", default="1,2,4,8", help="decode batch sizes")
    profile.add_argument("--contexts", default="1,128,384,768,960", help="decode prompt lengths")
    profile.add_argument("--decode-tokens", type=int, default=32, help="tokens each decode run emits")
    profile.add_argument("--repeats", type=int, default=3)
    profile.add_argument("--max-model-len", type=int, default=1024)
    profile.add_argument("--block-size", type=int, default=32)
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--slo", type=parse_slo, default=parse_slo("ttft=1,tpot=0.1"),
                         help="SLO of the capacity table printed at the end")
    profile.set_defaults(run=run)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir = args.model_dir or _local_model()
    prompts, batches, contexts = _ints(args.prompts), _ints(args.batches), _ints(args.contexts)
    longest = max(prompts + [c + args.decode_tokens for c in contexts])
    if longest > args.max_model_len:
        raise SystemExit(f"flotilla profile: {longest} tokens exceed --max-model-len {args.max_model_len}")
    rows, engine_args = asyncio.run(_measure(args, model_dir, prompts, batches, contexts))
    conditions = _conditions(args, model_dir, engine_args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {k}: {v}" for k, v in conditions.items()] + ["op,size,context,seconds"]
    lines += [f"{op},{size},{context},{seconds:.6g}" for op, size, context, seconds in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")
    _print_capacity(args, model_dir)
    return 0


def _local_model() -> Path:
    from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

    return build_local_model(DEFAULT_MODEL_DIR, progress=None)


async def _measure(args, model_dir: Path, prompts, batches, contexts):
    from actors.engines.vllm_engine import VllmEngine

    max_seqs = max(batches)
    engine = VllmEngine(model_dir.name, str(model_dir), max_model_len=args.max_model_len,
                        block_size=args.block_size, max_num_seqs=max_seqs,
                        max_waiting=max_seqs, enable_prefix_caching=False)
    engine_args = {"max_model_len": args.max_model_len, "block_size": args.block_size,
                   "max_num_seqs": max_seqs, "enable_prefix_caching": False}
    await engine.start()
    rng = np.random.default_rng(args.seed)
    vocab = _vocab_size(model_dir)
    rows = []
    try:
        await _run_one(engine, rng, vocab, 8, 4)  # warm-up: first steps compile and allocate
        for p in prompts:
            times = [(await _run_one(engine, rng, vocab, p, 1))[0] for _ in range(args.repeats)]
            rows.append(("prefill", p, 0, statistics.median(times)))
            print(f"prefill {p:>5} tokens: {rows[-1][3] * 1e3:8.1f} ms", flush=True)
        for c in contexts:
            for b in batches:
                gaps = [await _decode_gap(engine, rng, vocab, b, c, args.decode_tokens)
                        for _ in range(args.repeats)]
                rows.append(("decode", b, c + args.decode_tokens // 2, statistics.median(gaps)))
                print(f"decode batch {b:>3} context {c:>5}: {rows[-1][3] * 1e3:8.1f} ms", flush=True)
    finally:
        await engine.shutdown()
    return rows, engine_args


async def _run_one(engine, rng, vocab: int, prompt: int, tokens: int) -> tuple[float, list[float]]:
    """Time to first token and the arrival times of every token of one request."""
    from actors.engines.base import GenerationRequest, SamplingSpec

    request = GenerationRequest(f"profile-{rng.integers(1 << 62)}", engine.model_name,
                                tuple(int(t) for t in rng.integers(3, vocab, size=prompt)),
                                SamplingSpec(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    began = time.perf_counter()
    stamps = []
    async for delta in engine.generate(request):
        now = time.perf_counter()
        stamps += [now] * len(delta.token_ids)
    return stamps[0] - began, stamps


async def _decode_gap(engine, rng, vocab: int, batch: int, context: int, tokens: int) -> float:
    """Mean gap between tokens after the first, over `batch` requests decoding together."""
    runs = await asyncio.gather(*(_run_one(engine, rng, vocab, context, tokens) for _ in range(batch)))
    # the tail of each run, after every request has started decoding, is batch-`batch` steps
    start = max(stamps[0] for _, stamps in runs)
    end = min(stamps[-1] for _, stamps in runs)
    inside = [sum(start <= t <= end for t in stamps) for _, stamps in runs]
    steps = min(inside) - 1
    if steps < 2:
        raise SystemExit("flotilla profile: decode runs did not overlap; raise --decode-tokens")
    return (end - start) / steps


def _vocab_size(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def _conditions(args, model_dir: Path, engine_args: dict) -> dict[str, str]:
    import vllm

    from orchestrator.cli.plan import model_spec

    spec = model_spec(str(model_dir))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "what": "measured step times of one vLLM replica (flotilla profile)",
        "gpu_type": args.gpu_type,
        "machine": f"{platform.node()}, {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}",
        "model": f"{model_dir.name} ({spec.params} parameters, {spec.layers} layers, "
                 f"hidden {spec.hidden_size})",
        "engine": f"vLLM {vllm.__version__}, VllmEngine {engine_args}, "
                  f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '')} GiB",
        "method": f"median of {args.repeats}; prefill = TTFT of one request with 1 output token; "
                  f"decode = mean token gap of B requests decoding {args.decode_tokens} tokens "
                  "together (context = prompt + tokens/2)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _print_capacity(args, model_dir: Path) -> None:
    from orchestrator.cli.plan import capacities, model_spec
    from policies.workload import BucketScheme

    scheme = BucketScheme.log_spaced(min_input=32, max_input=1024, min_output=16, max_output=512)
    spec = model_spec(str(model_dir))
    caps = capacities(spec, [(args.gpu_type, 1)], scheme, args.slo, max_num_seqs=max(_ints(args.batches)),
                      step_profiles={args.gpu_type: args.out})
    cap = caps[args.gpu_type]
    print(f"\ncapacity of one {args.gpu_type} replica within {args.slo} (req/s, from the measured steps):")
    print(f"{'BUCKET':<28} {'REQ/S':>8}  LIMIT")
    for bucket, rate, limit in zip(scheme.buckets, cap.rates, cap.limits):
        if bucket.input_hi + bucket.output_hi <= args.max_model_len + 2:
            print(f"{bucket.label:<28} {rate:>8.3g}  {limit}")
