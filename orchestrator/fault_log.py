"""Every fault the controller detects, with its cause, what it touched and when it was mended.

A fault is recorded once, when detected; `recovered` stamps it when what replaced the
failed part is ready (a new replica, a restarted agent or store). The admin API lists
them (`GET /admin/v1/faults`) and `flotilla_faults_total{component,cause}` counts them.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.metrics import MetricsRegistry

COMPONENTS = ("replica", "node", "kvstore", "router", "controller")


@dataclass
class FaultRecord:
    fault_id: str
    component: str  # one of COMPONENTS
    target: str  # the replica, node, store or agent id
    cause: str  # died, hung, unresponsive, failed_to_start, restarted, injected_*
    detail: str
    detected_at: float  # wall-clock seconds
    affected_requests: tuple[str, ...] = ()
    recovered_at: float | None = None
    replaced_by: str | None = None

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.detected_at


@dataclass
class FaultLog:
    metrics: MetricsRegistry
    clock: Callable[[], float]
    history: int = 500
    records: deque[FaultRecord] = field(default_factory=deque)

    def report(self, component: str, target: str, cause: str, detail: str = "",
               affected: tuple[str, ...] = ()) -> FaultRecord:
        assert component in COMPONENTS, component
        record = FaultRecord(uuid.uuid4().hex[:12], component, target, cause, detail, self.clock(), affected)
        self.records.append(record)
        while len(self.records) > self.history:
            self.records.popleft()
        self.metrics["flotilla_faults_total"].labels(component, cause).inc()
        return record

    def recovered(self, component: str, target: str, replaced_by: str | None = None) -> None:
        """Stamp the open faults of `target` as mended now."""
        now = self.clock()
        for record in self.records:
            if record.component == component and record.target == target and record.recovered_at is None:
                record.recovered_at, record.replaced_by = now, replaced_by
                self.metrics["flotilla_fault_recovery_seconds"].labels(component).observe(now - record.detected_at)

    def open_for_pool(self, pool: str) -> list[FaultRecord]:
        """Replica faults in `pool` not yet mended (replica ids start with the pool's name)."""
        return [r for r in self.records if r.component == "replica" and r.recovered_at is None
                and r.target.rsplit("-", 1)[0] == pool]
