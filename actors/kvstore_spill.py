"""A KV store's second tier: blocks evicted from memory, kept in files on local disk.

One file per block (`<hash>.kv`, the raw bytes), written to a temporary name and
renamed so a reader never sees half a block; the block's meta stays in memory (a
restarted store starts with an empty directory: what its predecessor spilled is not
trusted). The tier has its own byte capacity and evicts least recently used blocks
to make room. Reads and writes are synchronous and bounded by one block's size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from actors.kvstore_block import BlockMeta
from policies.kv_lru import KVLru


class SpillTier:
    """Blocks on disk under `directory`, at most `capacity_bytes` of them."""

    def __init__(self, directory: Path, capacity_bytes: int):
        self.directory = directory
        self._lru = KVLru(capacity_bytes)
        self._meta: dict[int, BlockMeta] = {}
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    @property
    def capacity_bytes(self) -> int:
        return self._lru.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._lru

    def meta(self, block_hash: int) -> BlockMeta | None:
        return self._meta.get(block_hash)

    def write(self, meta: BlockMeta, data: np.ndarray, now: float) -> tuple[int, ...] | None:
        """Keep `data` on disk; returns the blocks dropped to make room, or None when it
        does not fit (then nothing changed)."""
        key = meta.block_hash
        if key in self._lru:
            self._lru.touch((key,))
            return ()
        if self._lru.victims(meta.nbytes, now) is None:
            return None
        tmp = self._path(key).with_suffix(".tmp")
        np.ascontiguousarray(data).tofile(tmp)
        tmp.replace(self._path(key))
        dropped = self._lru.admit(key, meta.nbytes, now)
        for victim in dropped:
            self._forget(victim)
        self._meta[key] = meta
        return dropped

    def read(self, block_hash: int) -> tuple[BlockMeta, np.ndarray] | None:
        """The block's meta and bytes (a fresh array), or None if it is not here or its
        file is gone or short (then it is forgotten)."""
        meta = self._meta.get(block_hash)
        if meta is None:
            return None
        layout = meta.layout
        try:
            data = np.fromfile(self._path(block_hash), dtype=layout.dtype)
        except OSError:
            data = None
        if data is None or data.size * data.itemsize != layout.nbytes:
            self.remove(block_hash)
            return None
        return meta, data.reshape(layout.shape)

    def remove(self, block_hash: int) -> bool:
        if self._lru.remove(block_hash) == 0:
            return False
        self._forget(block_hash)
        return True

    def hashes(self) -> frozenset[int]:
        return frozenset(self._meta)

    def _forget(self, block_hash: int) -> None:
        self._meta.pop(block_hash, None)
        self._path(block_hash).unlink(missing_ok=True)

    def _path(self, block_hash: int) -> Path:
        return self.directory / f"{block_hash:016x}.kv"
