"""KV-cache block accounting with prefix caching, in the manner of vLLM's block pool.

The cache is `num_blocks` blocks of `block_size` token slots. Each sequence holds a
table of blocks covering its context. A block whose slots are all computed is
registered under its chained hash (`policies.block_hash`) so that another sequence
with the same prefix reuses it instead of computing it again; reused blocks are
reference-counted. A freed block that carries a hash stays in the cache, reusable,
on an LRU list until a fresh allocation needs the space and evicts it. A block held
by any sequence is never evicted.

A host whose requests never share a block hash (a simulator's unique synthetic prompts)
may allocate a sequence `deferred`: its blocks are then registered only when it is about
to leave and may come back (`publish`, before a preemption or an abort). Nobody else
could have hit them meanwhile, so hits, evictions and counts are those of registering
them as they fill; what a deferred sequence never publishes takes its place on the LRU
unnamed. `cached_block_hashes` leaves out blocks not yet published.

Every change comes as a check/commit pair: `can_allocate` / `allocate`,
`can_append` / `append_slot`. Committing without room is a caller bug and asserts.

A block is its id, an int. A simulated fleet holds thousands of engines of thousands of
blocks each, and a million requests take, register and release every block of their
contexts: a Python object per block cost seconds to build and gigabytes to keep, and
per-block bookkeeping was the simulator's hottest path. So a block's state is where it
sits: on the empty stack, never used (ids from `_unused` up), on the LRU of evictable
cached blocks, or else held. Only what is rare is stored per block: the hash of a
registered one, and the holders beyond the first of one that sequences share.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """What `allocate` gave a sequence."""

    num_blocks: int  # blocks in its table now
    num_cached_tokens: int  # leading context tokens whose KV was reused from the cache


class _Table:
    """One sequence's blocks and how many of its slots are reserved and registered."""

    __slots__ = ("blocks", "deferred", "num_registered", "num_slots", "skipped")

    def __init__(self, blocks: list[int], num_slots: int, num_registered: int, deferred: bool):
        self.blocks = blocks  # block ids, in context order
        self.num_slots = num_slots  # token slots reserved (<= len(blocks) * block_size)
        self.num_registered = num_registered  # leading blocks past which none is registered
        # Some of those leading blocks is not registered (another block served its hash
        # first); else exactly the leading `num_registered` are, and none after them.
        self.skipped = False
        self.deferred = deferred  # the leading `num_registered` are due, not yet registered


_STALE_SLACK = 1024  # stale LRU entries tolerated beyond twice the live ones


class _Lru:
    """Free blocks worth keeping, least recently freed first: the evictable end of the cache.

    Blocks come in runs (all that one sequence frees at once), kept as they came: a run
    costs one entry, not one per block. Only a registered ("named") block can be asked
    about or revived from the middle (`__contains__`, `revive`); a revived block's entry
    stays where it was, counted in `_stale`, and is skipped when it reaches the front.
    A block has at most one live entry and it is its latest, so when an entry of a block
    with stale entries comes up at the front, it is a stale one.
    """

    __slots__ = ("_head", "_live", "_named", "_num_stale", "_runs", "_stale")

    def __init__(self) -> None:
        self._runs: deque[list[int]] = deque()
        self._head = 0  # entries of the front run already taken
        self._live = 0  # entries not stale
        self._named: set[int] = set()  # registered blocks among the live entries
        self._stale: dict[int, int] = {}  # block -> its entries no longer live
        self._num_stale = 0

    def __len__(self) -> int:
        return self._live

    def __contains__(self, block: int) -> bool:
        """Whether registered block `block` is here (for blocks without a hash: False)."""
        return block in self._named

    def push(self, blocks: list[int], named: bool) -> None:
        """Add `blocks` (owned by the LRU from now on), the first of them oldest;
        `named`: every one of them is registered under a hash."""
        if blocks:
            self._runs.append(blocks)
            self._live += len(blocks)
            if named:
                self._named.update(blocks)

    def revive(self, block: int) -> None:
        """Take registered block `block` out, wherever it is."""
        self._named.remove(block)
        self._live -= 1
        self._stale[block] = self._stale.get(block, 0) + 1
        self._num_stale += 1
        if self._num_stale > 2 * self._live + _STALE_SLACK:  # stale entries must not pile up
            self._compact()

    def pop(self, n: int) -> list[int]:
        """The `n` (<= len) least recently freed blocks, oldest first, taken out."""
        out: list[int] = []
        runs, stale = self._runs, self._stale
        while len(out) < n:
            run, i = runs[0], self._head
            if not stale:
                j = min(len(run), i + n - len(out))
                out += run[i:j]
                i = j
            else:
                while i < len(run) and len(out) < n:
                    block = run[i]
                    i += 1
                    if not self._drop_stale(block):
                        out.append(block)
            if i == len(run):
                runs.popleft()
                i = 0
            self._head = i
        self._live -= n
        if self._named:
            self._named.difference_update(out)
        return out

    def _drop_stale(self, block: int) -> bool:
        """If `block` has stale entries, forget the front-most (the one met) and say so."""
        count = self._stale.get(block)
        if not count:
            return False
        if count == 1:
            del self._stale[block]
        else:
            self._stale[block] = count - 1
        self._num_stale -= 1
        return True

    def _compact(self) -> None:
        """Drop every stale entry, keeping the live ones in order (in one run)."""
        runs = iter(self._runs)
        front = next(runs, [])[self._head:]
        kept = [block for block in itertools.chain(front, *runs) if not self._drop_stale(block)]
        assert not self._stale and self._num_stale == 0 and len(kept) == self._live
        self._runs = deque([kept]) if kept else deque()
        self._head = 0


