"""Time to first token of a long shared prefix: cold, own cache, same-node store, other-node store.

    python -m bench.kvstore_ttft [--trials 3] [--sim-lengths 1024,4096,16384] [--no-vllm]

One run, side by side, on a two-node `ray.cluster_utils.Cluster` on this machine, with
a KV-cache store on each node. For each prompt length and trial a fresh prompt is
served (a) cold by engine A on node 1, (b) again by A (its own prefix cache), (c) by
engine C on node 1, which loads it from node 1's store, and (d) by engine B on node 2,
which loads it from node 1's store through Ray's object transfer.

- vLLM (CPU build, the project's tiny Llama, block 32): prompts of 992 tokens (its
  context limit is 1,024). C and B run with vLLM's own prefix cache off, so every
  trial's (c) and (d) are store loads; A runs with it on.
- sim engine (Llama-2-7B on a simulated H100, `time_scale` 1: steps sleep their modelled
  time): 1k, 4k and 16k tokens; C and B are fresh engines per trial. A loaded block
  costs its modelled bytes at 25 GB/s (same node) or 12.5 GB/s (other node) in the
  simulated step; the real store traffic moves those bytes scaled by 1/64.

TTFT is measured inside the engine's host actor: from `generate` to the first token.
Prints the table (medians) and the ratios to cold, and writes bench/results/kvstore_ttft.json.
The machine is shared and busy: compare within a row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.kv_link import KVLink, KVLinkSettings
from actors.kvstore import StoreSettings
from actors.kvstore_client import KVStoreClient
from bench.kvstore_plots import plot_ttft

NAMESPACE = "kvstore-bench"
RESULTS = Path(__file__).parent / "results"
MODES = ("cold", "own cache", "same-node store", "other-node store")
VLLM_PROMPT = 992


class Probe:
    """Hosts engines on one node and times their first token (a bench-only actor)."""

    def __init__(self, link_settings: KVLinkSettings):
        self.settings = link_settings
        self.engines: dict = {}

    async def add_vllm(self, name: str, model_dir: str, prefix_caching: bool) -> None:
        from actors.engines.vllm_engine import VllmEngine

        engine = VllmEngine("tiny-llama", model_dir, max_model_len=1024, block_size=32, max_num_seqs=4,
                            enable_prefix_caching=prefix_caching)
        await self._start(name, engine)

    async def add_sim(self, name: str, max_model_len: int) -> None:
        from actors.engines.sim import SimEngine
        from policies.perfmodel import MODEL_PRESETS

        engine = SimEngine("sim-llama-7b", "H100", MODEL_PRESETS["llama-2-7b"], max_model_len=max_model_len,
                           time_scale=1.0)
        await self._start(name, engine)

    async def _start(self, name: str, engine) -> None:
        if name in self.engines:
            await self.engines.pop(name).shutdown()
        engine.attach_kv_store(KVLink(self.settings, ray.get_runtime_context().get_node_id()))
        await engine.start()
        self.engines[name] = engine

    async def ttft(self, name: str, model: str, prompt: list[int]) -> dict:
        engine = self.engines[name]
        before = engine.stats()
        request = GenerationRequest(f"q{time.monotonic_ns()}", model, tuple(prompt),
                                    SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True))
        began = time.perf_counter()
        first = None
        async for _ in engine.generate(request):
            first = first or time.perf_counter() - began
        await asyncio.sleep(0.5)  # vLLM's counters arrive a step late; the sim's save runs in the background
        after = engine.stats()
        return {"ttft_s": first, "computed": after.computed_prompt_tokens - before.computed_prompt_tokens,
                "cached": after.cached_prompt_tokens - before.cached_prompt_tokens,
                "loaded": after.loaded_prompt_tokens - before.loaded_prompt_tokens}


def start_cluster() -> tuple[Cluster, str, str]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 2 << 30})
    other = cluster.add_node(num_cpus=2, object_store_memory=2 << 30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR")
    return cluster, cluster.head_node.node_id, other.node_id


def probe_on(node_id: str, settings: KVLinkSettings):
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return ray.remote(Probe).options(
        num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        runtime_env={"env_vars": env}, max_concurrency=4,
    ).remote(settings)


def prompt_of(length: int, trial: int, vocab: int) -> list[int]:
    return [(trial * 104729 + length * 7 + i * 31) % (vocab - 10) + 5 for i in range(length)]


def run_row(probes, names, model: str, length: int, trial: int, vocab: int, wait_saved) -> dict[str, dict]:
    """One fresh prompt through the four modes, in order."""
    near, far = probes
    a, c, b = names
    prompt = prompt_of(length, trial, vocab)
    row = {"cold": ray.get(near.ttft.remote(a, model, prompt))}
    row["own cache"] = ray.get(near.ttft.remote(a, model, prompt))
    wait_saved(prompt)
    row["same-node store"] = ray.get(near.ttft.remote(c, model, prompt))
    row["other-node store"] = ray.get(far.ttft.remote(b, model, prompt))
    return row


def saved_waiter(store: KVStoreClient, model: str, block_size: int):
    from policies.block_hash import block_hashes

    def wait(prompt: list[int]) -> None:
        hashes = block_hashes(prompt, block_size, model)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if asyncio.run(store.contains(model, hashes, timeout_s=10)) == len(hashes):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the store never held the {len(hashes)} blocks of a {len(prompt)}-token prompt")
    return wait


def summarize(rows: list[dict[str, dict]]) -> dict[str, dict]:
    out = {}
    for mode in MODES:
        samples = [r[mode] for r in rows]
        out[mode] = {"ttft_s": statistics.median(s["ttft_s"] for s in samples),
                     "loaded": samples[-1]["loaded"], "computed": samples[-1]["computed"],
                     "cached": samples[-1]["cached"]}
    return out


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print(f"{'engine, prompt':28} " + " ".join(f"{m:>22}" for m in MODES))
    for key, modes in results.items():
        cold = modes["cold"]["ttft_s"]
        cells = [f"{modes[m]['ttft_s'] * 1e3:8.1f} ms ({modes[m]['ttft_s'] / cold:4.2f}x)" for m in MODES]
        print(f"{key:28} " + " ".join(f"{c:>22}" for c in cells))
    print("tokens computed / cached / loaded in the last trial:")
    for key, modes in results.items():
        print(f"  {key:26} " + "  ".join(f"{m}: {modes[m]['computed']}/{modes[m]['cached']}/{modes[m]['loaded']}"
                                         for m in MODES))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sim-lengths", default="1024,4096,16384")
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cluster, near_node, far_node = start_cluster()
    settings = KVLinkSettings(NAMESPACE, load_timeout_s=60.0)
    stores = {n: KVStoreClient.create(n, NAMESPACE, StoreSettings(1536 << 20)) for n in (near_node, far_node)}
    probes = (probe_on(near_node, settings), probe_on(far_node, settings))
    results: dict[str, dict[str, dict]] = {}
    try:
        if not args.no_vllm:
            from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

            model_dir = str(build_local_model(DEFAULT_MODEL_DIR, progress=None))
            ray.get([probes[0].add_vllm.remote("a", model_dir, True), probes[0].add_vllm.remote("c", model_dir, False),
                     probes[1].add_vllm.remote("b", model_dir, False)])
            wait = saved_waiter(stores[near_node], "tiny-llama", 32)
            rows = [run_row(probes, ("a", "c", "b"), "tiny-llama", VLLM_PROMPT, t, 4096, wait)
                    for t in range(args.trials)]
            results[f"vLLM CPU, {VLLM_PROMPT} tokens"] = summarize(rows)
        for length in (int(x) for x in args.sim_lengths.split(",")):
            wait = saved_waiter(stores[near_node], "sim-llama-7b", 16)
            rows = []
            for t in range(args.trials):
                ray.get([probes[0].add_sim.remote("sa", length + 64), probes[0].add_sim.remote("sc", length + 64),
                         probes[1].add_sim.remote("sb", length + 64)])
                rows.append(run_row(probes, ("sa", "sc", "sb"), "sim-llama-7b", length, t, 256, wait))
            results[f"sim H100 7B, {length} tokens"] = summarize(rows)
    finally:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
        print_table(results)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kvstore_ttft.json").write_text(json.dumps(results, indent=2))
        if results:
            plot_ttft(results, RESULTS / "kvstore_ttft.png")
            print(f"wrote {RESULTS / 'kvstore_ttft.json'} and kvstore_ttft.png")
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
