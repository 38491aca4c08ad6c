"""Table tests of the inverted prefix index: leading blocks held, per replica row."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.block_hash import block_hashes
from policies.prefix_index import PrefixIndex

SYSTEM = block_hashes(list(range(16 * 6)), 16, "m")  # six chained blocks
A, B, C, D, E, F = SYSTEM


def reference_depth(cached: list[frozenset[int]], query: tuple[int, ...]) -> list[int]:
    """Leading blocks held, the slow obvious way."""
    out = []
    for held in cached:
        n = 0
        while n < len(query) and query[n] in held:
            n += 1
        out.append(n)
    return out


@pytest.mark.parametrize(
    "cached, query, expected",
    [
        # whole prefix, half of it, none
        ([{A, B, C, D}, {A, B}, set()], (A, B, C, D), [4, 2, 0]),
        # lost its first block: no leading match at all
        ([{B, C, D}], (A, B, C, D), [0]),
        # lost an inner block: the match stops at the gap
        ([{A, C, D}, {A, B, D}], (A, B, C, D), [1, 2]),
        # holds more than the request asks for
        ([{A, B, C, D, E, F}], (A, B), [2]),
        # the request's first block is held by nobody
        ([{B, C}], (E, B, C), [0]),
        # a block nobody holds cuts everyone, even a replica holding later blocks
        ([{A, B, D}, {A, B, C, D}], (A, B, C, D), [2, 4]),
        # no request blocks, or no cached blocks anywhere
        ([{A}], (), [0]),
        ([set(), set()], (A, B), [0, 0]),
    ],
)
def test_depth_table(cached, query, expected):
    index = PrefixIndex.build([frozenset(s) for s in cached])
    assert index.depth(query).tolist() == expected


def test_runs_of_blocks_with_the_same_holders_count_each_block():
    # rows 0-2 share a six-block system prompt; row 1 also holds a conversation after it
    turn = block_hashes(list(range(16 * 9)), 16, "m")  # extends SYSTEM by three blocks
    cached = [frozenset(SYSTEM), frozenset(turn), frozenset(SYSTEM[:3]), frozenset()]
    index = PrefixIndex.build(cached)
    assert index.depth(turn + (12345,)).tolist() == [6, 9, 3, 0]


def test_small_integer_hashes_share_a_bucket_and_fall_back_to_binary_search():
    # not uniform hashes: all 100 keys land in one directory bucket
    cached = [frozenset(range(100)), frozenset(range(50))]
    index = PrefixIndex.build(cached)
    assert index.width == 100
    assert index.depth(tuple(range(80))).tolist() == [80, 50]


def test_hashes_must_be_unsigned_64_bit():
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        PrefixIndex.build([frozenset({-1})])
    index = PrefixIndex.build([frozenset({A})])
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        index.depth((2**64,))


def test_arrays_are_read_only():
    index = PrefixIndex.build([frozenset({A, B})])
    with pytest.raises(ValueError):
        index.keys[0] = np.uint64(1)


hash_pool = st.sampled_from(list(SYSTEM) + [7, 8, 9, 2**64 - 1])


@settings(max_examples=200, deadline=None)
@given(
    cached=st.lists(st.frozensets(hash_pool), min_size=1, max_size=6),
    query=st.lists(hash_pool, max_size=10).map(tuple),
)
def test_depth_matches_the_obvious_walk(cached, query):
    assert PrefixIndex.build(cached).depth(query).tolist() == reference_depth(cached, query)
