"""`ReplicaClient`: the only code that calls a `ModelReplica` through Ray.

It turns Ray's failure modes into two of ours, so callers never catch Ray types:
- `ReplicaUnavailable`: the actor is dead, unreachable or too slow to answer. Per Ray,
  an `ActorUnavailableError` means the call "may or may not have been executed", so
  `maybe_executed` says whether the caller must treat the call as suspect.
- `EngineError` (and its subclasses): the engine refused the call; re-raised as is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.engines.base import EngineError, EngineStats, GenerationRequest, RequestSnapshot, TokenDelta
from actors.power import ActionOutcome, PowerCapabilities, PowerReading
from actors.replica import ModelReplica, PrefetchResult, ReplicaInfo
from actors.replica_spec import ReplicaSpec, replica_actor_name
from policies.power_snapshot import PowerAction


class ReplicaUnavailable(RuntimeError):
    """A replica could not be reached; it may be dead (`dead`) or only suspect."""

    def __init__(self, replica_id: str, reason: str, *, dead: bool, maybe_executed: bool = True):
        super().__init__(f"replica {replica_id} unavailable: {reason}")
        self.replica_id = replica_id
        self.dead = dead
        self.maybe_executed = maybe_executed


@dataclass(frozen=True)
class ReplicaPlacement:
    """The Ray resources a replica asks for; this is how it lands on a GPU type."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # environment variables of the replica's process
    label_selector: tuple[tuple[str, str], ...] = ()  # Ray node labels, e.g. ("ray.io/node-id", "!in(a,b)")


class ReplicaClient:
    def __init__(self, replica_id: str, handle: Any):
        self.replica_id = replica_id
        self._handle = handle

    @classmethod
    def create(cls, spec: ReplicaSpec, namespace: str, placement: ReplicaPlacement) -> ReplicaClient:
        """Create the actor (it starts loading when `start()` is called)."""
        actor_cls = ray.remote(ModelReplica)
        handle = actor_cls.options(
            name=spec.actor_name,
            namespace=namespace,
            lifetime="detached",
            num_cpus=placement.num_cpus,
            num_gpus=placement.num_gpus,
            resources=dict(placement.resources),
            runtime_env={"env_vars": dict(placement.env)} if placement.env else None,
            label_selector=dict(placement.label_selector) or None,
            # a pool's replicas on as many nodes as can take them: one node's death costs fewer
            scheduling_strategy="SPREAD",
            max_restarts=0,  # the controller replaces dead replicas, with backoff
            max_concurrency=10_000,
        ).remote(spec)
        return cls(spec.replica_id, handle)

    @classmethod
    def lookup(cls, replica_id: str, namespace: str) -> ReplicaClient:
        """Attach to a running replica by id; raises ReplicaUnavailable if there is none."""
        try:
            return cls(replica_id, ray.get_actor(replica_actor_name(replica_id), namespace=namespace))
        except ValueError:
            raise ReplicaUnavailable(replica_id, "no such actor", dead=True, maybe_executed=False) from None

    async def start(self, timeout_s: float) -> ReplicaInfo:
        return await self._call(self._handle.start.remote(), timeout_s)

    async def stats(self, timeout_s: float) -> EngineStats:
        return await self._call(self._handle.stats.remote(), timeout_s)

    async def snapshot(self, request_id: str, timeout_s: float = 5.0) -> RequestSnapshot:
        return await self._call(self._handle.snapshot.remote(request_id), timeout_s)

    async def abort(self, request_id: str, timeout_s: float = 5.0) -> bool:
        return await self._call(self._handle.abort.remote(request_id), timeout_s)

    async def prefetch(self, request: GenerationRequest, timeout_s: float = 120.0) -> PrefetchResult:
        return await self._call(self._handle.prefetch.remote(request), timeout_s)

    async def handoff(self, request_id: str, target_replica_id: str, target: ReplicaClient | None = None,
                      timeout_s: float = 5.0) -> RequestSnapshot:
        """Stop the request at a token and end its stream naming the target; with `target`
        (its client), the source also starts it there directly (`ModelReplica.resume_ahead`)."""
        return await self._call(self._handle.handoff.remote(request_id, target_replica_id, target), timeout_s)

    def resume_ahead(self, request: GenerationRequest) -> None:
        """Fire and forget (a source replica's call at a migration's switch): if it is lost,
        the stream's owner starts the request on this replica itself."""
        ref = self._handle.resume_ahead.remote(request)
        # read the outcome when it lands, so a dead target is not reported as an unhandled error
        ref.future().add_done_callback(lambda done: done.exception())

    async def pause(self, timeout_s: float = 10.0) -> None:
        await self._call(self._handle.pause.remote(), timeout_s)

    async def resume(self, timeout_s: float = 10.0) -> None:
        await self._call(self._handle.resume.remote(), timeout_s)

    async def power(self, timeout_s: float) -> tuple[PowerReading, ...]:
        return await self._call(self._handle.power.remote(), timeout_s)

    async def power_capabilities(self, timeout_s: float = 5.0) -> PowerCapabilities:
        return await self._call(self._handle.power_capabilities.remote(), timeout_s)

    async def apply_power(self, action: PowerAction, timeout_s: float) -> ActionOutcome:
        return await self._call(self._handle.apply_power.remote(action), timeout_s)

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        await self._call(self._handle.shutdown.remote(), timeout_s)

    def kill(self) -> None:
        """Kill the actor at once (no graceful shutdown)."""
        try:
            ray.kill(self._handle, no_restart=True)
        except (RayActorError, ValueError):
            pass  # already gone: the goal is reached

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas. Closing the iterator early cancels it on the replica."""
        stream = self._handle.generate.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in stream:
                delta: TokenDelta = await self._resolve(ref)
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self._cancel(stream, request.request_id)

    def _cancel(self, stream: Any, request_id: str) -> None:
        # Fire and forget: this runs while the caller is being cancelled, where awaiting is unsafe.
        # Cancelling the stream stops the replica's generator; the abort frees KV even if the
        # cancel raced with the stream's start.
        try:
            ray.cancel(stream)
        except (RayActorError, ValueError):
            pass  # the stream already ended
        self._handle.abort.remote(request_id)

    async def _resolve(self, ref: Any) -> Any:
        try:
            return await ref
        except RayTaskError as e:
            raise self._translate(e) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise self._translate(e) from None

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(self._resolve(ref), timeout_s)
        except (TimeoutError, GetTimeoutError):
            raise ReplicaUnavailable(self.replica_id, f"no answer within {timeout_s:g}s", dead=False) from None

    def _translate(self, error: Exception) -> Exception:
        cause = getattr(error, "cause", None)
        if isinstance(cause, EngineError):
            return cause
        if isinstance(error, ActorUnavailableError):
            return ReplicaUnavailable(self.replica_id, str(error).splitlines()[0], dead=False)
        if isinstance(error, (ActorDiedError, RayActorError)):
            return ReplicaUnavailable(self.replica_id, str(error).splitlines()[0], dead=True)
        return error
