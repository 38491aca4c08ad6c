"""`policies.kv_lru.KVLru`: eviction order, capacity and pins with expiry, over literal sizes."""

from __future__ import annotations

import pytest

from policies.kv_lru import KVLru


def filled(capacity: int, *sizes: int, now: float = 0.0) -> KVLru:
    """Keys 1, 2, ... of `sizes` bytes, admitted in order (1 least recent)."""
    lru = KVLru(capacity)
    for key, size in enumerate(sizes, start=1):
        assert lru.admit(key, size, now) == ()
    return lru


@pytest.mark.parametrize("touched, need, victims", [
    ((), 10, (1,)),  # least recently admitted goes first
    ((), 25, (1, 2, 3)),  # as many as the room takes, oldest first
    ((1,), 10, (2,)),  # a touched block is young again
    ((3, 2, 1), 20, (4, 3)),  # touched last to first: the untouched go first, then the tail
    ((), 0, ()),  # nothing to make room for
])
def test_victims_are_least_recently_used_first(touched, need, victims):
    lru = filled(40, 10, 10, 10, 10)
    lru.touch(touched)
    assert lru.victims(need, now=0.0) == victims


def test_admit_evicts_what_victims_named_and_keeps_the_byte_count():
    lru = filled(30, 10, 10, 10)
    assert lru.admit(4, 15, now=0.0) == (1, 2)
    assert list(lru) == [3, 4] and lru.used_bytes == 25
    assert lru.remove(3) == 10 and lru.remove(3) == 0 and lru.used_bytes == 15


def test_a_block_larger_than_the_capacity_never_fits():
    assert filled(30).victims(31, now=0.0) is None
    assert filled(30).victims(30, now=0.0) == ()


def test_pinned_blocks_are_skipped_and_can_leave_no_room():
    lru = filled(30, 10, 10, 10)
    assert lru.pin("migration-1", [1, 2, 99], expires_at=100.0) == 2  # 99 is not held (yet)
    assert lru.victims(10, now=0.0) == (3,)
    assert lru.victims(20, now=0.0) is None  # only block 3 is evictable
    assert lru.pinned(1) and lru.pinned(99) and not lru.pinned(3)
    assert lru.pinned_keys == 2


def test_a_pin_lapses_at_its_expiry_so_a_dead_pinner_cannot_hold_memory():
    lru = filled(20, 10, 10)
    lru.pin("checkpoint", [1, 2], expires_at=5.0)
    assert lru.victims(10, now=4.9) is None
    assert lru.victims(10, now=5.0) == (1,)
    assert lru.pins == ()


def test_pins_of_two_owners_add_up_and_unpin_drops_only_ones_own():
    lru = filled(20, 10, 10)
    lru.pin("a", [1], expires_at=100.0)
    lru.pin("b", [1, 2], expires_at=100.0)
    assert lru.unpin("b") and not lru.unpin("b")
    assert lru.pinned(1) and not lru.pinned(2)
    assert lru.victims(10, now=0.0) == (2,)


def test_pinning_again_replaces_the_owners_previous_pin():
    lru = filled(20, 10, 10)
    lru.pin("a", [1], expires_at=100.0)
    lru.pin("a", [2], expires_at=100.0)
    assert not lru.pinned(1) and lru.pinned(2)


def test_a_pinned_block_can_still_be_removed_on_purpose():
    lru = filled(20, 10, 10)
    lru.pin("a", [1], expires_at=100.0)
    assert lru.remove(1) == 10 and 1 not in lru


@pytest.mark.parametrize("bad", [
    lambda: KVLru(-1),
    lambda: KVLru(10).victims(-1, now=0.0),
    lambda: KVLru(10).pin("", [1], expires_at=1.0),
])
def test_bad_input_is_refused(bad):
    with pytest.raises(ValueError):
        bad()
