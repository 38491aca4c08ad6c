"""KV-cache store actors on a real multi-node Ray cluster: where the bytes live, who owns
them, and what happens when a writer, a disk or a store fails. No fleet: the stores and
the writers here are this module's own (namespace `kvstore-test`)."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.kv_link import KVLink, KVLinkSettings
from actors.kvstore import StoreSettings
from actors.kvstore_block import BlockLayout
from actors.kvstore_client import KVStoreClient, KVStoreUnavailable
from tests.integration.conftest import run_async, wait_for

pytestmark = pytest.mark.ray

NAMESPACE = "kvstore-test"
LAYOUT = BlockLayout("m", (64, 1024), "float32")  # 256 KiB a block


def blocks(first: int, n: int) -> list[tuple[int, np.ndarray]]:
    return [(h, np.full(LAYOUT.shape, h, np.float32)) for h in range(first, first + n)]


def node_of(ray_cluster, kind: str) -> str:
    return next(n.node_id for n in ray_cluster.nodes.values() if n.kind == kind)


@ray.remote(num_cpus=0)
class Writer:
    """A replica's stand-in: writes blocks to its node's store, reads from any store."""

    def put(self, node_id: str, first: int, n: int) -> tuple[int, ...]:
        client = KVStoreClient.lookup(node_id, NAMESPACE)
        return client.put_blocks(LAYOUT, blocks(first, n), with_checksum=True).stored

    def fetch(self, node_id: str, hashes: list[int]) -> tuple[list[float], str | None, bool]:
        fetched = KVStoreClient.lookup(node_id, NAMESPACE).fetch(LAYOUT, hashes, verify_checksum=True)
        return [float(b[0, 0]) for b in fetched.blocks], fetched.refused, all(not b.flags.writeable
                                                                             for b in fetched.blocks)


def on(node_id: str):
    return Writer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


@pytest.fixture
def stores(ray_cluster, tmp_path):
    """A store on the head node (4 blocks of memory, 8 on disk) and one on the L4 node."""
    head, l4 = node_of(ray_cluster, "head"), node_of(ray_cluster, "L4")
    made = {
        head: KVStoreClient.create(head, NAMESPACE, StoreSettings(4 * LAYOUT.nbytes, str(tmp_path), 8 * LAYOUT.nbytes)),
        l4: KVStoreClient.create(l4, NAMESPACE, StoreSettings(16 * LAYOUT.nbytes)),
    }
    for client in made.values():
        run_async(client.report(timeout_s=60.0))
    yield made
    for client in made.values():
        client.kill()
    wait_for(lambda: not KVStoreClient.discover(NAMESPACE), what="the stores to be gone")


def test_a_block_saved_on_one_node_is_read_zero_copy_there_and_transferred_to_another(ray_cluster, stores):
    head, l4 = node_of(ray_cluster, "head"), node_of(ray_cluster, "L4")
    assert ray.get(on(head).put.remote(head, 1, 3)) == (1, 2, 3)
    values, refused, read_only = ray.get(on(head).fetch.remote(head, [1, 2, 3, 4]))
    assert values == [1.0, 2.0, 3.0] and refused is None
    assert read_only  # mapped from the node's shared memory, not copied
    values, _, _ = ray.get(on(l4).fetch.remote(head, [1, 2, 3]))  # Ray's transfer to another node
    assert values == [1.0, 2.0, 3.0]
    plan = run_async(KVLink(KVLinkSettings(NAMESPACE), l4).plan("m", [1, 2, 3]))
    assert (plan.source_node, plan.source_blocks, plan.local_blocks, plan.same_node) == (head, 3, 0, False)


def test_blocks_outlive_their_writer(ray_cluster, stores):
    head, l4 = node_of(ray_cluster, "head"), node_of(ray_cluster, "L4")
    writer = on(l4)
    ray.get(writer.put.remote(l4, 10, 2))
    ray.kill(writer)
    values, refused, _ = ray.get(on(head).fetch.remote(l4, [10, 11]))
    assert values == [10.0, 11.0] and refused is None


def test_eviction_spills_to_disk_pins_hold_and_disk_corruption_is_a_miss(ray_cluster, stores, tmp_path):
    head = node_of(ray_cluster, "head")
    store = stores[head]
    ray.get(on(head).put.remote(head, 100, 4))
    assert run_async(store.pin("migration-q", [100, 101], ttl_s=60.0, timeout_s=30.0)) == 2
    ray.get(on(head).put.remote(head, 104, 2))  # memory holds 4: 102 and 103 go to disk, 100/101 are pinned
    report = run_async(store.report(timeout_s=30.0))
    assert (report.blocks, report.spill_blocks, report.pinned_blocks) == (4, 2, 2)
    assert sorted(p.name for p in (tmp_path / store.store_id).iterdir()) == [f"{h:016x}.kv" for h in (102, 103)]
    spilled = tmp_path / store.store_id / f"{103:016x}.kv"
    data = bytearray(spilled.read_bytes())
    data[5] ^= 0xFF  # one flipped bit pattern on disk
    spilled.write_bytes(bytes(data))
    values, refused, _ = ray.get(on(head).fetch.remote(head, [100, 101, 102, 103, 104]))
    assert values == [100.0, 101.0, 102.0] and "checksum" in refused  # read back from disk up to the bad one
    assert run_async(store.contains("m", [103], timeout_s=30.0)) == 0  # dropped, not served again
    assert run_async(store.report(timeout_s=30.0)).corrupt == 1


def test_a_frozen_store_costs_a_bounded_wait_and_a_killed_one_only_its_cache(ray_cluster, stores):
    head, l4 = node_of(ray_cluster, "head"), node_of(ray_cluster, "L4")
    ray.get(on(l4).put.remote(l4, 200, 2))
    link = KVLink(KVLinkSettings(NAMESPACE, lookup_timeout_s=0.5), head)
    assert run_async(link.plan("m", [200, 201])).source_blocks == 2
    pid = _pid_of(stores[l4])
    os.kill(pid, signal.SIGSTOP)
    try:
        plan = run_async(asyncio.wait_for(link.plan("m", [200, 201]), 5.0))
        assert plan.source_blocks == 0  # the silent store is skipped after lookup_timeout_s
    finally:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _dead(stores[l4]), timeout_s=30, what="the killed store to be known dead")
    assert run_async(link.plan("m", [200, 201])).source_blocks == 0  # its cache is gone, nothing else


def _dead(client: KVStoreClient) -> bool:
    try:
        run_async(client.report(timeout_s=2.0))
    except KVStoreUnavailable as e:
        return e.dead
    return False


def _pid_of(client: KVStoreClient) -> int:
    """The store's process id, from the GCS actor table (the store exposes no such method). By actor
    id: the session fleet's own store on that node has the same name in another namespace."""
    from ray._private.state import actors

    actor_id = client._handle._actor_id.hex()
    return next(a["Pid"] for a in actors().values() if a["ActorID"] == actor_id and a["State"] == "ALIVE")
