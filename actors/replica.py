"""`ModelReplica`: the Ray actor that owns one engine and streams its tokens.

Thin on purpose: it builds the engine its spec names, forwards calls to it, and says
where it runs. Decisions (where a request goes, when to move it) are made elsewhere.
Only `actors.replica_client.ReplicaClient` calls it through Ray.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from actors.engines import make_engine
from actors.engines.base import EngineStats, GenerationRequest, RequestSnapshot, TokenDelta
from actors.replica_spec import ReplicaSpec


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

    async def start(self) -> ReplicaInfo:
        began = time.time()
        await self.engine.start()
        return ReplicaInfo(
            replica_id=self.spec.replica_id,
            node_id=_current_node_id(),
            pid=os.getpid(),
            kv_blocks_total=self.engine.stats().kv_blocks_total,
            started_at=began,
            load_s=time.time() - began,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Streamed to the caller through a Ray streaming generator, one delta per item."""
        async for delta in self.engine.generate(request):
            yield delta

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def snapshot(self, request_id: str) -> RequestSnapshot:
        return self.engine.snapshot(request_id)

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def _current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
