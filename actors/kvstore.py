"""`KVCacheStore`: the Ray actor that keeps one node's share of the cluster's KV cache.

One store per node (started by the controller's `StoreManager`, pinned to its node,
named `kvstore:<node id>`). It is an index and an owner, not a data path: block bytes
live in Ray's object store on the node. A writer on the node `ray.put`s a block (one
copy, into the node's shared memory) and hands the store the ObjectRef; the store maps
the bytes (zero-copy) and keeps that view and the ref. A reader asks for refs and
`ray.get`s them: zero-copy from shared memory on the same node, Ray's object transfer
from another node.

Ownership. Ray 2.56 removed `ray.put(_owner=...)`, so a block's object is owned by its
writer and dies with it. The view the store holds keeps the bytes alive regardless; a
reader whose `ray.get` fails because the writer is gone asks `reown`, and the store
`ray.put`s its view (one copy, done once, only for orphans) into an object it owns.
A store that dies takes its index and its own objects with it: only cache is lost.

Capacity is bytes (`StoreSettings.capacity_bytes`), with LRU eviction that never
evicts pinned blocks (`policies.kv_lru`); evicted blocks go to the optional spill
tier on local disk (`actors.kvstore_spill`) while it has room. A full store refuses
a block at once rather than make a writer wait. Only
`actors.kvstore_client.KVStoreClient` calls it through Ray.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.kvstore_block import BlockMeta, BlockRefused, check_matches
from actors.kvstore_spill import SpillTier
from policies.kv_lru import KVLru

_JOURNAL = 65_536  # membership changes kept for incremental reports
_SAMPLES = 1_024  # latency samples kept between two reports


@dataclass(frozen=True)
class StoreSettings:
    """How big one store is. Bytes and seconds."""

    capacity_bytes: int
    spill_dir: str | None = None  # a directory on local disk; None: no spill tier
    spill_capacity_bytes: int = 0
    max_pin_ttl_s: float = 600.0  # the longest a pin may last
    ref_timeout_s: float = 10.0  # the longest a put waits for a writer's object


@dataclass(frozen=True)
class PutResult:
    stored: tuple[int, ...]  # hashes held after the put (new or already there)
    refused: tuple[tuple[int, str], ...]  # (hash, why) of blocks not taken


@dataclass(frozen=True)
class StoreReport:
    """What a store holds and has done. Counters are cumulative since it started."""

    store_id: str
    node_id: str
    started_at: float  # wall-clock seconds
    capacity_bytes: int
    used_bytes: int  # in memory (Ray's object store)
    blocks: int  # in memory
    spill_capacity_bytes: int
    spill_used_bytes: int
    spill_blocks: int
    pinned_blocks: int
    hits: int  # blocks served by lookups
    misses: int  # blocks asked for and not served
    evictions: int  # blocks dropped from memory (spilled or gone)
    refused: int  # blocks not taken (full, malformed, unreadable)
    corrupt: int  # blocks dropped after a reader found them corrupt or lost
    reowned: int  # orphaned blocks the store re-put as its own
    saved_bytes: int
    loaded_bytes: int  # reported by readers after verifying
    save_latencies_s: tuple[float, ...]  # samples since the previous report
    load_latencies_s: tuple[float, ...]
    version: int  # of the set of held hashes (memory and disk)
    hashes: frozenset[int] | None  # the whole set, when the caller's version was unknown
    added: tuple[int, ...] = ()  # since the caller's version, when it was known
    removed: tuple[int, ...] = ()

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@dataclass
class _Entry:
    meta: BlockMeta
    ref: Any  # ObjectRef of the bytes
    view: Any  # the bytes, mapped from the object store: keeps them alive
    owned: bool  # the store put `ref` itself


Found = list[tuple[BlockMeta, list]]  # (meta, [ref]): refs nested so Ray passes them as refs


class KVCacheStore:
    def __init__(self, store_id: str, node_id: str, settings: StoreSettings,
                 clock: Callable[[], float] = time.time):
        self.store_id, self.node_id, self.settings, self.clock = store_id, node_id, settings, clock
        self.started_at = clock()
        self._lru = KVLru(settings.capacity_bytes)
        self._entries: dict[int, _Entry] = {}
        self._spill = (SpillTier(Path(settings.spill_dir) / store_id, settings.spill_capacity_bytes)
                       if settings.spill_dir and settings.spill_capacity_bytes > 0 else None)
        self._version = 0
        self._journal: collections.deque[tuple[int, int, bool]] = collections.deque(maxlen=_JOURNAL)
        self._counts = collections.Counter()
        self._save_s: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self._load_s: collections.deque[float] = collections.deque(maxlen=_SAMPLES)

    # ---- write ---------------------------------------------------------------------

    async def put(self, blocks: list[tuple[BlockMeta, list]], writer_s: float = 0.0) -> PutResult:
        """Take blocks the caller `ray.put` on this node; `writer_s` is the seconds that took.

        Refused (never waited for): a block larger than the room left unpinned, one whose
        bytes do not match its meta, one whose object cannot be read within
        `ref_timeout_s`, a hash held with another layout.
        """
        began = time.perf_counter()
        views = await self._resolve([refs[0] for _, refs in blocks])
        stored: list[int] = []
        refused: list[tuple[int, str]] = []
        for (meta, refs), view in zip(blocks, views):
            why = self._admit(meta, refs[0], view)
            (stored.append(meta.block_hash) if why is None else refused.append((meta.block_hash, why)))
        self._counts["refused"] += len(refused)
        if stored:
            self._save_s.append(writer_s + time.perf_counter() - began)
        return PutResult(tuple(stored), tuple(refused))

    async def _resolve(self, refs: list) -> list:
        async def one(ref):
            try:
                return await asyncio.wait_for(ref, self.settings.ref_timeout_s)
            except Exception as e:  # noqa: BLE001 — any failure to read is that block's refusal
                return e
        return await asyncio.gather(*(one(r) for r in refs))

    def _admit(self, meta: BlockMeta, ref: Any, view: Any) -> str | None:
        """Hold one block; None when held, else why not."""
        key = meta.block_hash
        held = self._entries.get(key)
        if held is not None:
            if held.meta.layout != meta.layout:
                return f"hash held with another layout ({held.meta.layout})"
            self._lru.touch((key,))
            return None
        if isinstance(view, Exception):
            return f"object unreadable: {type(view).__name__}"
        try:
            check_matches(view, meta.layout, f"block {key:#x}")
        except BlockRefused as e:
            return str(e)
        now = self.clock()
        if self._lru.victims(meta.nbytes, now) is None:
            return "store full: the room left is pinned or the block exceeds the capacity"
        for victim in self._lru.admit(key, meta.nbytes, now):
            self._evict(victim, now)
        was_spilled = self._spill is not None and self._spill.remove(key)
        self._entries[key] = _Entry(meta, ref, view, owned=False)
        self._counts["saved_bytes"] += meta.nbytes
        if not was_spilled:
            self._changed(key, added=True)
        return None

    def _evict(self, key: int, now: float) -> None:
        entry = self._entries.pop(key)
        self._counts["evictions"] += 1
        dropped = self._spill.write(entry.meta, entry.view, now) if self._spill is not None else None
        if dropped is None:
            self._changed(key, added=False)
        else:
            for victim in dropped:
                self._changed(victim, added=False)

    # ---- read ----------------------------------------------------------------------

    def lookup(self, model_id: str, hashes: list[int]) -> Found:
        """Refs of the leading blocks of `hashes` held here for `model_id` (memory or
        disk); stops at the first one missing. Served blocks become the most recent, the
        first of them most recent of all, so that a prefix's head outlives its tail."""
        found: Found = []
        for key in hashes:
            entry = self._entries.get(key) or self._promote(key)
            if entry is None or entry.meta.layout.model_id != model_id:
                break
            found.append((entry.meta, [entry.ref]))
        self._lru.touch(reversed([meta.block_hash for meta, _ in found]))
        self._counts["hits"] += len(found)
        self._counts["misses"] += len(hashes) - len(found)
        return found

    def contains(self, model_id: str, hashes: list[int]) -> int:
        """How many leading `hashes` are held for `model_id` (no side effects)."""
        n = 0
        for key in hashes:
            entry = self._entries.get(key)
            meta = entry.meta if entry is not None else self._spill.meta(key) if self._spill else None
            if meta is None or meta.layout.model_id != model_id:
                break
            n += 1
        return n

    def _promote(self, key: int) -> _Entry | None:
        """A spilled block back in memory (or served from a fresh object when memory is
        pinned full); None if it is not on disk either."""
        if self._spill is None or key not in self._spill:
            return None
        read = self._spill.read(key)
        if read is None:
            self._changed(key, added=False)
            return None
        meta, data = read
        entry = _Entry(meta, ray.put(data), data, owned=True)
        now = self.clock()
        if self._lru.victims(meta.nbytes, now) is not None:
            self._spill.remove(key)
            for victim in self._lru.admit(key, meta.nbytes, now):
                self._evict(victim, now)
            self._entries[key] = entry
        return entry

    def reown(self, hashes: list[int]) -> Found:
        """Refs the store owns for the leading `hashes` whose writer's objects were lost
        (the writer died); stops at the first block not held in memory."""
        found: Found = []
        for key in hashes:
            entry = self._entries.get(key)
            if entry is None:
                break
            if not entry.owned:
                entry.ref, entry.owned = ray.put(entry.view), True
                self._counts["reowned"] += 1
            found.append((entry.meta, [entry.ref]))
        return found

    def drop(self, hashes: list[int]) -> int:
        """Forget blocks a reader found corrupt or lost; returns how many were held."""
        n = 0
        for key in hashes:
            in_memory = self._entries.pop(key, None) is not None and self._lru.remove(key) > 0
            on_disk = self._spill is not None and self._spill.remove(key)
            if in_memory or on_disk:
                n += 1
                self._changed(key, added=False)
        self._counts["corrupt"] += n
        return n

    def note_load(self, nbytes: int, seconds: float) -> None:
        """A reader loaded and verified `nbytes` from here in `seconds` (for metrics)."""
        self._counts["loaded_bytes"] += nbytes
        self._load_s.append(seconds)

    # ---- pins ----------------------------------------------------------------------

    def pin(self, owner: str, hashes: list[int], ttl_s: float) -> int:
        """Keep `hashes` from eviction for `owner` for `ttl_s` seconds (at most
        `max_pin_ttl_s`), replacing its previous pin; returns how many are held now."""
        if not 0 < ttl_s <= self.settings.max_pin_ttl_s:
            raise ValueError(f"ttl_s must lie in (0, {self.settings.max_pin_ttl_s}], got {ttl_s}")
        return self._lru.pin(owner, hashes, self.clock() + ttl_s)

    def unpin(self, owner: str) -> bool:
        return self._lru.unpin(owner)

    # ---- report --------------------------------------------------------------------

    def report(self, since_version: int = -1) -> StoreReport:
        """Sizes and counters, and the held hashes: as changes since `since_version`
        when the journal still covers it, else the whole set."""
        self._lru.expire(self.clock())
        c, spill = self._counts, self._spill
        delta = self._delta(since_version)
        hashes = None if delta is not None else frozenset(self._entries) | (spill.hashes() if spill else frozenset())
        added, removed = delta or ((), ())
        save_s, load_s = tuple(self._save_s), tuple(self._load_s)
        self._save_s.clear()
        self._load_s.clear()
        return StoreReport(
            self.store_id, self.node_id, self.started_at, self._lru.capacity_bytes, self._lru.used_bytes,
            len(self._entries), spill.capacity_bytes if spill else 0, spill.used_bytes if spill else 0,
            len(spill) if spill else 0, self._lru.pinned_keys, c["hits"], c["misses"], c["evictions"],
            c["refused"], c["corrupt"], c["reowned"], c["saved_bytes"], c["loaded_bytes"], save_s, load_s,
            self._version, hashes, added, removed,
        )

    def _changed(self, key: int, added: bool) -> None:
        self._version += 1
        self._journal.append((self._version, key, added))

    def _delta(self, since: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(added, removed) since version `since`; None when the journal does not reach back."""
        if since == self._version:
            return (), ()
        if since < 0 or since > self._version or not self._journal or self._journal[0][0] > since + 1:
            return None
        state: dict[int, bool] = {}
        for version, key, added in self._journal:
            if version > since:
                state[key] = added
        return (tuple(k for k, a in state.items() if a), tuple(k for k, a in state.items() if not a))
