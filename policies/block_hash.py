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


def _digest(parent: int, tokens: Sequence[int], model_id: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent))
    h.update(model_id.encode())
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, model_id: str) -> tuple[int, ...]:
    """Hashes of every full block of `token_ids`, in order."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _digest(parent, token_ids[start : start + block_size], model_id)
        hashes.append(parent)
    return tuple(hashes)


def extend_block_hashes(
    known: tuple[int, ...], token_ids: Sequence[int], block_size: int, model_id: str
) -> tuple[int, ...]:
    """`block_hashes(token_ids, ...)` reusing the first `len(known)` hashes already computed."""
    hashes = list(known)
    parent = known[-1] if known else _ROOT
    for start in range(len(known) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = _digest(parent, token_ids[start : start + block_size], model_id)
        hashes.append(parent)
    return tuple(hashes)
