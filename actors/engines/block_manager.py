"""KV-cache block accounting with prefix caching, in the manner of vLLM's block pool.

The cache is `num_blocks` blocks of `block_size` token slots. Each sequence holds a
table of blocks covering its context. A block whose slots are all computed is
registered under its chained hash (`policies.block_hash`) so that another sequence
with the same prefix reuses it instead of computing it again; reused blocks are
reference-counted. A freed block that carries a hash stays in the cache, reusable,
on an LRU list until a fresh allocation needs the space and evicts it. A block held
by any sequence is never evicted.

Every change comes as a check/commit pair: `can_allocate` / `allocate`,
`can_append` / `append_slot`. Committing without room is a caller bug and asserts.

Block objects are made on first use, not up front: a simulated fleet holds thousands
of engines of thousands of blocks each, most never touched in a short run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """What `allocate` gave a sequence."""

    num_blocks: int  # blocks in its table now
    num_cached_tokens: int  # leading context tokens whose KV was reused from the cache


class _Block:
    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int, ref_count: int = 0):
        self.block_id = block_id
        self.ref_count = ref_count
        self.block_hash: int | None = None  # set once registered in the prefix cache


class _Table:
    """One sequence's blocks and how many of its slots are reserved and registered."""

    __slots__ = ("blocks", "num_registered", "num_slots")

    def __init__(self, blocks: list[_Block], num_slots: int, num_registered: int):
        self.blocks = blocks
        self.num_slots = num_slots  # token slots reserved (<= len(blocks) * block_size)
        self.num_registered = num_registered  # leading blocks registered in the cache


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
        # Free blocks that hold nothing worth keeping, taken before evicting cached ones:
        # the last freed first, then blocks never used (ids from `_unused` up).
        self._empty: list[_Block] = []
        self._unused = 0
        # Free blocks still registered under a hash, least recently freed first.
        self._evictable: OrderedDict[int, _Block] = OrderedDict()
        self._cached: dict[int, _Block] = {}  # block hash -> block (held or evictable)
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

    def allocate(self, seq_id: str, block_hashes: Sequence[int], num_tokens: int) -> Allocation:
        """Give `seq_id` slots for `num_tokens` context tokens, reusing cached prefix blocks.

        `block_hashes` are the chained hashes of the context's full blocks. Counts the
        context as prompt tokens: reused ones as cached, the rest as to be computed.
        """
        assert seq_id not in self._tables, f"{seq_id} already holds blocks"
        assert num_tokens > 0, "a sequence needs at least one token"
        assert self.can_allocate(block_hashes, num_tokens), "allocate without room"
        hits = self.cached_prefix_blocks(block_hashes, num_tokens)
        blocks = [self._take_cached(block_hashes[i]) for i in range(hits)]
        blocks += self._take_empty(self._blocks_for(num_tokens) - hits)
        self._tables[seq_id] = _Table(blocks, num_tokens, hits)
        cached_tokens = hits * self.block_size
        self.cached_prompt_tokens += cached_tokens
        self.computed_prompt_tokens += num_tokens - cached_tokens
        return Allocation(num_blocks=len(blocks), num_cached_tokens=cached_tokens)

    def _allocation_cost(self, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Free blocks an allocation consumes: fresh ones plus cached hits now on the LRU."""
        hits = self.cached_prefix_blocks(block_hashes, num_tokens)
        revived = sum(1 for i in range(hits) if self._cached[block_hashes[i]].ref_count == 0)
        return self._blocks_for(num_tokens) - hits + revived

    # ---- append --------------------------------------------------------------------

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        """Whether `append_slot` would find room for `num_new_tokens` more tokens."""
        return self._extra_blocks(self._tables[seq_id], num_new_tokens) <= self.num_free_blocks

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
        """`append_slot(seq_id, num_new_tokens)` for each of `seq_ids`; the caller has
        checked that the blocks they need together are free."""
        tables, block_size = self._tables, self.block_size
        for seq_id in seq_ids:
            table = tables[seq_id]
            extra = -(-(table.num_slots + num_new_tokens) // block_size) - len(table.blocks)
            if extra > 0:
                assert extra <= self.num_free_blocks, "append_slots without room"
                table.blocks += self._take_empty(extra)
            table.num_slots += num_new_tokens

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
        full = min(num_computed_tokens // self.block_size, len(block_hashes), len(table.blocks))
        cached, blocks = self._cached, table.blocks
        for i in range(table.num_registered, full):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is None and block_hash not in cached:
                block.block_hash = block_hash
                cached[block_hash] = block
        table.num_registered = max(table.num_registered, full)

    def free(self, seq_id: str) -> None:
        """Release every block of `seq_id`; cached ones stay reusable until evicted.

        The tail is released first so that, under pressure, a prefix's last blocks are
        evicted before its first ones (which more requests share).
        """
        table = self._tables.pop(seq_id)
        empty, evictable = self._empty, self._evictable
        for block in reversed(table.blocks):
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count > 0:
                continue
            if block.block_hash is None:
                empty.append(block)
            else:
                evictable[block.block_id] = block

    def _take_cached(self, block_hash: int) -> _Block:
        block = self._cached[block_hash]
        if block.ref_count == 0:
            del self._evictable[block.block_id]
        block.ref_count += 1
        return block

    def _take_empty(self, n: int) -> list[_Block]:
        """`n` free blocks for fresh content, each held once: the last freed empty ones
        first, then unused ones, then the least recently freed cached ones (evicted)."""
        empty = self._empty
        k = min(n, len(empty))
        taken = empty[len(empty) - k:]
        del empty[len(empty) - k:]
        taken.reverse()  # as popping them one by one would
        for block in taken:
            block.ref_count = 1
        fresh = min(n - k, self.num_blocks - self._unused)
        if fresh:
            taken += [_Block(i, 1) for i in range(self._unused, self._unused + fresh)]
            self._unused += fresh
        evict, cached = self._evictable.popitem, self._cached
        for _ in range(n - k - fresh):
            block = evict(last=False)[1]
            del cached[block.block_hash]
            block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
