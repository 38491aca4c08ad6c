"""One KV block as the KV-cache stores hold it: its identity, its shape and its checksum.

A block is the KV of `block_size` tokens across every layer of one model, keyed by
its chained hash (`policies.block_hash`: parent hash + token ids + model identity), so
a prefix computed anywhere is found everywhere. Its bytes are one C-contiguous numpy
array whose layout the engine that wrote it defines (`shape`, `dtype`); a reader
accepts a block only when model, shape and dtype are what it expects and the bytes
hash to `checksum` (xxHash's XXH3, 64-bit: ~14 GB/s on this machine against ~1 GB/s
for BLAKE2b). Anything else is a miss, and the engine recomputes: a corrupt block is
never served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xxhash


class BlockRefused(ValueError):
    """A block that does not match what it claims or what the reader expects."""


class BlockCorrupt(BlockRefused):
    """A block whose bytes do not hash to its checksum: it must be dropped, not kept."""


@dataclass(frozen=True)
class BlockLayout:
    """What the blocks of one engine look like: refused unless they match exactly."""

    model_id: str
    shape: tuple[int, ...]  # of one block's array
    dtype: str  # numpy dtype name, e.g. "float32", "uint8"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def empty(self) -> np.ndarray:
        return np.empty(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class BlockMeta:
    """A stored block's identity and the facts a reader checks before using its bytes."""

    block_hash: int  # chained hash, unsigned 64-bit
    layout: BlockLayout
    checksum: int | None  # XXH3-64 of the bytes; None when checksums are off

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def checksum(data: np.ndarray) -> int:
    """XXH3-64 of an array's bytes (C-contiguous; no copy)."""
    return xxhash.xxh3_64_intdigest(memoryview(np.ascontiguousarray(data)).cast("B"))


def describe(block_hash: int, layout: BlockLayout, data: np.ndarray, with_checksum: bool) -> BlockMeta:
    """The meta of `data` as a block of `layout`; raises `BlockRefused` if it is not one."""
    check_matches(data, layout, f"block {block_hash:#x}")
    if not 0 <= block_hash < 1 << 64:
        raise BlockRefused(f"block hash {block_hash!r} is not an unsigned 64-bit integer")
    return BlockMeta(block_hash, layout, checksum(data) if with_checksum else None)


def check_matches(data: np.ndarray, layout: BlockLayout, what: str) -> None:
    """Raise `BlockRefused` unless `data` has exactly `layout`'s shape and dtype."""
    if not isinstance(data, np.ndarray):
        raise BlockRefused(f"{what}: expected a numpy array, got {type(data).__name__}")
    if tuple(data.shape) != tuple(layout.shape) or data.dtype != np.dtype(layout.dtype):
        raise BlockRefused(f"{what}: shape {tuple(data.shape)} {data.dtype} is not the "
                           f"{layout.shape} {layout.dtype} of model {layout.model_id!r}")


def verify(meta: BlockMeta, data: object, expected: BlockLayout, verify_checksum: bool) -> np.ndarray:
    """`data` as the block `meta` says it is, or `BlockRefused` naming why it is not.

    Checks, in order: the layout the reader expects (model, shape, dtype), that the
    bytes have it, and the checksum when both sides have one.
    """
    what = f"block {meta.block_hash:#x}"
    if meta.layout != expected:
        raise BlockRefused(f"{what}: stored as {meta.layout}, the reader expects {expected}")
    check_matches(data, expected, what)  # type: ignore[arg-type]
    if verify_checksum and meta.checksum is not None and checksum(data) != meta.checksum:  # type: ignore[arg-type]
        raise BlockCorrupt(f"{what}: checksum mismatch (corrupt bytes)")
    return data  # type: ignore[return-value]
