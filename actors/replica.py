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
from typing import Any

from actors.engines import make_engine
from actors.engines.base import (
    EngineError,
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
from actors.resume_ahead import ResumeAhead
from policies.power_snapshot import PowerAction

# Longest a migration's switch waits for the request's next token before stopping it anyway
# (seconds): a decode step is milliseconds; a long prefill step sharing the batch may not be.
SWITCH_WAIT_S = 1.0


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
        # request id -> the handoff waiting for its next token (see `handoff`)
        self._switch_after_token: dict[str, asyncio.Future[RequestSnapshot]] = {}
        self._resume_on: dict[str, Any] = {}  # request id -> the target told at the switch (a ReplicaClient)
        self._ahead = ResumeAhead(self.engine.abort)  # handed-off requests started here before asked for
        self._serving: set[str] = set()  # request ids with a `generate` stream open here
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
        rid = request.request_id
        self._serving.add(rid)
        try:
            deltas = await self._ahead.claim(request) or self.engine.generate(request)
            async for delta in deltas:
                if delta.token_ids and not delta.finished and rid in self._switch_after_token:
                    await self._stop_for_handoff(rid, self._switch_after_token.pop(rid))
                if delta.finish_reason is FinishReason.ABORT and rid in self._moved:
                    delta = replace(delta, migrated_to=self._moved.pop(rid))
                yield delta
        finally:
            self._serving.discard(rid)
            waiting = self._switch_after_token.pop(rid, None)
            if waiting is not None and not waiting.done():  # it ended here first: nothing to hand off
                waiting.set_exception(UnknownRequest(rid))

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

    async def handoff(self, request_id: str, target_replica_id: str, target: Any = None) -> RequestSnapshot:
        """Migration switch: stop the request here; its stream ends naming `target_replica_id`.

        A decoding request is stopped right after its next token (within `SWITCH_WAIT_S`):
        the client's stall then starts at a token it has, rather than part-way through a
        step whose token would be thrown away. A queued one is stopped at once. With
        `target` (the target's `ReplicaClient`), the target is told to start the request
        as it stopped (`resume_ahead`) while the stream's owner learns of the switch.
        Returns the request as it stood when stopped. Raises UnknownRequest when the
        request is no longer here (it finished, or its client left), in which case nothing
        is handed off.
        """
        snapshot = self.engine.snapshot(request_id)
        self._moved[request_id] = target_replica_id
        if target is not None:
            self._resume_on[request_id] = target
        try:
            if snapshot.request.output_token_ids and request_id not in self._switch_after_token:
                switched = asyncio.get_running_loop().create_future()
                self._switch_after_token[request_id] = switched
                try:
                    return await asyncio.wait_for(asyncio.shield(switched), SWITCH_WAIT_S)
                except TimeoutError:  # no token in time (preempted, paused): stop it where it is
                    if self._switch_after_token.pop(request_id, None) is None:
                        return await switched  # the token came as the wait ran out
            snapshot = self.engine.snapshot(request_id)
            if not await self.engine.abort(request_id):
                raise UnknownRequest(request_id)
            self._tell_target(snapshot)
            return snapshot
        except UnknownRequest:
            self._moved.pop(request_id, None)
            raise
        finally:
            self._resume_on.pop(request_id, None)

    async def _stop_for_handoff(self, request_id: str, switched: asyncio.Future[RequestSnapshot]) -> None:
        """Stop a request handed off, just after the token its stream now carries."""
        try:
            snapshot = self.engine.snapshot(request_id)
            if not await self.engine.abort(request_id):
                raise UnknownRequest(request_id)
        except Exception as e:  # the handoff's caller hears of it; the stream goes on as the engine says
            switched.set_exception(e)
        else:
            self._tell_target(snapshot)
            switched.set_result(snapshot)

    def _tell_target(self, snapshot: RequestSnapshot) -> None:
        """Fire and forget: the target starts the stopped request now (see `resume_ahead`)."""
        target = self._resume_on.pop(snapshot.request.request_id, None)
        if target is not None:
            target.resume_ahead(snapshot.request)

    async def resume_ahead(self, request: GenerationRequest) -> None:
        """Migration switch, target side: start `request`, just handed off to this replica,
        before its stream's owner asks; the owner's `generate` for it takes the stream over
        (`actors.resume_ahead`). Called by the source. Does nothing when the owner asked
        already or the engine refuses it (the owner's own call meets the same answer)."""
        rid = request.request_id
        if rid in self._serving or rid in self._ahead:
            return
        try:
            deltas = self.engine.generate(request)
        except EngineError:
            return
        self._ahead.start(request, deltas)

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
        await self._ahead.close()
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
