"""Lazy, asynchronous checkpoints of long requests' KV to the node's KV-cache store.

A replica that dies takes its KV cache with it; the ingress then resumes each of its
requests elsewhere from the tokens it has sent, and the new replica loads whatever
prefix of that context a store holds and recomputes the rest. Prompt blocks reach the
stores as they are computed; output blocks do not. So every `interval_s` the
replica's `KVCheckpointer` saves the full blocks of each running request whose
context grew by at least `min_new_tokens` since its last checkpoint (after
DataStates-LLM's lazy checkpointing): generation never waits for it, a resume
recomputes at most what one interval produced, and a request that never grows long
enough costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from actors.engines.base import EngineError, RequestStatus, UnknownRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSettings:
    """Seconds between checkpoint rounds (0: never); tokens a request must add to be saved again."""

    interval_s: float = 10.0
    min_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ValueError(f"interval_s must not be negative, got {self.interval_s}")
        if self.min_new_tokens < 1:
            raise ValueError(f"min_new_tokens must be at least 1, got {self.min_new_tokens}")


def due(requests: Iterable[RequestStatus], saved: dict[str, int], min_new_tokens: int) -> list[str]:
    """The running requests whose context (prompt + output tokens) grew by `min_new_tokens`
    since it was last saved (`saved`: request id -> context tokens then), longest growth first."""
    growth = {r.request_id: r.prompt_tokens + r.output_tokens - saved.get(r.request_id, 0)
              for r in requests if r.running}
    return sorted((rid for rid, grown in growth.items() if grown >= min_new_tokens), key=lambda rid: -growth[rid])


class KVCheckpointer:
    """Runs the checkpoint rounds of one replica. `requests()` is the engine's view of its
    requests (`EngineStats.requests`); `export(request_id)` saves that request's full
    blocks to the node's store (`Engine.export_kv`)."""

    def __init__(self, settings: CheckpointSettings, requests: Callable[[], Iterable[RequestStatus]],
                 export: Callable[[str], Awaitable[tuple[int, ...]]]):
        self.settings = settings
        self._requests, self._export = requests, export
        self._saved: dict[str, int] = {}
        self.checkpoints = 0  # requests saved, over the replica's life
        self.failures = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.settings.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def round(self) -> int:
        """One round: save every request that is due; how many were saved."""
        requests = {r.request_id: r for r in self._requests()}
        self._saved = {rid: n for rid, n in self._saved.items() if rid in requests}  # ended: forget
        saved = 0
        for rid in due(requests.values(), self._saved, self.settings.min_new_tokens):
            context = requests[rid].prompt_tokens + requests[rid].output_tokens
            try:
                await self._export(rid)
            except UnknownRequest:
                continue  # it ended meanwhile
            except EngineError as e:  # a full or unreachable store: the request only loses its checkpoint
                self.failures += 1
                log.warning("checkpoint of %s failed: %s", rid, e)
                continue
            self._saved[rid] = context
            saved += 1
        self.checkpoints += saved
        return saved

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.round()
            except Exception:  # noqa: BLE001 — a bad round must not end checkpointing for the replica's life
                log.exception("checkpoint round failed")
