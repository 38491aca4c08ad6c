"""KV-store put/get throughput against a plain memory copy of the same bytes.

    python -m bench.kvstore_throughput [--sizes-kib 64,1024,4096,16384] [--batch-mib 32] [--repeats 5]

One run on a two-node `ray.cluster_utils.Cluster` on this machine (plasma memory
pre-faulted, so first-touch page faults are not measured), with a store on node 1.
A writer actor on node 1 and readers on nodes 1 and 2 move batches of blocks of each
size (`--batch-mib` per call, as a vLLM step saves all its new blocks in one call);
every figure is the median over `--repeats` batches, in GB/s of block bytes:

- memcpy: `np.copyto` into a pre-allocated array (a KV cache is pre-allocated), in
  the writer's process, the same bytes as the batch;
- put: `KVStoreClient.put_blocks` until the store has indexed the batch: checksum,
  `ray.put` (the one copy, into the node's shared memory), the store mapping it;
- get, same node: `fetch` (lookup, zero-copy map, checksum verify) plus the copy into
  a pre-allocated destination (what loading into a KV cache costs);
- get, other node: the same from node 2 (Ray's object transfer between the nodes'
  object stores, then the same).
Each with checksums on and off. Target: put and same-node get >= 50% of memcpy for
blocks >= 1 MiB. The machine is shared and busy: the ratios are taken side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.kvstore import StoreSettings
from actors.kvstore_block import BlockLayout
from actors.kvstore_client import KVStoreClient
from bench.kvstore_plots import plot_throughput

NAMESPACE = "kvstore-throughput"
RESULTS = Path(__file__).parent / "results"


class Mover:
    """Writes or reads batches of blocks of one store and times them (a bench-only actor)."""

    def __init__(self, store_node: str):
        self.store = KVStoreClient.lookup(store_node, NAMESPACE)
        self.next_hash = (os.getpid() << 32) + 1

    def memcpy(self, block_bytes: int, count: int, repeats: int) -> float:
        src = [np.random.default_rng(i).integers(0, 255, block_bytes, dtype=np.uint8) for i in range(count)]
        dst = [np.ones(block_bytes, np.uint8) for _ in range(count)]
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            for s, d in zip(src, dst):
                np.copyto(d, s)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    def put(self, block_bytes: int, count: int, checksum: bool) -> tuple[list[int], float]:
        layout = BlockLayout("bench", (block_bytes,), "uint8")
        blocks = [(self._hash(), np.random.default_rng(i).integers(0, 255, block_bytes, dtype=np.uint8))
                  for i in range(count)]
        began = time.perf_counter()
        result = self.store.put_blocks(layout, blocks, with_checksum=checksum, wait_s=120)
        seconds = time.perf_counter() - began
        assert len(result.stored) == count, result.refused
        return [h for h, _ in blocks], seconds

    def get(self, block_bytes: int, hashes: list[int], checksum: bool) -> float:
        layout = BlockLayout("bench", (block_bytes,), "uint8")
        dst = [np.ones(block_bytes, np.uint8) for _ in hashes]
        began = time.perf_counter()
        fetched = self.store.fetch(layout, hashes, verify_checksum=checksum, timeout_s=120)
        for block, d in zip(fetched.blocks, dst):
            np.copyto(d, block)
        seconds = time.perf_counter() - began
        assert len(fetched.blocks) == len(hashes), fetched.refused
        return seconds

    def _hash(self) -> int:
        self.next_hash += 1
        return self.next_hash


def mover_on(node_id: str, store_node: str):
    return ray.remote(Mover).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(store_node)


def measure(writer, near, far, block_bytes: int, count: int, repeats: int, checksum: bool) -> dict[str, float]:
    batch = block_bytes * count
    puts, near_gets, far_gets = [], [], []
    for _ in range(repeats):
        hashes, seconds = ray.get(writer.put.remote(block_bytes, count, checksum))
        puts.append(seconds)
        near_gets.append(ray.get(near.get.remote(block_bytes, hashes, checksum)))
        far_gets.append(ray.get(far.get.remote(block_bytes, hashes, checksum)))
    memcpy = ray.get(writer.memcpy.remote(block_bytes, count, repeats))
    gbps = lambda s: batch / s / 1e9  # noqa: E731
    return {"memcpy": gbps(memcpy), "put": gbps(statistics.median(puts)),
            "get same node": gbps(statistics.median(near_gets)), "get other node": gbps(statistics.median(far_gets))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kib", default="64,1024,4096,16384")
    parser.add_argument("--batch-mib", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    system = {"preallocate_plasma_memory": True}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 3 << 30,
                                                           "_system_config": system})
    other = cluster.add_node(num_cpus=2, object_store_memory=2 << 30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="ERROR")
    head = cluster.head_node.node_id
    store = KVStoreClient.create(head, NAMESPACE, StoreSettings(2 << 30))
    results: dict[str, dict] = {}
    try:
        import asyncio

        asyncio.run(store.report(timeout_s=60))
        writer, near, far = mover_on(head, head), mover_on(head, head), mover_on(other.node_id, head)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine); GB/s, "
              f"ratio to memcpy in brackets")
        for checksum in (True, False):
            for kib in (int(x) for x in args.sizes_kib.split(",")):
                block = kib << 10
                count = max(1, (args.batch_mib << 20) // block)
                row = measure(writer, near, far, block, count, args.repeats, checksum)
                key = f"{kib:>6} KiB x {count:<4} checksum {'on ' if checksum else 'off'}"
                results[key] = row
                print(key + "  " + "  ".join(f"{k} {v:6.2f} ({v / row['memcpy']:4.0%})" for k, v in row.items()))
    finally:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kvstore_throughput.json").write_text(json.dumps(results, indent=2))
        if results:
            plot_throughput(results, RESULTS / "kvstore_throughput.png")
            print(f"wrote {RESULTS / 'kvstore_throughput.json'} and kvstore_throughput.png")
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
