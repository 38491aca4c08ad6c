"""The controller's window of recent finished requests, per model, for placement.

The ingresses ship `FinishedRequest`s in batches; the window keeps each served model's
records of the last `window_s` seconds (by arrival) and no more than `max_per_model` of
them, so memory stays bounded however busy the fleet is. A request is recorded when it
finishes, so a window lags its arrivals by about one request's duration.

Rates are only as good as the span the window really covers: right after the
controller starts it has seen less than a window, and a model whose records overflow
`max_per_model` keeps only its latest ones. `observed_s` says how many seconds of
arrivals the records cover, and `profile` characterises over that span.

Units: wall-clock seconds, tokens, requests per second.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from orchestrator.request_log import FinishedRequest
from policies.workload import BucketScheme, RequestRecord, WorkloadProfile, characterise

_MIN_SPAN_S = 1.0  # rates over a shorter span are noise


class WorkloadWindow:
    def __init__(self, models: Iterable[str], started_at: float, max_per_model: int = 100_000):
        if max_per_model < 1:
            raise ValueError(f"max_per_model must be >= 1, got {max_per_model}")
        self.started_at = started_at  # when collection began, wall-clock seconds
        self.max_per_model = max_per_model
        self.ignored = 0  # records of models this fleet does not serve
        self._records: dict[str, deque[RequestRecord]] = {m: deque(maxlen=max_per_model) for m in models}
        self._evicted_upto: dict[str, float] = {}  # model -> latest arrival dropped by the bound

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._records)

    def add(self, records: Iterable[FinishedRequest], now: float, window_s: float) -> None:
        """Keep the records of served models; forget those older than `window_s`."""
        for r in records:
            held = self._records.get(r.model)
            if held is None:
                self.ignored += 1
                continue
            if len(held) == held.maxlen:
                self._evicted_upto[r.model] = max(self._evicted_upto.get(r.model, -math.inf),
                                                  held[0].arrival_s)
            held.append(RequestRecord(r.arrival_s, r.prompt_tokens, r.output_tokens))
        self.prune(now, window_s)

    def prune(self, now: float, window_s: float) -> None:
        """Drop records that arrived before the window. Records come roughly in arrival
        order (a batch per second, each request when it ends), so this pops from the
        left until the first recent one; `characterise` filters the rest exactly."""
        horizon = now - window_s
        for held in self._records.values():
            while held and held[0].arrival_s <= horizon:
                held.popleft()

    def records(self, model: str) -> tuple[RequestRecord, ...]:
        return tuple(self._records.get(model, ()))

    def observed_s(self, model: str, now: float, window_s: float) -> float:
        """Seconds of the last `window_s` that the records of `model` cover."""
        since = max(self.started_at, self._evicted_upto.get(model, -math.inf), now - window_s)
        return max(0.0, now - since)

    def profile(self, model: str, now: float, window_s: float, scheme: BucketScheme) -> WorkloadProfile:
        """The model's rates per bucket over the span the window covers (at least 1 s)."""
        span = max(self.observed_s(model, now, window_s), _MIN_SPAN_S)
        return characterise(self.records(model), now=now, window_s=span, scheme=scheme, model=model)
