"""A migrated request started on its target before the stream's owner asks for it.

At a migration's switch the source stops the request right after a token (see
`ModelReplica.handoff`); the ingress, told so by the source's stream, then asks the
target to resume it. That round trip (source, ingress, target) would add to the stall
the client sees. So the source also tells the target directly (`ModelReplica.
resume_ahead`): the target starts the request at once and buffers its deltas here, and
the ingress's `generate` for that same request takes the buffered stream over (`claim`).

It costs time, never a token: a claim for other tokens than the ones started (the
ingress had fewer) stops the early start and the claimer starts afresh; a start nobody
claims within `ttl_s` (the client left, the ingress died) is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from actors.engines.base import GenerationRequest, TokenDelta

_END = object()


class _Started:
    """One early start: its engine stream pumped into a queue until it is claimed."""

    def __init__(self, request: GenerationRequest, deltas: AsyncIterator[TokenDelta],
                 abort: Callable[[str], Awaitable[bool]], ttl_s: float, expire: Callable[[], None]) -> None:
        self.request = request
        self._abort = abort
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pump = asyncio.create_task(self._run(deltas), name=f"resume-ahead-{request.request_id}")
        self._expiry = asyncio.get_running_loop().call_later(ttl_s, expire)

    async def _run(self, deltas: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in deltas:
                self._queue.put_nowait(delta)
        except Exception as e:  # noqa: BLE001 - the claimer raises it, as the engine's own stream would
            self._queue.put_nowait(e)
        finally:
            self._queue.put_nowait(_END)

    async def follow(self) -> AsyncIterator[TokenDelta]:
        """The deltas buffered so far, then the rest as they come."""
        self._expiry.cancel()
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            await self.stop()  # the claimer left early: the engine's stream closes and frees the KV

    async def stop(self) -> None:
        """Stop the engine's stream and the request (if it still runs), and wait until both have."""
        self._expiry.cancel()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        # a stream cancelled before its first step never ran its own clean-up: abort by id
        await self._abort(self.request.request_id)


class ResumeAhead:
    """The early starts of one replica, by request id."""

    def __init__(self, abort: Callable[[str], Awaitable[bool]], ttl_s: float = 10.0) -> None:
        self._abort = abort  # the engine's: stops a request by id, False if it is not there
        self.ttl_s = ttl_s
        self._started: dict[str, _Started] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._started

    def start(self, request: GenerationRequest, deltas: AsyncIterator[TokenDelta]) -> None:
        """Pump `deltas`, the engine's stream of `request` just opened, until claimed or expired."""
        rid = request.request_id
        if rid in self._started:
            raise ValueError(f"request {rid} is already started ahead")
        self._started[rid] = _Started(request, deltas, self._abort, self.ttl_s, lambda: self._expire(rid))

    async def claim(self, request: GenerationRequest) -> AsyncIterator[TokenDelta] | None:
        """The stream started for exactly `request` (same id and tokens), or None: nothing
        was started, or it was for other tokens, and that start is stopped first."""
        started = self._started.pop(request.request_id, None)
        if started is None:
            return None
        if started.request != request:
            await started.stop()
            return None
        return started.follow()

    async def close(self) -> None:
        for started in list(self._started.values()):
            await started.stop()
        self._started.clear()

    def _expire(self, request_id: str) -> None:
        started = self._started.pop(request_id, None)
        if started is not None:
            asyncio.get_running_loop().create_task(started.stop())