class BlockManager:
    """Block tables of the sequences on one engine, plus its prefix cache.

    Sequences are named by an opaque string id. Sizes are in blocks or tokens.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._shared: dict[int, int] = {}  # block -> holders beyond the first, for blocks held twice or more
        self._hash_of: dict[int, int] = {}  # block -> its hash, for registered blocks
        # Free blocks that hold nothing worth keeping, taken before evicting cached ones:
        # the last freed first, then blocks never used (ids from `_unused` up).
        self._empty: list[int] = []
        self._unused = 0
        # Free blocks still registered under a hash (or due to be), least recently freed first.
        self._evictable = _Lru()
        self._cached: dict[int, int] = {}  # block hash -> block (held or evictable)
        self._tables: dict[str, _Table] = {}
        self.computed_prompt_tokens = 0  # cumulative, counted when a sequence is allocated
        self.cached_prompt_tokens = 0  # cumulative, counted when a sequence is allocated

    # ---- views ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still serve prefix hits until evicted)."""
        return len(self._empty) + self.num_blocks - self._unused + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    def cached_block_hashes(self) -> frozenset[int]:
        """Hashes of every block the cache can serve now; at most `num_blocks` of them."""
        return frozenset(self._cached)

    def holds(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def num_slots(self, seq_id: str) -> int:
        """Token slots reserved for `seq_id`."""
        return self._tables[seq_id].num_slots

    def cached_prefix_blocks(self, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Leading blocks of a context of `num_tokens` tokens the cache would serve.

        At least one token is always left to compute: a model must run on the last
        token to produce the next one, so a fully cached context reuses one block less.
        """
        limit = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        hits = 0
        while hits < limit and block_hashes[hits] in self._cached:
            hits += 1
        return hits

    # ---- allocate ------------------------------------------------------------------

    def can_allocate(self, block_hashes: Sequence[int], num_tokens: int) -> bool:
        """Whether `allocate` would find room for a context of `num_tokens` tokens."""
        return self._allocation_cost(block_hashes, num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: str, block_hashes: Sequence[int], num_tokens: int,
                 deferred: bool = False) -> Allocation:
        """Give `seq_id` slots for `num_tokens` context tokens, reusing cached prefix blocks.

        `block_hashes` are the chained hashes of the context's full blocks. Counts the
        context as prompt tokens: reused ones as cached, the rest as to be computed.
        `deferred` (see the module note) promises that no other sequence shares any of
        these hashes and that none of them is cached now.
        """
        assert seq_id not in self._tables, f"{seq_id} already holds blocks"
        assert num_tokens > 0, "a sequence needs at least one token"
        assert self.can_allocate(block_hashes, num_tokens), "allocate without room"
        hits = self.cached_prefix_blocks(block_hashes, num_tokens)
        blocks = [self._take_cached(block_hashes[i]) for i in range(hits)]
        blocks += self._take_empty(self._blocks_for(num_tokens) - hits)
        assert not (deferred and hits), "deferred allocation of cached blocks"
        self._tables[seq_id] = _Table(blocks, num_tokens, hits, deferred)
        cached_tokens = hits * self.block_size
        self.cached_prompt_tokens += cached_tokens
        self.computed_prompt_tokens += num_tokens - cached_tokens
        return Allocation(num_blocks=len(blocks), num_cached_tokens=cached_tokens)

    def _allocation_cost(self, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Free blocks an allocation consumes: fresh ones plus cached hits now on the LRU."""
        hits = self.cached_prefix_blocks(block_hashes, num_tokens)
        evictable, cached = self._evictable, self._cached
        revived = sum(1 for i in range(hits) if cached[block_hashes[i]] in evictable)
        return self._blocks_for(num_tokens) - hits + revived

    # ---- append --------------------------------------------------------------------

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        """Whether `append_slot` would find room for `num_new_tokens` more tokens."""
        return self._extra_blocks(self._tables[seq_id], num_new_tokens) <= self.num_free_blocks

    def try_reserve(self, seq_id: str, num_slots: int) -> bool:
        """Make `seq_id` hold at least `num_slots` token slots: `try_append_slot` of what
        it lacks (True at once if it lacks nothing). The scheduler's per-sequence,
        per-step call."""
        table = self._tables[seq_id]
        if num_slots <= table.num_slots:
            return True
        extra = -(-num_slots // self.block_size) - len(table.blocks)
        if extra > 0:
            if extra > len(self._empty) + self.num_blocks - self._unused + len(self._evictable):
                return False
            table.blocks += self._take_empty(extra)
        table.num_slots = num_slots
        return True

    def append_slot(self, seq_id: str, num_new_tokens: int = 1) -> None:
        """Reserve slots for `num_new_tokens` more tokens of `seq_id`."""
        table = self._tables[seq_id]
        extra = -(-(table.num_slots + num_new_tokens) // self.block_size) - len(table.blocks)
        if extra > 0:  # most appends fit in the last block: keep that path short
            assert extra <= self.num_free_blocks, "append_slot without room"
            table.blocks += self._take_empty(extra)
        table.num_slots += num_new_tokens

    def try_append_slot(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        """`append_slot` when `can_append`; False, changing nothing, otherwise. One
        lookup instead of two on the scheduler's per-sequence, per-step path."""
        table = self._tables[seq_id]
        extra = -(-(table.num_slots + num_new_tokens) // self.block_size) - len(table.blocks)
        if extra > 0:
            if extra > self.num_free_blocks:
                return False
            table.blocks += self._take_empty(extra)
        table.num_slots += num_new_tokens
        return True

    def append_slots(self, seq_ids: Iterable[str], num_new_tokens: int) -> None:
        """`append_slot(seq_id, num_new_tokens)` for each of `seq_ids`, in order; the
        caller has checked that the blocks they need together are free."""
        tables, block_size = self._tables, self.block_size
        needs: list[tuple[_Table, int]] = []
        total = 0
        for seq_id in seq_ids:
            table = tables[seq_id]
            table.num_slots = slots = table.num_slots + num_new_tokens
            extra = -(-slots // block_size) - len(table.blocks)
            if extra > 0:
                needs.append((table, extra))
                total += extra
        if total:
            assert total <= self.num_free_blocks, "append_slots without room"
            # one take of them all hands out the blocks that one take each, in turn, would
            taken = self._take_empty(total)
            start = 0
            for table, extra in needs:
                table.blocks += taken[start:start + extra]
                start += extra

    def _extra_blocks(self, table: _Table, num_new_tokens: int) -> int:
        return -(-(table.num_slots + num_new_tokens) // self.block_size) - len(table.blocks)

    # ---- cache and free ------------------------------------------------------------

    def cache_blocks(self, seq_id: str, block_hashes: Sequence[int],
                     num_computed_tokens: int) -> None:
        """Register the blocks of `seq_id` that `num_computed_tokens` computed tokens fill.

        `block_hashes` are the chained hashes of its context's full blocks. When another
        block already serves a hash (two sequences computed the same prefix at once),
        that one stays the cached copy and this block stays private.
        """
        table = self._tables[seq_id]
        start = table.num_registered
        full = min(num_computed_tokens // self.block_size, len(block_hashes), len(table.blocks))
        if full <= start:
            return
        if table.deferred:
            table.num_registered = full
            return
        # Blocks past `num_registered` were taken empty, so none of them has a hash yet.
        cached, hash_of = self._cached, self._hash_of
        hashes, blocks = block_hashes[start:full], table.blocks[start:full]
        if cached.keys().isdisjoint(hashes):  # the usual case: register them all at once
            size = len(cached)
            cached.update(zip(hashes, blocks))
            if len(cached) - size == full - start:
                hash_of.update(zip(blocks, hashes))
                table.num_registered = full
                return
            for block_hash in hashes:  # a hash repeats among them: undo, go one by one
                cached.pop(block_hash, None)
        for block, block_hash in zip(blocks, hashes):
            if block_hash in cached:
                table.skipped = True
            else:
                hash_of[block] = block_hash
                cached[block_hash] = block
        table.num_registered = full

    def free(self, seq_id: str) -> None:
        """Release every block of `seq_id`; cached ones stay reusable until evicted.

        The tail is released first so that, under pressure, a prefix's last blocks are
        evicted before its first ones (which more requests share).
        """
        table = self._tables.pop(seq_id)
        blocks, registered = table.blocks, table.num_registered
        if table.deferred or not (self._shared or table.skipped):
            # Each block has this one holder, and exactly the leading `registered` have
            # a hash (or, deferred, would have one): the tail goes to the empty stack,
            # the head to the LRU, both last block first.
            self._empty += reversed(blocks[registered:])
            head = blocks[:registered]
            head.reverse()
            self._evictable.push(head, named=not table.deferred)
            return
        shared, hash_of, empty, named = self._shared, self._hash_of, self._empty, []
        for block in reversed(blocks):
            others = shared.get(block)
            if others:
                if others == 1:
                    del shared[block]
                else:
                    shared[block] = others - 1
            elif block in hash_of:
                named.append(block)
            else:
                empty.append(block)
        self._evictable.push(named, named=True)

    def publish(self, seq_id: str, block_hashes: Sequence[int]) -> None:
        """Register the blocks of a `deferred` sequence that are due (as `cache_blocks`
        would have); from now on it is an ordinary one. Nothing for others."""
        table = self._tables[seq_id]
        if not table.deferred:
            return
        table.deferred = False
        n = table.num_registered
        hashes, blocks = block_hashes[:n], table.blocks[:n]
        size = len(self._cached)
        self._cached.update(zip(hashes, blocks))
        assert len(self._cached) - size == n, "a deferred sequence's hashes were already cached"
        self._hash_of.update(zip(blocks, hashes))

    def _take_cached(self, block_hash: int) -> int:
        block = self._cached[block_hash]
        if block in self._evictable:
            self._evictable.revive(block)
        else:
            self._shared[block] = self._shared.get(block, 0) + 1
        return block

    def _take_empty(self, n: int) -> list[int]:
        """`n` free blocks for fresh content, each held once: the last freed empty ones
        first, then unused ones, then the least recently freed cached ones (evicted)."""
        empty = self._empty
        if n == 1 and empty:
            return [empty.pop()]
        k = min(n, len(empty))
        taken = empty[len(empty) - k:]
        del empty[len(empty) - k:]
        taken.reverse()  # as popping them one by one would
        fresh = min(n - k, self.num_blocks - self._unused)
        if fresh:
            start = self._unused
            taken += range(start, start + fresh)
            self._unused += fresh
        if n - k - fresh:
            evicted, cached, hash_of = self._evictable.pop(n - k - fresh), self._cached, self._hash_of
            if hash_of:
                for block in evicted:
                    block_hash = hash_of.pop(block, None)
                    if block_hash is not None:  # else a deferred sequence's, never published
                        del cached[block_hash]
            taken += evicted
        return taken

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
