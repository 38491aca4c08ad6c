"""`FlotillaKVConnector`: vLLM's KV-connector interface (the one LMCache and NIXL plug
into) over the fleet's KV-cache stores.

vLLM builds the connector twice: in its engine-core process (scheduler side: which
tokens to load, which blocks to save) and in its worker process (worker side: moving
the bytes). Neither is a Ray worker, so each connects to the cluster as a Ray driver
on first use (`ray.init(address=...)`, ~0.1 s) with the address and namespace that
`VllmEngine` puts in `kv_connector_extra_config["flotilla"]`.

Blocks are keyed by the project's chained hashes (`policies.block_hash`, keyed by the
served model name and block size), not vLLM's own, so stores, sim engines and routing
agree. A block is every layer's slab of one KV-cache block, stacked:
`(layers, *kv_cache[layer][block_id].shape)` in the cache's dtype (on the CPU build,
float32 `(layers, 2, 32, 128)` for the tiny Llama: 64 KiB).

Loading is synchronous, before the forward that needs it. `VllmEngine` asks the stores
which one holds the longest run of the context's blocks and passes that plan in the
request's `kv_transfer_params`; the scheduler side claims those tokens (never the
last one, which must be computed) and the worker reads, verifies and copies them into
the blocks vLLM allocated. A block that fails (missing, lost, corrupt, wrong layout)
is reported through `get_block_ids_with_load_errors` and vLLM recomputes it
(`kv_load_failure_policy="recompute"`): nothing unverified is ever used.

Saving: each step, the full prompt blocks that the step completes and this node's
store does not hold are copied out of the cache after the forward and `ray.put` into
the node's shared memory; the store indexes them in the background. `export` (called
through `FlotillaWorkerExtension.flotilla_export_kv`) saves a running request's
every full block, output included, for a migration.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from actors.engines.vllm_kv_frontend import CONFIG_KEY
from actors.kvstore_block import BlockLayout
from policies.block_hash import extend_block_hashes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from actors.kvstore_client import KVStoreClient

log = logging.getLogger(__name__)

# Saves are fire-and-forget, so a dead store would swallow them unnoticed: a store's
# handle is looked up by name again when older than this (a restarted store is found).
RELOOKUP_S = 1.0
# numpy has no bfloat16: such caches travel as their 16-bit patterns
_NUMPY_VIEW = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.uint16,
               torch.uint8: torch.uint8, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


@dataclass
class _Load:
    request_id: str
    node_id: str  # the store to read from
    block_ids: list[int]
    hashes: list[int]


@dataclass
class FlotillaConnectorMeta(KVConnectorMetadata):
    """What the scheduler side tells the workers for one step."""

    loads: list[_Load] = field(default_factory=list)
    # (request, [(block id, hash)]): prompt blocks to save after this step's forward
    saves: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)
    # (request, first index, block ids, hashes): the blocks this step fills, for `export`
    full: list[tuple[str, int, list[int], list[int]]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests the workers may forget


@dataclass
class FlotillaKVStats(KVConnectorStats):
    """Worker-side transfer counters since the previous step's report (summed over workers)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.data[key] = self.data.get(key, 0) + value


@dataclass
class _Tracked:
    """A request the scheduler side follows: its blocks and their hashes so far."""

    request: Request
    plan: dict[str, Any]
    block_ids: list[int] = field(default_factory=list)
    hashes: tuple[int, ...] = ()
    reported: int = 0  # leading full blocks already sent to the workers
    saved: int = 0  # leading prompt blocks saved or known stored


class FlotillaKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = self._kv_transfer_config.get_from_extra_config(CONFIG_KEY, None)
        if not cfg:
            raise ValueError(f"FlotillaKVConnector needs kv_connector_extra_config[{CONFIG_KEY!r}]")
        self.cfg = cfg
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._tracked: dict[str, _Tracked] = {}
        self._matched: dict[str, int] = {}  # request -> local hit tokens when it was matched
        self._loads: dict[str, tuple[int, int]] = {}  # request -> (first block, blocks) to load
        self._finished: list[str] = []
        # worker side
        self._layers: list[np.ndarray] = []  # each layer's cache as numpy (CPU), or torch (GPU)
        self._tensors: list[torch.Tensor] = []
        self.layout: BlockLayout | None = None
        self._requests: dict[str, tuple[list[int], list[int]]] = {}  # request -> (block ids, hashes) of full blocks
        self._stores: dict[str, tuple[KVStoreClient, float]] = {}  # node -> (client, looked up at)
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()  # requests whose load failed this step
        self._stats = FlotillaKVStats()

    # ================================================================ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        plan = (request.kv_transfer_params or {}).get(CONFIG_KEY) or {}
        self._matched[request.request_id] = num_computed_tokens
        blocks = min(int(plan.get("source_blocks", 0)), (request.num_tokens - 1) // self.block_size)
        return max(0, blocks * self.block_size - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        plan = (request.kv_transfer_params or {}).get(CONFIG_KEY) or {}
        if rid not in self._tracked:
            self._tracked[rid] = _Tracked(request, plan, saved=int(plan.get("local_blocks", 0)))
        if num_external_tokens > 0:
            first = self._matched.get(rid, 0) // self.block_size
            self._loads[rid] = (first, num_external_tokens // self.block_size)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = FlotillaConnectorMeta()
        so = scheduler_output
        for new in so.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._step(tracked, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id], meta)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # after a preemption: its whole (new) block table
                tracked.block_ids, tracked.reported = list(new_ids[0]), 0
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            self._step(tracked, cached.num_computed_tokens[i] + so.num_scheduled_tokens[rid], meta)
        meta.finished, self._finished = self._finished, []
        return meta

    def _step(self, t: _Tracked, computed_after: int, meta: FlotillaConnectorMeta) -> None:
        """Loads due this step, and the blocks the step completes (tracked; saved if prompt)."""
        rid, size = t.request.request_id, self.block_size
        load = self._loads.pop(rid, None)
        if load is not None:
            first, n = load
            t.hashes = self._hashes(t, first + n)
            meta.loads.append(_Load(rid, t.plan["source_node"], t.block_ids[first:first + n],
                                    list(t.hashes[first:first + n])))
        full = min(computed_after // size, len(t.block_ids))
        if full <= t.reported:
            return
        t.hashes = self._hashes(t, full)
        meta.full.append((rid, t.reported, t.block_ids[t.reported:full], list(t.hashes[t.reported:full])))
        prompt_full = min(full, t.request.num_prompt_tokens // size)
        if prompt_full > t.saved:
            meta.saves.append((rid, list(zip(t.block_ids[t.saved:prompt_full], t.hashes[t.saved:prompt_full]))))
        t.reported, t.saved = full, max(t.saved, prompt_full)

    def _hashes(self, t: _Tracked, blocks: int) -> tuple[int, ...]:
        if len(t.hashes) >= blocks:
            return t.hashes
        tokens = t.request.all_token_ids[: blocks * self.block_size]
        return extend_block_hashes(t.hashes, tokens, self.block_size, self.cfg["model_id"])

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._tracked.pop(rid, None)
        self._matched.pop(rid, None)
        self._loads.pop(rid, None)
        self._finished.append(rid)
        return False, None

    # ================================================================ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors = list(kv_caches.values())
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1 or len({t.dtype for t in tensors}) != 1:
            raise ValueError(f"FlotillaKVConnector needs one KV shape and dtype in every layer, got "
                             f"{sorted(shapes)} and {sorted({str(t.dtype) for t in tensors})}")
        view = _NUMPY_VIEW.get(tensors[0].dtype)
        if view is None:
            raise ValueError(f"FlotillaKVConnector cannot move a {tensors[0].dtype} KV cache")
        self._tensors = [t.view(view) for t in tensors]
        if all(t.device.type == "cpu" for t in tensors):
            self._layers = [t.numpy() for t in self._tensors]  # views: no copy
        dtype = str(self._tensors[0].dtype).removeprefix("torch.")
        self.layout = BlockLayout(self.cfg["model_id"], (len(tensors), *shapes.pop()), dtype)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FlotillaConnectorMeta)
        for load in meta.loads:
            self._load(load)

    def _load(self, load: _Load) -> None:
        """Read, verify and place one request's blocks; those that fail are recomputed."""
        began = time.perf_counter()
        blocks: tuple[np.ndarray, ...] = ()
        client = self._store(load.node_id)
        if client is not None:
            from actors.kvstore_client import KVStoreUnavailable

            try:
                fetched = client.fetch(self.layout, load.hashes, verify_checksum=self.cfg["checksum"],
                                       timeout_s=self.cfg["load_timeout_s"])
                blocks = fetched.blocks
                if fetched.refused:
                    log.warning("KV load of %s stopped after %d of %d blocks: %s", load.request_id,
                                len(blocks), len(load.hashes), fetched.refused)
            except KVStoreUnavailable as e:
                self._stores.pop(load.node_id, None)
                log.warning("KV load of %s failed, recomputing: %s", load.request_id, e)
        for block_id, data in zip(load.block_ids, blocks):
            self._write_block(block_id, data)
        if len(blocks) < len(load.block_ids):
            self._load_errors.update(load.block_ids[len(blocks):])
            self._failed_loads.add(load.request_id)
        self._stats.add(loaded_tokens=len(blocks) * self.block_size, loaded_bytes=sum(b.nbytes for b in blocks),
                        failed_blocks=len(load.block_ids) - len(blocks), load_s=time.perf_counter() - began)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in `start_load_kv`, before the forward."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Saves happen once per step in `wait_for_save`, after every layer is written."""

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FlotillaConnectorMeta)
        for rid, first, block_ids, hashes in meta.full:  # from `first` on (0 after a preemption)
            ids, known = self._requests.setdefault(rid, ([], []))
            ids[first:], known[first:] = block_ids, hashes
        for rid in meta.finished:
            self._requests.pop(rid, None)
        # a request whose load failed ran this forward on blocks vLLM will recompute: what
        # it computed after them is wrong too, and must not reach a store
        saves = [pair for rid, pairs in meta.saves if rid not in self._failed_loads for pair in pairs]
        self._failed_loads.clear()
        if saves:
            self._save(saves, wait=False)

    def _save(self, saves: list[tuple[int, int]], wait: bool) -> tuple[int, ...]:
        """Copy blocks out of the cache into this node's store; the hashes stored (when waiting)."""
        client = self._store(self.cfg["node_id"])
        if client is None:
            return ()
        from actors.kvstore_client import KVStoreUnavailable

        began = time.perf_counter()
        blocks = [(h, self._read_block(block_id)) for block_id, h in saves]
        try:
            result = client.put_blocks(self.layout, blocks, with_checksum=self.cfg["checksum"],
                                       wait_s=self.cfg["save_timeout_s"] if wait else None)
        except KVStoreUnavailable as e:
            self._stores.pop(self.cfg["node_id"], None)
            log.warning("KV save failed: %s", e)
            return ()
        self._stats.add(saved_bytes=sum(b.nbytes for _, b in blocks), save_s=time.perf_counter() - began)
        return result.stored if result is not None else ()

    def export(self, request_id: str) -> list[int]:
        """Save every full block of a running request now; the leading hashes stored."""
        key = next((r for r in self._requests if r == request_id or r.rsplit("-", 1)[0] == request_id), None)
        if key is None:
            return []
        block_ids, hashes = self._requests[key]
        stored = set(self._save(list(zip(block_ids, hashes)), wait=True))
        held = 0
        while held < len(hashes) and hashes[held] in stored:
            held += 1
        return hashes[:held]

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, FlotillaKVStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FlotillaKVStats(data=dict(data or {}))

    # ---- bytes ---------------------------------------------------------------------

    def _read_block(self, block_id: int) -> np.ndarray:
        """One block across layers, as a new contiguous array (on GPU: the device-to-host copy)."""
        if self._layers:
            return np.stack([layer[block_id] for layer in self._layers])
        return torch.stack([t[block_id] for t in self._tensors]).cpu().numpy()

    def _write_block(self, block_id: int, data: np.ndarray) -> None:
        if self._layers:
            for layer, slab in zip(self._layers, data):
                layer[block_id] = slab
            return
        host = torch.from_numpy(np.array(data))  # writable for torch, then one host-to-device copy
        for i, t in enumerate(self._tensors):
            t[block_id].copy_(host[i], non_blocking=False)

    def _store(self, node_id: str) -> KVStoreClient | None:
        """The store of `node_id` as its name resolves now (at most `RELOOKUP_S` old)."""
        cached = self._stores.get(node_id)
        if cached is not None and time.monotonic() - cached[1] < RELOOKUP_S:
            return cached[0]
        _connect_ray(self.cfg)
        from actors.kvstore_client import KVStoreClient

        client = KVStoreClient.lookup(node_id, self.cfg["namespace"])
        if client is None:
            self._stores.pop(node_id, None)
        else:
            self._stores[node_id] = (client, time.monotonic())
        return client


class FlotillaWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`) so the front end can ask, through
    `AsyncLLM.collective_rpc("flotilla_export_kv", args=(request_id,))`, for a request's
    blocks to be saved now."""

    def flotilla_export_kv(self, request_id: str) -> list[int]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        if not isinstance(connector, FlotillaKVConnector):
            raise RuntimeError("the KV connector of this worker is not Flotilla's")
        return connector.export(request_id)


def _connect_ray(cfg: dict[str, Any]) -> None:
    """Join the cluster as a driver, once per process. vLLM's processes inherit the
    replica actor's environment, whose job id is the actor's; a driver gets its own."""
    import ray

    if ray.is_initialized():
        return
    os.environ.pop("RAY_JOB_ID", None)
    ray.init(address=cfg["ray_address"], namespace=cfg["namespace"], logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
