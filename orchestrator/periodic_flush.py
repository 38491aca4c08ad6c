"""`PeriodicFlush`: a data-path buffer that ships itself to the controller every `interval_s`.

The ingress batches what it tells the controller (metric observations, finished
requests) instead of calling it per request. A subclass buffers and implements
`flush()`; this base runs it from the event loop. A batch that fails to ship is logged
and lost, never a reason to stop shipping the next ones.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)


class PeriodicFlush(ABC):
    interval_s: float  # seconds between flushes

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    @abstractmethod
    def flush(self) -> int:
        """Ship what is buffered; how many items went."""

    def start(self) -> None:
        """Flush every `interval_s` from the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 — a lost batch must not stop the next ones
                log.exception("%s: could not ship a batch to the controller", type(self).__name__)
