"""Every fault the controller detects, with its cause, what it touched and when it was mended.

A fault is recorded once, when detected; `recovered` stamps it when what replaced the
failed part is ready (a new replica, a restarted agent or store). The admin API lists
them (`GET /admin/v1/faults`) and `flotilla_faults_total{component,cause}` counts them.
With a `store` (the controller's GCS key-value store) the log is saved on every change
and `restore` takes it back, so a restarted controller still lists what its former self
saw — faults come seconds apart at worst, and the log holds at most `history` records.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from orchestrator.durable_state import KeyValue
from orchestrator.metrics import MetricsRegistry

log = logging.getLogger(__name__)

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
    store: KeyValue | None = None
    KEY = "faults"

    def restore(self) -> None:
        """Take back the records a former controller saved (before any new one is reported)."""
        raw = self.store.get(self.KEY) if self.store is not None else None
        if raw:
            saved = [FaultRecord(**{**r, "affected_requests": tuple(r["affected_requests"])}) for r in json.loads(raw)]
            self.records.extendleft(reversed(saved[-self.history:]))

    def report(self, component: str, target: str, cause: str, detail: str = "",
               affected: tuple[str, ...] = ()) -> FaultRecord:
        assert component in COMPONENTS, component
        record = FaultRecord(uuid.uuid4().hex[:12], component, target, cause, detail, self.clock(), affected)
        self.records.append(record)
        while len(self.records) > self.history:
            self.records.popleft()
        self.metrics["flotilla_faults_total"].labels(component, cause).inc()
        self._save()
        return record

    def recovered(self, component: str, target: str, replaced_by: str | None = None) -> None:
        """Stamp the open faults of `target` as mended now."""
        now = self.clock()
        mended = [r for r in self.records
                  if r.component == component and r.target == target and r.recovered_at is None]
        for record in mended:
            record.recovered_at, record.replaced_by = now, replaced_by
            self.metrics["flotilla_fault_recovery_seconds"].labels(component).observe(now - record.detected_at)
        if mended:
            self._save()

    def open_for_pool(self, pool: str) -> list[FaultRecord]:
        """Replica faults in `pool` not yet mended (replica ids start with the pool's name)."""
        return [r for r in self.records if r.component == "replica" and r.recovered_at is None
                and r.target.rsplit("-", 1)[0] == pool]

    def _save(self) -> None:
        if self.store is None:
            return
        try:
            self.store.put(self.KEY, json.dumps([asdict(r) for r in self.records]).encode())
        except Exception as e:  # noqa: BLE001 — an unreachable GCS costs history, never the control loop
            log.warning("could not save the fault log: %s", e)
