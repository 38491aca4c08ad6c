"""Real vLLM (CPU build) replicas on two nodes sharing KV through the stores.

Replica A runs on the first H100 node, replica B on the L4 node, each beside its own
store (namespace `kvstore-vllm-test`, started here, not by a controller). A computes
a long prefix; B loads it through vLLM's KV-connector interface instead of computing
it, and its greedy output is A's cold output token for token. Store A keeps 16 blocks
in memory and the rest on disk, so loads also go through its disk tier, where the
corruption test flips bytes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.kv_link import ENV_VAR, KVLinkSettings
from actors.kvstore import StoreSettings
from actors.kvstore_client import KVStoreClient
from actors.replica_client import ReplicaClient, ReplicaPlacement
from actors.replica_spec import replica_actor_name
from orchestrator.config import parse_config
from orchestrator.replica_manager import spec_for
from policies.block_hash import block_hashes
from tests.integration.conftest import run_async, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

NAMESPACE = "kvstore-vllm-test"
BLOCK = 32
PROMPT_TOKENS = 700  # 21 full blocks; the last 28 tokens are always computed
BLOCK_BYTES = 2 * 2 * 2 * 32 * 64 * 4  # layers x (K, V) x KV heads x block x head dim x float32 = 64 KiB


def prompt(seed: int) -> tuple[int, ...]:
    """A prompt no other test shares (so no replica's own cache holds it)."""
    return tuple((seed * 7919 + i * 31) % 4000 + 5 for i in range(PROMPT_TOKENS))


def request(rid: str, tokens: tuple[int, ...], max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(rid, "tiny-llama", tokens,
                             SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="module")
def cluster_nodes(ray_cluster):
    h100 = next(n.node_id for n in ray_cluster.nodes.values() if n.kind == "H100")
    l4 = next(n.node_id for n in ray_cluster.nodes.values() if n.kind == "L4")
    return h100, l4


@pytest.fixture(scope="module")
def spill_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv-spill")


@pytest.fixture(scope="module")
def stores(cluster_nodes, spill_dir):
    a, b = cluster_nodes
    made = {a: KVStoreClient.create(a, NAMESPACE, StoreSettings(16 * BLOCK_BYTES, str(spill_dir), 64 << 20)),
            b: KVStoreClient.create(b, NAMESPACE, StoreSettings(64 << 20))}
    yield made
    for client in made.values():
        client.kill()


@pytest.fixture(scope="module")
def replicas(cluster_nodes, stores, local_model_dir):
    config = parse_config({
        "namespace": NAMESPACE,
        "models": [{"name": "tiny-llama", "path": str(local_model_dir), "max_model_len": 1024, "block_size": BLOCK}],
        "pools": [{"name": "cpu", "gpu_type": "CPU", "model": "tiny-llama", "engine": "vllm", "gpus_per_replica": 0}],
    })
    env = (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
           (ENV_VAR, KVLinkSettings(NAMESPACE, load_timeout_s=30.0).to_env()))
    made = []
    for name, node in zip("ab", cluster_nodes):
        # no CPU reservation: the session fleet may hold every logical CPU of these nodes
        placement = ReplicaPlacement(num_cpus=0, env=env, label_selector=(("ray.io/node-id", node),))
        made.append(ReplicaClient.create(spec_for(config, config.pools[0], f"kv-{name}"), NAMESPACE, placement))
    infos = run_async(_start(made))
    assert [i.node_id for i in infos] == list(cluster_nodes)
    yield made
    for client in made:
        client.kill()


async def _start(clients):
    import asyncio

    return await asyncio.gather(*(c.start(timeout_s=1200) for c in clients))


def generate(replica: ReplicaClient, req: GenerationRequest) -> list[int]:
    async def run():
        return [t async for d in replica.generate(req) for t in d.token_ids]
    return run_async(run())


def counters(replica: ReplicaClient) -> tuple[int, int, int]:
    """(computed, cached, loaded) prompt tokens so far, once vLLM's stats have caught up."""
    s = run_async(replica.stats(timeout_s=30))
    return s.computed_prompt_tokens, s.cached_prompt_tokens, s.loaded_prompt_tokens


def settled_counters(replica: ReplicaClient, total: int) -> tuple[int, int, int]:
    """Counters once they account for `total` prompt tokens (vLLM reports a step late)."""
    return wait_for(lambda: c if sum(c := counters(replica)) >= total else None, timeout_s=60,
                    what=f"{total} prompt tokens in the counters")


def held(store: KVStoreClient, tokens: tuple[int, ...]) -> int:
    return run_async(store.contains("tiny-llama", block_hashes(tokens, BLOCK, "tiny-llama"), timeout_s=30))


def test_a_prefix_computed_on_node_a_is_loaded_not_recomputed_on_node_b(replicas, stores, cluster_nodes):
    a, b = replicas
    store_a, store_b = (stores[n] for n in cluster_nodes)
    tokens = prompt(1)
    before_a, before_b = sum(counters(a)), sum(counters(b))
    cold = generate(a, request("p1-a", tokens))
    computed_a, _, loaded_a = settled_counters(a, before_a + PROMPT_TOKENS)
    wait_for(lambda: held(store_a, tokens) == 21, timeout_s=60, what="A's blocks in its node's store")
    b0 = counters(b)
    warm = generate(b, request("p1-b", tokens))
    b1 = settled_counters(b, before_b + PROMPT_TOKENS)
    assert warm == cold
    assert (b1[0] - b0[0], b1[2] - b0[2]) == (28, 21 * BLOCK)  # computed only the tail; loaded the rest
    assert loaded_a == 0 and computed_a >= PROMPT_TOKENS
    wait_for(lambda: held(store_b, tokens) == 21, timeout_s=60, what="B's copy in its own node's store")
    report = run_async(store_a.report(timeout_s=30))
    assert report.hits >= 21 and report.loaded_bytes >= 21 * BLOCK_BYTES and report.spill_blocks > 0


def test_corrupt_blocks_are_recomputed_and_the_output_is_identical(replicas, stores, cluster_nodes, spill_dir):
    a, b = replicas
    store_a = stores[cluster_nodes[0]]
    tokens = prompt(2)
    cold = generate(a, request("p2-a", tokens))
    wait_for(lambda: held(store_a, tokens) == 21, timeout_s=60, what="A's blocks in its node's store")
    on_disk = list((spill_dir / store_a.store_id).glob("*.kv"))
    assert on_disk, "the first blocks of the prefix were evicted to disk"
    for path in on_disk:  # bit rot on the disk tier
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))
    b0 = counters(b)
    warm = generate(b, request("p2-b", tokens))
    b1 = settled_counters(b, sum(b0) + PROMPT_TOKENS)
    assert warm == cold
    loaded = b1[2] - b0[2]
    assert loaded < 21 * BLOCK and b1[0] - b0[0] == PROMPT_TOKENS - loaded
    assert run_async(store_a.report(timeout_s=30)).corrupt >= 1


