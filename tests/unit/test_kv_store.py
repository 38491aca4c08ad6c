"""`KVCacheStore`'s bookkeeping, driven in-process: writers' objects are stand-in awaitables
(the store only awaits them), the clock is fake. Ray's side (ownership, transfer, spill
promotion, re-owning orphans) is exercised on a real cluster in tests/integration."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.kvstore import KVCacheStore, StoreSettings
from actors.kvstore_block import BlockLayout, describe
from tests.fakes import FakeClock

LAYOUT = BlockLayout("m", (256,), "uint8")  # 256 bytes a block
OTHER = BlockLayout("other", (256,), "uint8")


def store(capacity_blocks: int = 4, clock: FakeClock | None = None) -> KVCacheStore:
    return KVCacheStore("kvstore-n1", "n1", StoreSettings(capacity_bytes=capacity_blocks * LAYOUT.nbytes),
                        clock=clock or FakeClock())


def ready(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def put(s: KVCacheStore, *hashes: int, layout: BlockLayout = LAYOUT, data=None):
    blocks = []
    for h in hashes:
        array = np.full(layout.shape, h % 256, np.uint8) if data is None else data
        blocks.append((describe(h, layout, np.full(layout.shape, h % 256, np.uint8), True), [ready(array)]))
    return await s.put(blocks)


async def test_put_then_lookup_serves_the_leading_run_and_counts_hits_and_misses():
    s = store()
    assert (await put(s, 1, 2, 3)).stored == (1, 2, 3)
    found = s.lookup("m", [1, 2, 9, 3])
    assert [meta.block_hash for meta, _ in found] == [1, 2]
    assert int((await found[1][1][0])[0]) == 2
    assert s.contains("m", [1, 2, 3, 4]) == 3
    report = s.report()
    assert (report.hits, report.misses, report.blocks, report.used_bytes) == (2, 2, 3, 3 * LAYOUT.nbytes)
    assert report.hashes == {1, 2, 3} and report.hit_rate == 0.5


async def test_a_full_store_evicts_least_recent_and_reads_keep_a_prefix_head_longest():
    s = store(capacity_blocks=3)
    await put(s, 1, 2, 3)
    s.lookup("m", [1, 2])  # touched last to first: 1 is now the most recent
    await put(s, 4, 5)
    assert s.contains("m", [1]) == 1 and s.contains("m", [2]) == 0 and s.contains("m", [3]) == 0
    assert s.report().evictions == 2


async def test_pinned_blocks_survive_and_a_store_full_of_pins_refuses_at_once():
    clock = FakeClock()
    s = store(capacity_blocks=2, clock=clock)
    await put(s, 1, 2)
    assert s.pin("migration-q1", [1, 2], ttl_s=30.0) == 2
    result = await put(s, 3)
    assert result.stored == () and "full" in result.refused[0][1]
    assert s.contains("m", [1, 2]) == 2 and s.report().pinned_blocks == 2
    clock.now += 30.0  # the pinner died: its pin lapses
    assert (await put(s, 3)).stored == (3,)
    assert s.report().pinned_blocks == 0


async def test_unpin_releases_at_once_and_the_ttl_is_bounded():
    s = store(capacity_blocks=1)
    await put(s, 1)
    s.pin("q", [1], ttl_s=5.0)
    assert s.unpin("q") and (await put(s, 2)).stored == (2,)
    with pytest.raises(ValueError, match="ttl_s"):
        s.pin("q", [2], ttl_s=10_000.0)


async def test_wrong_model_is_a_miss_and_a_hash_held_with_another_layout_is_refused():
    s = store()
    await put(s, 1, 2)
    assert s.lookup("other", [1]) == [] and s.contains("other", [1]) == 0
    result = await put(s, 1, layout=OTHER)
    assert result.refused and "another layout" in result.refused[0][1]


async def test_bytes_that_do_not_match_their_meta_are_refused():
    s = store()
    result = await put(s, 1, data=np.zeros(100, np.uint8))
    assert result.stored == () and "shape" in result.refused[0][1]
    assert s.report().refused == 1


async def test_an_unreadable_object_is_refused_not_waited_on():
    s = store()
    future = asyncio.get_running_loop().create_future()
    future.set_exception(RuntimeError("owner died"))
    result = await s.put([(describe(1, LAYOUT, np.zeros(256, np.uint8), True), [future])])
    assert result.refused == ((1, "object unreadable: RuntimeError"),)


async def test_reports_carry_the_changes_since_the_callers_version():
    s = store(capacity_blocks=2)
    await put(s, 1, 2)
    first = s.report()
    await put(s, 3)  # evicts 1
    s.drop([2])
    delta = s.report(first.version)
    assert delta.hashes is None and set(delta.added) == {3} and set(delta.removed) == {1, 2}
    assert s.report(delta.version).added == () and s.report(-1).hashes == {3}
    assert s.report().corrupt == 1


async def test_latency_samples_are_handed_out_once():
    s = store()
    await put(s, 1)
    s.note_load(256, 0.004)
    report = s.report()
    assert len(report.save_latencies_s) == 1 and report.load_latencies_s == (0.004,)
    assert report.loaded_bytes == 256 and report.saved_bytes == 256
    assert s.report().load_latencies_s == ()
