"""`KVStoreClient`: the only code that calls a `KVCacheStore` through Ray.

Control calls (`report`, `contains`, `pin`, `unpin`) are async; the data path
(`put_blocks`, `fetch`) is synchronous, because vLLM's worker calls it from its
forward pass, and async callers run it in a thread (`ray.get` is thread-safe).
Ray's failures come out as `KVStoreUnavailable`; a block that cannot be read or
fails verification is a miss, never an error: the caller recomputes it.

Copy path (see `bench/kvstore_throughput.py` for figures): a save is one copy, the
writer's `ray.put` into its node's shared-memory object store; a load on the same
node maps that memory (zero-copy), hashes it (when checksums are on) and the engine
copies it into its KV cache; a load from another node is one Ray object transfer
into the reader's node, then the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.kvstore import KVCacheStore, PutResult, StoreReport, StoreSettings
from actors.kvstore_block import BlockCorrupt, BlockLayout, BlockMeta, BlockRefused, describe, verify

STORE_PREFIX = "kvstore:"


def store_actor_name(node_id: str) -> str:
    """The Ray actor name of the store on `node_id`, in the fleet's namespace."""
    return f"{STORE_PREFIX}{node_id}"


def store_id_of(node_id: str) -> str:
    """A store's short, stable id (admin API, metrics labels, spill directory)."""
    return f"kvstore-{node_id[:12]}"


class KVStoreUnavailable(RuntimeError):
    """A store could not be reached: dead (`dead`) or too slow to answer."""

    def __init__(self, store_id: str, reason: str, *, dead: bool):
        super().__init__(f"KV store {store_id} unavailable: {reason}")
        self.store_id = store_id
        self.dead = dead


@dataclass(frozen=True)
class Fetched:
    """The leading blocks a fetch verified, as arrays (read-only when mapped zero-copy)."""

    blocks: tuple[np.ndarray, ...]
    seconds: float  # lookup, transfer and verification
    refused: str | None = None  # why the run stopped early (a miss, not an error), if it did

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


