"""`KVLink`: a replica's way to the fleet's KV-cache stores.

A replica saves the blocks it computes to its own node's store and loads the blocks
it lacks from whichever store holds the longest run of them, its own node's first
on a tie. The controller tells a replica how (`KVLinkSettings`, in the environment
variable `FLOTILLA_KV_STORE` of its process, so that vLLM's engine processes, which
it spawns, read the same); without that variable the fleet has no stores and
engines neither save nor load.

Stores are found by name (`kvstore:<node id>`) and re-found every
`discover_period_s`, so a store the controller restarted is picked up again.
A store that does not answer within `lookup_timeout_s` is skipped: a slow or dead
store costs a replica a bounded wait and then recompute, never a failed request.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from actors.kvstore_client import KVStoreClient, KVStoreUnavailable

ENV_VAR = "FLOTILLA_KV_STORE"


@dataclass(frozen=True)
class KVLinkSettings:
    """How replicas use the stores. Seconds, bytes per second."""

    namespace: str  # the fleet's Ray namespace, where the stores are named
    checksum: bool = True  # write checksums and verify them on every load
    kv_bytes_scale: float = 1 / 64  # sim engine: bytes materialised per byte of modelled KV
    same_node_bytes_per_s: float = 25e9  # sim engine: store -> GPU on one node (PCIe 5 x16, one way)
    cross_node_bytes_per_s: float = 12.5e9  # sim engine: from another node (100 Gb/s)
    lookup_timeout_s: float = 0.5  # asking the stores what they hold
    load_timeout_s: float = 10.0  # reading blocks; then the engine recomputes them
    save_timeout_s: float = 10.0
    discover_period_s: float = 5.0
    # a context shorter than this is computed without asking the stores: the lookup
    # would cost more than it saves, and the request would wait on it
    min_load_tokens: int = 256
    checkpoint_interval_s: float = 5.0  # see actors.kv_checkpoint; 0: no checkpoints
    checkpoint_min_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.kv_bytes_scale <= 1:
            raise ValueError(f"kv_bytes_scale must lie in (0, 1], got {self.kv_bytes_scale}")
        if self.checkpoint_interval_s < 0 or self.checkpoint_min_new_tokens < 1:
            raise ValueError("checkpoint_interval_s must not be negative and checkpoint_min_new_tokens "
                             f"must be at least 1, got {self.checkpoint_interval_s}, {self.checkpoint_min_new_tokens}")
        if self.min_load_tokens < 0:
            raise ValueError(f"min_load_tokens must not be negative, got {self.min_load_tokens}")
        for name in ("same_node_bytes_per_s", "cross_node_bytes_per_s", "lookup_timeout_s",
                     "load_timeout_s", "save_timeout_s", "discover_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KVLinkSettings | None:
        """The settings the controller put in the environment; None: the fleet has no stores."""
        raw = environ.get(ENV_VAR)
        if not raw:
            return None
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{ENV_VAR} is not valid KV-link settings: {e}") from None


@dataclass(frozen=True)
class LoadPlan:
    """Where a context's missing blocks are. Counts are leading blocks of the hashes asked."""

    local_blocks: int  # held by this node's store (what saving may skip)
    source_node: str | None  # the store to load from; None when no store holds any
    source_blocks: int  # held there
    same_node: bool = False  # the source is this node's store


class KVLink:
    """The stores as one replica on `node_id` sees them. `clock` is monotonic seconds."""

    def __init__(self, settings: KVLinkSettings, node_id: str, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.node_id = node_id
        self._clock = clock
        self._stores: dict[str, KVStoreClient] = {}
        self._found_at = float("-inf")

    def local(self) -> KVStoreClient | None:
        """This node's store (looked up by name when not known)."""
        client = self._stores.get(self.node_id)
        if client is None:
            client = KVStoreClient.lookup(self.node_id, self.settings.namespace)
            if client is not None:
                self._stores[self.node_id] = client
        return client

    def store(self, node_id: str) -> KVStoreClient | None:
        return self._stores.get(node_id) or (self.local() if node_id == self.node_id else None)

    def forget(self, node_id: str) -> None:
        """Drop a store that failed; it is looked up again later."""
        self._stores.pop(node_id, None)

    def connector_config(self, model_id: str) -> dict[str, Any]:
        """What vLLM's KV-connector processes need to reach the stores: they are not Ray
        workers, so they join the cluster as drivers at this address."""
        import ray

        s = self.settings
        return {"ray_address": ray.get_runtime_context().gcs_address, "namespace": s.namespace,
                "node_id": self.node_id, "model_id": model_id, "checksum": s.checksum,
                "load_timeout_s": s.load_timeout_s, "save_timeout_s": s.save_timeout_s}

    async def stores(self) -> dict[str, KVStoreClient]:
        """Every store, re-discovered every `discover_period_s` (in a thread: one GCS query)."""
        if self._clock() - self._found_at >= self.settings.discover_period_s:
            self._found_at = self._clock()
            try:
                self._stores = await asyncio.to_thread(KVStoreClient.discover, self.settings.namespace)
            except Exception:  # noqa: BLE001 — the GCS is busy: keep the stores known so far
                self._found_at -= self.settings.discover_period_s / 2
        return dict(self._stores)

    async def plan(self, model_id: str, hashes: Sequence[int]) -> LoadPlan:
        """Ask every store how many leading `hashes` it holds; the longest run wins, this
        node's store on a tie. A store that fails to answer counts as holding none."""
        if not hashes:
            return LoadPlan(0, None, 0)
        stores = await self.stores()
        local = stores.get(self.node_id)
        held = await self._contains(local, model_id, hashes) if local is not None else 0
        if held == len(hashes):
            return LoadPlan(held, self.node_id, held, same_node=True)
        others = [(n, c) for n, c in stores.items() if n != self.node_id]
        counts = await asyncio.gather(*(self._contains(c, model_id, hashes) for _, c in others))
        best_node, best = (self.node_id, held) if held else (None, 0)
        for (node, _), n in zip(others, counts):
            if n > best:
                best_node, best = node, n
        return LoadPlan(held, best_node, best, same_node=best_node == self.node_id)

    async def _contains(self, client: KVStoreClient, model_id: str, hashes: Sequence[int]) -> int:
        try:
            return await client.contains(model_id, hashes, timeout_s=self.settings.lookup_timeout_s)
        except KVStoreUnavailable as e:
            if e.dead:
                self.forget(client.node_id)
            return 0
