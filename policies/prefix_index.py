"""Inverted prefix index of one fleet view: block hash -> the replica rows holding it.

Built once per view from every replica's `cached_block_hashes`, queried once per
routing decision with the request's block hashes (see `policies.block_hash`). The
answer is, per replica, how many leading blocks of the request it holds: the
prefix-cache hit routing expects there.

Layout (CSR): `keys` are the sorted distinct hashes; the holders of `keys[k]` are
`holders[start[k]:start[k + 1]]`. Hashes are uniform 64-bit values, so a bucket
directory on their top bits finds a key in one or two cache lines, where a binary
search over a million keys would miss cache a dozen times per block.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_KEYS_PER_BUCKET = 2  # directory size: about half a bucket per key
_MAX_WIDTH = 32  # fuller buckets (hashes that are not uniform) fall back to binary search


@dataclass(frozen=True, eq=False)
class PrefixIndex:
    """Which replica rows hold which block hashes. Arrays are read-only.

    `fingerprint[k]` is the XOR of the holders' row tags: blocks with the same holder
    set have the same fingerprint, so a run of request blocks held by the same
    replicas (a shared system prompt) is gathered once, not once per block. Two
    different sets of the same size collide with probability about 2**-64; the cost
    of that would be one misestimated prefix hit, not a wrong answer to a client.
    """

    rows: int
    keys: np.ndarray  # uint64, sorted, distinct
    start: np.ndarray  # int64, len(keys) + 1
    holders: np.ndarray  # int64 rows
    fingerprint: np.ndarray  # uint64 per key
    directory: np.ndarray  # int64: keys in bucket b are keys[directory[b]:directory[b + 1]]
    shift: int  # bucket of a hash = hash >> shift
    width: int  # most keys in one bucket

    @classmethod
    def build(cls, cached: Sequence[frozenset[int]]) -> PrefixIndex:
        """Index of `cached[row]`, the block hashes each row holds."""
        sizes = np.fromiter(map(len, cached), np.int64, len(cached))
        flat = as_hashes(itertools.chain.from_iterable(cached), int(sizes.sum()))
        owner = np.repeat(np.arange(len(cached), dtype=np.int64), sizes)
        order = np.argsort(flat)
        flat, owner = flat[order], owner[order]
        first = np.ones(flat.size, dtype=bool)
        first[1:] = flat[1:] != flat[:-1]
        start = np.append(np.flatnonzero(first), flat.size)
        keys = flat[first]
        fingerprint = (
            np.bitwise_xor.reduceat(_row_tags(owner), start[:-1]) if keys.size else keys.copy()
        )
        bits = max(1, int(np.ceil(np.log2(max(keys.size / _KEYS_PER_BUCKET, 2)))))
        shift = 64 - bits
        per_bucket = np.bincount((keys >> np.uint64(shift)).astype(np.intp), minlength=1 << bits)
        directory = np.concatenate(([0], np.cumsum(per_bucket)))
        return cls(
            rows=len(cached),
            keys=_frozen(keys),
            start=_frozen(start),
            holders=_frozen(owner),
            fingerprint=_frozen(fingerprint),
            directory=_frozen(directory),
            shift=shift,
            width=int(per_bucket.max()),
        )

    def depth(self, block_hashes: Sequence[int]) -> np.ndarray:
        """Per row, how many leading `block_hashes` the replica holds (int64).

        Blocks are matched up to the first one nobody holds, consecutive blocks with
        the same holders collapse into runs, and each holder of a run is credited its
        length and the sum of its positions. A replica credited c blocks leads with
        all of them exactly when those positions sum to c(c-1)/2 (distinct positions
        with that sum can only be 0..c-1); the rare replica that lost an inner block
        is resolved run by run. Cost grows with the holders of the distinct runs, not
        with the fleet or the prompt.
        """
        depth = np.zeros(self.rows, dtype=np.int64)
        if len(block_hashes) == 0 or self.keys.size == 0:
            return depth
        slot, found = self._lookup(as_hashes(block_hashes, len(block_hashes)))
        k = found.size if found.all() else int(np.argmin(found))
        if k == 0:
            return depth
        slot = slot[:k]
        n_holders = self.start[slot + 1] - self.start[slot]
        fp = self.fingerprint[slot]
        new_run = np.ones(k, dtype=bool)
        new_run[1:] = (fp[1:] != fp[:-1]) | (n_holders[1:] != n_holders[:-1])
        first = np.flatnonzero(new_run)
        length = np.diff(np.append(first, k))
        counts = n_holders[first]
        lo = self.start[slot[first]]
        gather = np.arange(int(counts.sum())) + np.repeat(lo - np.cumsum(counts) + counts, counts)
        rows = self.holders[gather]
        run = np.repeat(np.arange(first.size), counts)
        held = np.bincount(rows, weights=length[run], minlength=self.rows)
        run_position_sum = (2 * first + length - 1) * length / 2
        position_sum = np.bincount(rows, weights=run_position_sum[run], minlength=self.rows)
        leading = position_sum == held * (held - 1) / 2
        depth[leading] = held[leading]
        gaps = np.flatnonzero(~leading)
        if gaps.size:
            depth[gaps] = _leading_runs(rows, run, length, gaps)
        return depth

    def _lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot in `keys`, found) for each query hash."""
        if self.width > _MAX_WIDTH:
            slot = np.minimum(np.searchsorted(self.keys, query), self.keys.size - 1)
            return slot, self.keys[slot] == query
        bucket = (query >> np.uint64(self.shift)).astype(np.intp)
        lo, hi = self.directory[bucket], self.directory[bucket + 1]
        window = lo[:, None] + np.arange(self.width)
        inside = window < hi[:, None]
        match = inside & (self.keys[np.where(inside, window, 0)] == query[:, None])
        return lo + match.argmax(axis=1), match.any(axis=1)


def as_hashes(values: Iterable[int], count: int = -1) -> np.ndarray:
    """Block hashes as a uint64 array; raises ValueError for anything else."""
    try:
        return np.fromiter(values, dtype=np.uint64, count=count)
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(
            f"block hashes must be unsigned 64-bit ints (policies.block_hash): {e}"
        ) from e


def _leading_runs(
    rows: np.ndarray, run: np.ndarray, length: np.ndarray, only: np.ndarray
) -> np.ndarray:
    """Blocks in the leading runs held, for the rows in `only`, from (row, run) pairs."""
    column = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
    column[only] = np.arange(only.size)
    mine = column[rows] >= 0
    held = np.zeros((length.size, only.size), dtype=bool)
    held[run[mine], column[rows[mine]]] = True
    return (np.logical_and.accumulate(held, axis=0) * length[:, None]).sum(axis=0)


def _row_tags(rows: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit tag per row (splitmix64's finaliser), for set fingerprints."""
    z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
