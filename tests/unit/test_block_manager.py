"""BlockManager: allocation, prefix hits, reference counts, LRU eviction of free cached
blocks, and that blocks in use are never evicted."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engines import block_manager
from actors.engines.block_manager import BlockManager, _Lru
from policies.block_hash import block_hashes

BS = 4  # tokens per block in these tests


def hashes(tokens) -> tuple[int, ...]:
    return block_hashes(list(tokens), BS, "m")


def computed(bm: BlockManager, seq: str, tokens) -> None:
    """Allocate `seq` for `tokens` and register every full block as computed."""
    h = hashes(tokens)
    bm.allocate(seq, h, len(tokens))
    bm.cache_blocks(seq, h, len(tokens))


@pytest.mark.parametrize(
    "num_blocks, num_tokens, fits, blocks",
    [
        (4, 1, True, 1),
        (4, 4, True, 1),
        (4, 5, True, 2),
        (4, 16, True, 4),
        (4, 17, False, None),
    ],
)
def test_allocate_takes_ceil_tokens_over_block_size(num_blocks, num_tokens, fits, blocks):
    bm = BlockManager(num_blocks, BS)
    tokens = range(100, 100 + num_tokens)
    assert bm.can_allocate(hashes(tokens), num_tokens) is fits
    if fits:
        alloc = bm.allocate("a", hashes(tokens), num_tokens)
        assert (alloc.num_blocks, alloc.num_cached_tokens) == (blocks, 0)
        assert bm.num_used_blocks == blocks
        assert bm.num_free_blocks == num_blocks - blocks


@pytest.mark.parametrize(
    "cached_tokens, query_tokens, hit_blocks",
    [
        (12, 12, 2),  # everything cached: the last block is computed again for the logits
        (12, 13, 3),  # one more token to compute: all three cached blocks serve
        (12, 20, 3),
        (8, 20, 2),  # only what was computed can serve
        (12, 3, 0),  # shorter than a block: nothing to share
    ],
)
def test_prefix_hit_leaves_at_least_one_token_to_compute(cached_tokens, query_tokens, hit_blocks):
    bm = BlockManager(16, BS)
    computed(bm, "a", range(cached_tokens))
    tokens = list(range(query_tokens))
    alloc = bm.allocate("b", hashes(tokens), len(tokens))
    assert alloc.num_cached_tokens == hit_blocks * BS
    assert bm.cached_prompt_tokens == hit_blocks * BS
    assert bm.computed_prompt_tokens == cached_tokens + query_tokens - hit_blocks * BS


def test_a_different_prefix_hits_nothing_even_with_equal_later_blocks():
    bm = BlockManager(16, BS)
    computed(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    alloc = bm.allocate("b", hashes([0, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    assert alloc.num_cached_tokens == 0  # chained hashes: block 2 differs because block 1 does


def test_shared_blocks_are_ref_counted_and_stay_cached_after_free():
    bm = BlockManager(8, BS)
    prompt = list(range(9))  # two full blocks and one partial
    computed(bm, "a", prompt)
    bm.allocate("b", hashes(prompt), len(prompt))
    assert bm.num_used_blocks == 4  # 2 shared + a's tail + b's tail
    bm.free("a")
    assert bm.num_used_blocks == 3  # the shared two are still held by b
    bm.free("b")
    assert bm.num_used_blocks == 0
    assert bm.cached_block_hashes() == frozenset(hashes(prompt))
    assert bm.allocate("c", hashes(prompt), len(prompt)).num_cached_tokens == 8


def test_reviving_free_cached_blocks_counts_against_free_space():
    bm = BlockManager(3, BS)
    computed(bm, "a", range(9))  # 3 blocks, 2 of them registered
    bm.free("a")
    # 9 tokens again: 2 cached blocks revived + 1 fresh = all 3 free blocks
    assert bm.can_allocate(hashes(range(9)), 9)
    bm.allocate("b", hashes(range(9)), 9)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(hashes(range(50, 54)), 4)


def test_lru_evicts_least_recently_freed_and_a_prefix_tail_first():
    bm = BlockManager(4, BS)
    a, b = list(range(8)), list(range(100, 108))
    computed(bm, "a", a)
    computed(bm, "b", b)
    bm.free("a")  # a's blocks become evictable first ...
    bm.free("b")  # ... then b's
    bm.allocate("c", hashes(range(200, 204)), 4)  # one fresh block: evicts a's tail
    assert bm.cached_block_hashes() == frozenset({hashes(a)[0]} | set(hashes(b)))
    bm.allocate("d", hashes(range(300, 304)), 4)  # then a's head
    assert bm.cached_block_hashes() == frozenset(hashes(b))


def test_blocks_in_use_are_never_evicted():
    bm = BlockManager(4, BS)
    held = list(range(16))
    computed(bm, "held", held)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(hashes([7, 7, 7, 7]), 4)
    with pytest.raises(AssertionError):
        bm.allocate("x", hashes([7, 7, 7, 7]), 4)
    assert bm.cached_block_hashes() == frozenset(hashes(held))


@pytest.mark.parametrize(
    "start_tokens, append, new_blocks",
    [(4, 1, 1), (5, 1, 0), (5, 3, 0), (5, 4, 1), (1, 8, 2)],
)
def test_append_slot_takes_a_block_only_when_the_last_is_full(start_tokens, append, new_blocks):
    bm = BlockManager(8, BS)
    bm.allocate("a", (), start_tokens)
    used = bm.num_used_blocks
    assert bm.can_append("a", append)
    bm.append_slot("a", append)
    assert bm.num_used_blocks == used + new_blocks
    assert bm.num_slots("a") == start_tokens + append


def test_append_fails_when_no_block_is_free():
    bm = BlockManager(2, BS)
    bm.allocate("a", (), 4)
    bm.allocate("b", (), 4)
    assert bm.can_append("a", 0)
    assert not bm.can_append("a", 1)


def test_two_copies_of_one_prefix_keep_the_first_in_the_cache():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    bm.allocate("a", hashes(prompt), 8)
    bm.allocate("b", hashes(prompt), 8)  # admitted before a's blocks were computed
    bm.cache_blocks("a", hashes(prompt), 8)
    bm.cache_blocks("b", hashes(prompt), 8)
    assert len(bm.cached_block_hashes()) == 2
    bm.free("b")  # b's private copies hold nothing worth keeping
    assert bm.num_free_blocks == 6
    bm.free("a")
    assert bm.cached_block_hashes() == frozenset(hashes(prompt))


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0), (-1, 4)])
def test_bad_sizes_are_refused(num_blocks, block_size):
    with pytest.raises(ValueError, match="must be positive"):
        BlockManager(num_blocks, block_size)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("afp"), st.integers(0, 5), st.integers(1, 14)),
                max_size=40))
def test_invariants_hold_under_any_sequence_of_operations(ops):
    """Random allocate / append / free: block counts add up and the cache stays bounded."""
    bm = BlockManager(6, BS)
    live: dict[str, list[int]] = {}
    for op, who, size in ops:
        seq = f"s{who}"
        if op == "a" and seq not in live:
            tokens = [who % 2] * size  # few distinct prefixes, so hits happen
            if bm.can_allocate(hashes(tokens), size):
                bm.allocate(seq, hashes(tokens), size)
                bm.cache_blocks(seq, hashes(tokens), size)
                live[seq] = tokens
        elif op == "p" and seq in live and bm.can_append(seq, 1):
            bm.append_slot(seq, 1)
        elif op == "f" and seq in live:
            bm.free(seq)
            del live[seq]
        assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
        assert len(bm.cached_block_hashes()) <= bm.num_blocks
    for seq in list(live):
        bm.free(seq)
    assert bm.num_used_blocks == 0


def test_the_lru_hands_out_least_recently_freed_first_and_skips_revived_blocks():
    """Runs of freed blocks leave oldest first; a revived block leaves no hole, however
    often it comes back, also after the stale entries are compacted away."""
    lru = _Lru()
    lru.push([1, 2, 3], named=True)
    lru.push([4, 5], named=False)  # a deferred sequence's: never asked about
    lru.revive(2)
    lru.push([2], named=True)  # freed again: now the youngest
    lru.revive(2)
    lru.push([6, 2], named=True)
    assert (len(lru), 2 in lru, 4 in lru) == (6, True, False)
    assert lru.pop(2) == [1, 3]
    lru._compact()
    assert lru.pop(4) == [4, 5, 6, 2] and len(lru) == 0 and 2 not in lru


def test_stale_lru_entries_are_compacted_once_they_outnumber_the_live_ones(monkeypatch):
    monkeypatch.setattr(block_manager, "_STALE_SLACK", 0)
    lru = _Lru()
    lru.push([1, 2, 3, 4], named=True)
    lru.push([5, 6], named=True)
    for block in (1, 2, 5, 3):  # four stale entries to two live ones: not yet
        lru.revive(block)
    assert len(lru._stale) == 4
    lru.revive(6)  # five to one: compacted
    assert lru._runs == deque([[4]]) and not lru._stale
    lru.push([5], named=True)
    assert lru.pop(2) == [4, 5]
