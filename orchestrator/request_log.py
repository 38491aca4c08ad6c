"""The ingress's log of finished requests, shipped to the controller in batches.

Cost-aware placement characterises each model's traffic from its finished requests
(`policies.workload`): when each arrived and how long its prompt and output were. The
ingress appends one `FinishedRequest` per request it ends and ships the batch to the
controller about once a second, beside its metric observations (never a call per
request). Losing a batch costs the plan some accuracy, not availability, so shipping
is fire-and-forget and the buffer is bounded (beyond `max_records` the oldest are
dropped and counted).

Units: wall-clock seconds, tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.periodic_flush import PeriodicFlush


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """One request the ingress ended, as the workload characterisation reads it."""

    model: str
    arrival_s: float  # when the ingress accepted it, wall-clock seconds (time.time())
    prompt_tokens: int
    output_tokens: int  # tokens sent to the client (for a refused request: the tokens it asked for)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"FinishedRequest: token counts must not be negative, got "
                             f"{self.prompt_tokens} and {self.output_tokens}")


class RequestLog(PeriodicFlush):
    """Buffers `FinishedRequest`s and hands them to `send` every `interval_s`."""

    def __init__(self, send: Callable[[tuple[FinishedRequest, ...]], None], interval_s: float = 1.0,
                 max_records: int = 50_000):
        if max_records < 1 or not interval_s > 0:
            raise ValueError(f"RequestLog needs max_records >= 1 and interval_s > 0, got "
                             f"{max_records}, {interval_s}")
        super().__init__()
        self.send = send
        self.interval_s = interval_s
        self.dropped = 0  # records lost to the bound since the log was made
        self._records: deque[FinishedRequest] = deque(maxlen=max_records)

    def add(self, record: FinishedRequest) -> None:
        if len(self._records) == self._records.maxlen:
            self.dropped += 1
        self._records.append(record)

    def flush(self) -> int:
        """Ship what is buffered (nothing when empty); returns how many records went."""
        batch = tuple(self._records)
        self._records.clear()
        if batch:
            self.send(batch)
        return len(batch)