class KVStoreClient:
    def __init__(self, node_id: str, handle: Any):
        self.node_id = node_id
        self.store_id = store_id_of(node_id)
        self._handle = handle

    # ---- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, node_id: str, namespace: str, settings: StoreSettings) -> KVStoreClient:
        """Start the store of `node_id` there (detached, named; the controller restarts it)."""
        handle = ray.remote(KVCacheStore).options(
            name=store_actor_name(node_id),
            namespace=namespace,
            lifetime="detached",
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(store_id_of(node_id), node_id, settings)
        return cls(node_id, handle)

    @classmethod
    def lookup(cls, node_id: str, namespace: str) -> KVStoreClient | None:
        """The running store of `node_id`, or None if there is none."""
        try:
            return cls(node_id, ray.get_actor(store_actor_name(node_id), namespace=namespace))
        except ValueError:
            return None

    @classmethod
    def discover(cls, namespace: str) -> dict[str, KVStoreClient]:
        """Every store of the fleet, by node id (one GCS query)."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == namespace and a["name"].startswith(STORE_PREFIX)]
        found = (cls.lookup(name.removeprefix(STORE_PREFIX), namespace) for name in names)
        return {c.node_id: c for c in found if c is not None}

    def kill(self) -> None:
        try:
            ray.kill(self._handle, no_restart=True)
        except (RayActorError, ValueError):
            pass  # already gone

    # ---- control (async) -----------------------------------------------------------

    async def report(self, since_version: int = -1, timeout_s: float = 2.0) -> StoreReport:
        return await self._call(self._handle.report.remote(since_version), timeout_s)

    async def contains(self, model_id: str, hashes: Sequence[int], timeout_s: float = 1.0) -> int:
        """Leading `hashes` the store holds for `model_id`."""
        return await self._call(self._handle.contains.remote(model_id, list(hashes)), timeout_s)

    async def pin(self, owner: str, hashes: Sequence[int], ttl_s: float, timeout_s: float = 2.0) -> int:
        """Keep `hashes` from eviction for `ttl_s` seconds under `owner` (which replaces
        its previous pin); returns how many are held now."""
        return await self._call(self._handle.pin.remote(owner, list(hashes), ttl_s), timeout_s)

    async def unpin(self, owner: str, timeout_s: float = 2.0) -> bool:
        return await self._call(self._handle.unpin.remote(owner), timeout_s)

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except (TimeoutError, GetTimeoutError):
            raise KVStoreUnavailable(self.store_id, f"no answer within {timeout_s:g}s", dead=False) from None
        except RayActorError as e:
            raise KVStoreUnavailable(self.store_id, str(e).splitlines()[0], dead=True) from None

    # ---- data (sync) ---------------------------------------------------------------

    def put_blocks(self, layout: BlockLayout, blocks: Sequence[tuple[int, np.ndarray]], *,
                   with_checksum: bool, wait_s: float | None = 5.0) -> PutResult | None:
        """Save `(hash, array)` blocks of `layout` to this store, which must be on the
        caller's node. One copy each (`ray.put`). With `wait_s=None` it returns at once
        (None) and the store takes them in the background: a writer on the serving path
        never waits on the store. Raises `BlockRefused` for an array that is not a block
        of `layout`."""
        if not blocks:
            return PutResult((), ())
        metas = [describe(h, layout, data, with_checksum) for h, data in blocks]
        began = time.perf_counter()
        refs = [ray.put(np.ascontiguousarray(data)) for _, data in blocks]
        call = self._handle.put.remote([(m, [r]) for m, r in zip(metas, refs)], time.perf_counter() - began)
        return None if wait_s is None else self._get(call, wait_s)

    def fetch(self, layout: BlockLayout, hashes: Sequence[int], *, verify_checksum: bool,
              timeout_s: float = 10.0) -> Fetched:
        """The leading blocks of `hashes` this store holds, read and verified.

        Stops at the first block that is missing, unreadable, of another layout or
        corrupt; corrupt and lost ones are dropped from the store. Objects whose writer
        died are re-owned by the store and read once more.
        """
        began = time.perf_counter()
        found = self._get(self._handle.lookup.remote(layout.model_id, list(hashes)), timeout_s)
        if not found:
            return Fetched((), time.perf_counter() - began)
        metas, arrays, why = self._read(found, timeout_s)
        blocks: list[np.ndarray] = []
        for meta, data in zip(metas, arrays):
            try:
                blocks.append(verify(meta, data, layout, verify_checksum))
            except BlockRefused as e:
                why = str(e)
                if isinstance(e, BlockCorrupt):  # another layout is not this reader's; corrupt is nobody's
                    self._handle.drop.remote([meta.block_hash])
                break
        seconds = time.perf_counter() - began
        if blocks:
            self._handle.note_load.remote(sum(b.nbytes for b in blocks), seconds)
        return Fetched(tuple(blocks), seconds, why if len(blocks) < len(hashes) else None)

    def _read(self, found: list[tuple[BlockMeta, list]],
              timeout_s: float) -> tuple[list[BlockMeta], list, str | None]:
        """The metas and arrays of `found`, re-owning them once if their writer's objects
        are lost; empty lists (and why) when they cannot be read."""
        try:
            return [m for m, _ in found], ray.get([r[0] for _, r in found], timeout=timeout_s), None
        except ObjectLostError:
            found = self._get(self._handle.reown.remote([m.block_hash for m, _ in found]), timeout_s)
        except GetTimeoutError:
            return [], [], f"blocks not read within {timeout_s:g}s"
        try:
            return [m for m, _ in found], ray.get([r[0] for _, r in found], timeout=timeout_s), None
        except (ObjectLostError, GetTimeoutError) as e:
            self._handle.drop.remote([m.block_hash for m, _ in found])
            return [], [], f"blocks lost: {type(e).__name__}"

    def _get(self, ref: Any, timeout_s: float) -> Any:
        try:
            return ray.get(ref, timeout=timeout_s)
        except GetTimeoutError:
            raise KVStoreUnavailable(self.store_id, f"no answer within {timeout_s:g}s", dead=False) from None
        except RayActorError as e:
            raise KVStoreUnavailable(self.store_id, str(e).splitlines()[0], dead=True) from None
