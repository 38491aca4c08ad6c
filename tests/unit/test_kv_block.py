"""KV blocks: what a writer describes, what a reader accepts, and the disk tier."""

from __future__ import annotations

import numpy as np
import pytest

from actors.kvstore_block import BlockLayout, BlockRefused, checksum, describe, verify
from actors.kvstore_spill import SpillTier

LAYOUT = BlockLayout("tiny-llama", (2, 2, 32, 128), "float32")


def block(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LAYOUT.shape).astype(np.float32)


def test_layout_sizes_its_blocks():
    assert LAYOUT.nbytes == 2 * 2 * 32 * 128 * 4 == 65536
    assert LAYOUT.empty().shape == LAYOUT.shape


def test_a_described_block_verifies_and_comes_back_as_is():
    data = block()
    meta = describe(7, LAYOUT, data, with_checksum=True)
    assert meta.checksum == checksum(data) and meta.nbytes == LAYOUT.nbytes
    assert verify(meta, data, LAYOUT, verify_checksum=True) is data


def test_one_flipped_byte_is_refused_as_corrupt():
    data = block()
    meta = describe(7, LAYOUT, data, with_checksum=True)
    bad = data.copy()
    bad.reshape(-1).view(np.uint8)[1000] ^= 0x01
    with pytest.raises(BlockRefused, match="checksum"):
        verify(meta, bad, LAYOUT, verify_checksum=True)
    assert verify(meta, bad, LAYOUT, verify_checksum=False) is bad  # checksums off: not checked


@pytest.mark.parametrize("expected, why", [
    (BlockLayout("other-model", LAYOUT.shape, "float32"), "reader expects"),
    (BlockLayout("tiny-llama", (2, 2, 16, 128), "float32"), "reader expects"),
    (BlockLayout("tiny-llama", LAYOUT.shape, "float16"), "reader expects"),
])
def test_a_block_of_another_model_or_shape_is_refused(expected, why):
    data = block()
    meta = describe(7, LAYOUT, data, with_checksum=True)
    with pytest.raises(BlockRefused, match=why):
        verify(meta, data, expected, verify_checksum=True)


@pytest.mark.parametrize("data", [
    np.zeros((2, 2, 32, 64), np.float32),  # wrong shape
    np.zeros(LAYOUT.shape, np.float16),  # wrong dtype
    [1, 2, 3],  # not an array
])
def test_a_writer_cannot_describe_bytes_that_are_not_a_block_of_its_layout(data):
    with pytest.raises(BlockRefused):
        describe(7, LAYOUT, data, with_checksum=True)


def test_a_hash_must_be_unsigned_64_bit():
    with pytest.raises(BlockRefused, match="64-bit"):
        describe(-1, LAYOUT, block(), with_checksum=False)


def test_spill_tier_keeps_blocks_on_disk_within_its_capacity(tmp_path):
    spill = SpillTier(tmp_path / "s", capacity_bytes=2 * LAYOUT.nbytes)
    metas = [describe(h, LAYOUT, block(h), with_checksum=True) for h in (1, 2, 3)]
    assert spill.write(metas[0], block(1), now=0.0) == ()
    assert spill.write(metas[1], block(2), now=0.0) == ()
    assert spill.write(metas[2], block(3), now=0.0) == (1,)  # the oldest leaves
    assert spill.hashes() == {2, 3} and spill.used_bytes == 2 * LAYOUT.nbytes
    meta, data = spill.read(3)
    assert meta == metas[2] and np.array_equal(data, block(3))
    assert not (tmp_path / "s" / f"{1:016x}.kv").exists()


def test_spill_tier_refuses_what_cannot_fit_and_forgets_a_damaged_file(tmp_path):
    spill = SpillTier(tmp_path / "s", capacity_bytes=LAYOUT.nbytes)
    big = BlockLayout("tiny-llama", (4, 2, 32, 128), "float32")
    data = np.zeros(big.shape, np.float32)
    assert spill.write(describe(9, big, data, with_checksum=False), data, now=0.0) is None
    spill.write(describe(1, LAYOUT, block(1), with_checksum=True), block(1), now=0.0)
    (tmp_path / "s" / f"{1:016x}.kv").write_bytes(b"short")
    assert spill.read(1) is None and 1 not in spill


def test_a_new_spill_tier_starts_empty(tmp_path):
    SpillTier(tmp_path / "s", LAYOUT.nbytes).write(describe(1, LAYOUT, block(1), True), block(1), now=0.0)
    assert len(SpillTier(tmp_path / "s", LAYOUT.nbytes)) == 0
    assert list((tmp_path / "s").iterdir()) == []