def test_export_saves_a_running_requests_blocks_output_included(replicas, stores, cluster_nodes):
    a, _ = replicas
    tokens = prompt(3)[:300]  # 9 full blocks of prompt; 200 output tokens fill 6 more
    handle = ray.get_actor(replica_actor_name("kv-a"), namespace=NAMESPACE)
    outputs: list[int] = []
    done = threading.Event()

    def consume():
        outputs.extend(generate(a, request("p3-a", tokens, max_tokens=400)))
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    wait_for(lambda: any(r.output_tokens >= 200 for r in run_async(a.stats(timeout_s=30)).requests),
             timeout_s=300, what="200 output tokens")
    saved = ray.get(handle.export_kv.remote("p3-a"), timeout=60)
    assert len(saved) >= 15 and held(stores[cluster_nodes[0]], tokens) == 9
    assert run_async(stores[cluster_nodes[0]].contains("tiny-llama", list(saved), timeout_s=30)) == len(saved)
    assert done.wait(300)


def test_killing_the_store_mid_load_costs_only_recompute(replicas, stores, cluster_nodes):
    a, b = replicas
    store_a = stores[cluster_nodes[0]]
    results = []
    for i, delay_s in enumerate((0.0, 0.05, 0.2)):  # the kill lands before, during or after the load
        tokens = prompt(10 + i)
        store_a = stores[cluster_nodes[0]] = _fresh_store(stores, cluster_nodes[0], store_a)
        cold = generate(a, request(f"p{10 + i}-a", tokens))
        wait_for(lambda s=store_a, t=tokens: held(s, t) == 21, timeout_s=60, what="A's blocks in its node's store")
        b0 = counters(b)
        killer = threading.Timer(delay_s, store_a.kill)
        killer.start()
        began = time.monotonic()
        warm = generate(b, request(f"p{10 + i}-b", tokens))
        killer.join()
        b1 = settled_counters(b, sum(b0) + PROMPT_TOKENS)
        results.append((warm == cold, b1[0] - b0[0] + b1[2] - b0[2], time.monotonic() - began))
    assert [r[:2] for r in results] == [(True, PROMPT_TOKENS)] * 3  # correct whatever was loaded
    assert all(r[2] < 120 for r in results)  # and within the load timeout, not hung


def _fresh_store(stores, node_id: str, old: KVStoreClient) -> KVStoreClient:
    """The store of `node_id`, started again if a previous round killed it."""
    try:
        run_async(old.report(timeout_s=5))
        return old
    except Exception:  # noqa: BLE001 — dead: start its successor (as the controller would)
        wait_for(lambda: KVStoreClient.lookup(node_id, NAMESPACE) is None, timeout_s=30, what="the old store gone")
        new = KVStoreClient.create(node_id, NAMESPACE, StoreSettings(64 << 20))
        run_async(new.report(timeout_s=60))
        return new
