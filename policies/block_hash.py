"""Chained KV-block hashes: the one identity of a prefix across the whole cluster.

A block's hash covers its parent's hash, its token ids and the model's identity, so
equal hashes mean equal KV (for the same model) wherever the block was computed.
Engines, replicas, KV stores and routing all key blocks this way. Only full blocks
are hashed: a partial last block is never shared.

Hashes are 64-bit integers from BLAKE2b, stable across processes and machines
(Python's `hash()` is salted per process and would not be).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_ROOT = 0


def block_hashes(token_ids: Sequence[int], block_size: int, model_id: str) -> tuple[int, ...]:
    """Hashes of every full block of `token_ids`, in order."""
    return extend_block_hashes((), token_ids, block_size, model_id)


def extend_block_hashes(
    known: tuple[int, ...], token_ids: Sequence[int], block_size: int, model_id: str
) -> tuple[int, ...]:
    """`block_hashes(token_ids, ...)` reusing the first `len(known)` hashes already computed.

    Block i's digest is BLAKE2b-64 over its parent's hash (8 bytes, little-endian), the
    model id (UTF-8) and its token ids (4 bytes each, little-endian).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes = list(known)
    parent = known[-1] if known else _ROOT
    first, full = len(known), len(token_ids) // block_size
    if full > first:
        # one packing of every new token, then a slice per block: packing per block costs more than hashing
        data = struct.pack(f"<{(full - first) * block_size}I", *token_ids[first * block_size : full * block_size])
        model, stride = model_id.encode(), 4 * block_size
        for offset in range(0, len(data), stride):
            h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
            h.update(model)
            h.update(data[offset : offset + stride])
            parent = int.from_bytes(h.digest(), "little")
            hashes.append(parent)
    return tuple(hashes)
