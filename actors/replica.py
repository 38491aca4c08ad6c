"""`ModelReplica`: the Ray actor that owns one engine and streams its tokens.

Thin on purpose: it builds the engine its spec names, forwards calls to it, and says
where it runs. Decisions (where a request goes, when to move it) are made elsewhere.
Only `actors.replica_client.ReplicaClient` calls it through Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from actors.engines import make_engine
from actors.engines.base import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestSnapshot,
    SamplingSpec,
    TokenDelta,
    UnknownRequest,
)
from actors.kv_checkpoint import CheckpointSettings, KVCheckpointer
from actors.power import (
    ActionOutcome,
    NvmlBackend,
    PowerBackend,
    PowerBackendUnavailable,
    PowerCapabilities,
    PowerReading,
    SimPowerBackend,
    apply_action,
)
from actors.replica_spec import ReplicaSpec
from policies.power_snapshot import PowerAction


@dataclass(frozen=True)
class PrefetchResult:
    """What a migration pre-copy round did on the target."""

    context_tokens: int  # tokens of the context it was asked to hold
    reused_tokens: int  # of those, already in its cache (from earlier rounds or a KV store)
    seconds: float


@dataclass(frozen=True)
class ReplicaInfo:
    """Where a started replica runs and how big its KV cache is."""

    replica_id: str
    node_id: str
    pid: int
    kv_blocks_total: int
    started_at: float  # wall-clock seconds
    load_s: float  # seconds the engine took to start


class ModelReplica:
    """One model replica: one engine (vLLM or simulated) on one GPU (or the CPU)."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.engine = make_engine(spec)
        self._moved: dict[str, str] = {}  # request id -> the replica it was handed off to
        self._prefetches = itertools.count()
        self._info: ReplicaInfo | None = None
        self._starting = asyncio.Lock()
        self._power, self._no_power = _power_backend(spec, self.engine)
        self._checkpointer: KVCheckpointer | None = None

    async def start(self) -> ReplicaInfo:
        """Start the engine once; later calls (a restarted controller re-adopting it) just say where it runs."""
        async with self._starting:
            if self._info is None:
                began = time.time()
                self._attach_kv_store()
                await self.engine.start()
                if self._checkpointer is not None:
                    self._checkpointer.start()
                self._info = ReplicaInfo(
                    replica_id=self.spec.replica_id,
                    node_id=_current_node_id(),
                    pid=os.getpid(),
                    kv_blocks_total=self.engine.stats().kv_blocks_total,
                    started_at=began,
                    load_s=time.time() - began,
                )
        return self._info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Streamed to the caller through a Ray streaming generator, one delta per item.

        A request handed off (`handoff`) ends here with ABORT naming the replica that
        continues it, so the stream's owner resumes it there.
        """
        async for delta in self.engine.generate(request):
            if delta.finish_reason is FinishReason.ABORT and request.request_id in self._moved:
                delta = replace(delta, migrated_to=self._moved.pop(request.request_id))
            yield delta

    async def prefetch(self, request: GenerationRequest) -> PrefetchResult:
        """Migration pre-copy: bring `request`'s context into this engine's prefix cache.

        A one-token warm-up over the context (output discarded) makes the engine load its
        KV (from a store where one holds it) or compute it, so a later resume here only
        computes the few tokens that arrived since. Nothing is sent to any client.
        """
        began = time.monotonic()
        context = request.context_token_ids
        warm = GenerationRequest(
            request_id=f"prefetch-{request.request_id}-{next(self._prefetches)}",
            model=request.model,
            prompt_token_ids=context,
            sampling=SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True),
            priority=request.priority,
            slo_class=request.slo_class,
        )
        reused = 0
        async for delta in self.engine.generate(warm):
            reused = max(reused, delta.num_cached_tokens)
        return PrefetchResult(len(context), reused, time.monotonic() - began)

    async def handoff(self, request_id: str, target_replica_id: str) -> RequestSnapshot:
        """Migration switch: stop the request here; its stream ends naming `target_replica_id`.

        Raises UnknownRequest when the request is no longer here (it finished, or its
        client left), in which case nothing is handed off.
        """
        snapshot = self.engine.snapshot(request_id)
        self._moved[request_id] = target_replica_id
        if not await self.engine.abort(request_id):
            self._moved.pop(request_id, None)
            raise UnknownRequest(request_id)
        return snapshot

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def export_kv(self, request_id: str) -> tuple[int, ...]:
        """Save the request's full KV blocks to this node's KV-cache store now; the hashes
        held there after (see `Engine.export_kv`)."""
        return await self.engine.export_kv(request_id)

    def _attach_kv_store(self) -> None:
        """Reach the fleet's KV-cache stores when the controller's settings say it has some."""
        from actors.kv_link import KVLink, KVLinkSettings

        settings = KVLinkSettings.from_env()
        if settings is not None:
            self.engine.attach_kv_store(KVLink(settings, _current_node_id()))
            self._checkpointer = KVCheckpointer(
                CheckpointSettings(settings.checkpoint_interval_s, settings.checkpoint_min_new_tokens),
                requests=lambda: self.engine.stats().requests, export=self.engine.export_kv)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def snapshot(self, request_id: str) -> RequestSnapshot:
        return self.engine.snapshot(request_id)

    async def pause(self) -> None:
        """Freeze the engine (requests stay, nothing progresses): what a hang looks like, for drills."""
        await self.engine.pause()

    async def resume(self) -> None:
        await self.engine.resume()

    def power(self) -> tuple[PowerReading, ...]:
        """Each of its GPUs' draw, limit and clock now; () when it has no GPU power to read.
        Raises `PowerTelemetryError` when a GPU cannot be read (a partial answer would
        understate the replica's draw)."""
        if self._power is None:
            return ()
        return tuple(self._power.read(gpu) for gpu in self._power.gpus())

    def power_capabilities(self) -> PowerCapabilities:
        """What the power controller may do to its GPUs (read-only without the privilege)."""
        if self._power is None:
            return PowerCapabilities(True, False, False, self._no_power)
        return self._power.capabilities()

    def apply_power(self, action: PowerAction) -> ActionOutcome:
        """Carry out one power action on every GPU of the replica, all or nothing."""
        if self._power is None:
            return ActionOutcome(action, False, f"no power controls: {self._no_power}")
        return apply_action(self._power, self._power.gpus(), action)

    async def shutdown(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.stop()
        await self.engine.shutdown()
        if self._power is not None:
            self._power.close()


def _power_backend(spec: ReplicaSpec, engine) -> tuple[PowerBackend | None, str]:
    """The replica's power telemetry and controls, or None and why there are none: a sim
    engine's simulated GPUs; NVML on the GPUs Ray gave this actor when the fleet's power
    backend is "nvml"; nothing for an engine on the CPU."""
    if spec.engine == "sim":
        return SimPowerBackend(engine.power), ""
    if spec.power_backend != "nvml":
        return None, f"{spec.engine} engine without the nvml power backend (power.backend)"
    import ray

    gpus = [int(i) for i in ray.get_gpu_ids()]
    if not gpus:
        return None, "no GPU assigned to this replica"
    try:
        return NvmlBackend(gpus), ""
    except PowerBackendUnavailable as e:
        return None, str(e)


def _current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
