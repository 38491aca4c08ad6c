"""`SimKV`: the simulated engine's KV blocks, saved to and loaded from the real KV-cache stores.

The sim engine holds no tensors, but its KV travels through the same stores as vLLM's,
so that routing, the index, pinning and faults see the same traffic. A block is a
uint8 array of `kv_bytes_scale` times the bytes the modelled transformer's KV of
`block_size` tokens takes (2 x layers x KV heads x head dim x dtype bytes per token:
8 MiB per 16-token block of Llama-2-7B, 128 KiB materialised at the default 1/64),
filled with a pattern of its hash and checksummed like any other block.

Loading: when a request arrives, `prefetch` asks the stores for its context's blocks
after those the engine's own cache holds and reads the longest run found (a real
lookup, transfer and verification). The step loop waits, at most `load_timeout_s`,
for arrivals' prefetches before it schedules; at admission the scheduler asks `load`
(its `prefix_loader`) for the run, and the simulated GPU pays the modelled KV bytes
at the link's bandwidth (same node, or another node) in that step instead of their
prefill. A block not fetched in time is simply computed.

Saving: the full blocks of a request's prompt go to the node's store once its
prefill is done (`save`, in the background), and `export` saves a request's whole
context on demand (migration).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from actors.kv_link import KVLink
from actors.kvstore_block import BlockLayout
from actors.kvstore_client import KVStoreUnavailable
from policies.transformer_spec import TransformerSpec

log = logging.getLogger(__name__)

_REMEMBERED = 1 << 20  # block hashes kept as "in this node's store" / "fetched"


class _Bounded(OrderedDict):
    """An insertion-ordered map that forgets its oldest entries beyond `_REMEMBERED`."""

    def put(self, key: int, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _REMEMBERED:
            self.popitem(last=False)


class SimKV:
    """One sim engine's side of the stores. See the module docstring."""

    def __init__(self, link: KVLink, model_id: str, arch: TransformerSpec, block_size: int):
        self.link = link
        self.settings = link.settings
        self.block_size = block_size
        self.block_bytes = arch.kv_bytes_per_token * block_size  # modelled, unscaled
        payload = max(8, int(self.block_bytes * self.settings.kv_bytes_scale) // 8 * 8)
        self.layout = BlockLayout(model_id, (payload,), "uint8")
        self._fetched = _Bounded()  # hash -> came from this node's store (awaiting `load`)
        self._stored = _Bounded()  # hashes this node's store is known to hold
        self._pending: set[asyncio.Task] = set()
        self._saving: set[asyncio.Task] = set()

    def payload(self, block_hash: int) -> np.ndarray:
        """The bytes of a block: its hash's 8 bytes, repeated."""
        pattern = np.frombuffer(block_hash.to_bytes(8, "little"), dtype=np.uint8)
        return np.resize(pattern, self.layout.shape)

    # ---- load ----------------------------------------------------------------------

    def prefetch(self, hashes: Sequence[int], first: int) -> None:
        """Start fetching blocks `hashes[first:]` (those after the engine's own hits),
        unless the context is shorter than `min_load_tokens`."""
        if first < len(hashes) and len(hashes) * self.block_size >= self.settings.min_load_tokens:
            self._track(self._pending, self._prefetch(tuple(hashes[first:])))

    async def _prefetch(self, hashes: tuple[int, ...]) -> None:
        try:
            await self._fetch(hashes)
        except Exception as e:  # noqa: BLE001 — a store problem costs recompute, never the request
            log.warning("KV prefetch failed, computing instead: %r", e)

    async def _fetch(self, hashes: tuple[int, ...]) -> None:
        plan = await self.link.plan(self.layout.model_id, hashes)
        self._remember_stored(hashes[: plan.local_blocks])
        client = self.link.store(plan.source_node) if plan.source_node else None
        if client is None or plan.source_blocks == 0:
            return
        wanted = hashes[: plan.source_blocks]
        try:
            fetched = await asyncio.to_thread(client.fetch, self.layout, wanted, timeout_s=self.settings.load_timeout_s,
                                              verify_checksum=self.settings.checksum)
        except KVStoreUnavailable as e:
            log.warning("KV load from %s failed, recomputing: %s", client.store_id, e)
            return
        if fetched.refused:
            log.warning("KV load from %s stopped after %d of %d blocks: %s", client.store_id,
                        len(fetched.blocks), len(wanted), fetched.refused)
        for block_hash, _ in zip(wanted, fetched.blocks):
            self._fetched.put(block_hash, plan.same_node)

    async def settle(self) -> None:
        """Wait, at most `load_timeout_s`, for the prefetches under way."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.settings.load_timeout_s)

    def load(self, hashes: Sequence[int], first: int, limit: int) -> tuple[int, float]:
        """`SimScheduler.prefix_loader`: the fetched run from `hashes[first]` (at most
        `limit` blocks) and the simulated seconds moving its modelled bytes takes."""
        n = seconds = 0
        while n < limit and hashes[first + n] in self._fetched:
            same_node = self._fetched.pop(hashes[first + n])
            rate = self.settings.same_node_bytes_per_s if same_node else self.settings.cross_node_bytes_per_s
            seconds += self.block_bytes / rate
            n += 1
        return n, seconds

    # ---- save ----------------------------------------------------------------------

    def save(self, hashes: Iterable[int]) -> None:
        """Save blocks to this node's store in the background (those it is not known to hold)."""
        missing = tuple(h for h in hashes if h not in self._stored)
        if missing:
            self._track(self._saving, self._save(missing))

    async def export(self, hashes: Sequence[int]) -> tuple[int, ...]:
        """Save `hashes` now; returns the leading run of them the store holds after."""
        stored = set(await self._save(tuple(hashes)))
        held = 0
        while held < len(hashes) and (hashes[held] in stored or hashes[held] in self._stored):
            held += 1
        return tuple(hashes[:held])

    async def _save(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        client = self.link.local()
        if client is None:
            return ()
        blocks = [(h, self.payload(h)) for h in hashes]
        try:
            result = await asyncio.to_thread(client.put_blocks, self.layout, blocks,
                                             with_checksum=self.settings.checksum,
                                             wait_s=self.settings.save_timeout_s)
        except Exception as e:  # noqa: BLE001 — a lost save is a later miss, nothing more
            if isinstance(e, KVStoreUnavailable):
                self.link.forget(client.node_id)
            log.warning("KV save to %s failed: %r", client.store_id, e)
            return ()
        self._remember_stored(result.stored)
        return result.stored

    def _remember_stored(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._stored.put(h, None)

    async def close(self) -> None:
        for task in self._pending | self._saving:
            task.cancel()
        await asyncio.gather(*self._pending, *self._saving, return_exceptions=True)

    @staticmethod
    def _track(tasks: set[asyncio.Task], coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
