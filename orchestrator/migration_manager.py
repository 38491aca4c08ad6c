"""Carries out live migrations: the controller decides (policy or operator), this moves.

For each migration, a background task runs the pre-copy rounds on the target while the
source keeps decoding, then the switch (see `migration_record`). Moves are point to
point between two replicas: no collective group, so any number run at once within the
bounds (`migration.max_per_replica`, `migration.max_concurrent`, and the KV bytes in
flight against `migration.bandwidth_bytes_per_s`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable

from actors.engines.base import EngineError, EngineOverloaded, UnknownRequest
from actors.replica_client import ReplicaUnavailable
from orchestrator.config import FleetConfig
from orchestrator.errors import Conflict, Invalid, NotFound, OperationError
from orchestrator.fleet_state import FleetState, ReplicaRecord
from orchestrator.metrics import MetricsRegistry
from orchestrator.migration_record import AbortReason, MigrationRecord, MigrationState, PrefetchRound
from policies.fleet_view import FleetView, ReplicaState, RequestStatus
from policies.migration import InFlightMigration, MigrationPlan, plan_migrations

log = logging.getLogger(__name__)


class MigrationManager:
    def __init__(self, config: FleetConfig, state: FleetState, handles: Callable[[str], object],
                 metrics: MetricsRegistry, clock: Callable[[], float], history: int = 200):
        self.config = config
        self.state = state
        self.handles = handles  # replica id -> its handle (ReplicaClient in production)
        self.metrics = metrics
        self.clock = clock
        self.active: dict[str, MigrationRecord] = {}  # request id -> its migration in flight
        self.recent: deque[MigrationRecord] = deque(maxlen=history)
        self._tasks: set[asyncio.Task] = set()

    # starting ---------------------------------------------------------------------------

    def start(self, request_id: str, target: str | None, reason: str) -> MigrationRecord:
        """Validate and launch one migration; NotFound / Conflict / Invalid name the problem."""
        source, request = self._locate(request_id)
        if request_id in self.active:
            raise Conflict(f"request {request_id} is already migrating", code="already_migrating")
        if request.remaining_tokens < self.config.migration.min_remaining_tokens:
            raise Conflict(f"request {request_id} is finishing ({request.remaining_tokens} tokens left)",
                           code="request_finishing")
        dest = self._target(source, target)
        self._check_bounds(source.replica_id, dest.replica_id, queued=not request.running)
        record = MigrationRecord(
            migration_id=uuid.uuid4().hex[:12], request_id=request_id, source=source.replica_id,
            target=dest.replica_id, reason=reason, created_at=self.clock(), queued=not request.running,
            est_bytes=0 if not request.running else
            (request.prompt_tokens + request.output_tokens) * source.spec.arch.kv_bytes_per_token,
        )
        self.active[request_id] = record
        task = asyncio.get_running_loop().create_task(self._run(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    def _locate(self, request_id: str) -> tuple[ReplicaRecord, RequestStatus]:
        for replica in self.state.live():
            for request in (replica.stats.requests if replica.stats else ()):
                if request.request_id == request_id:
                    return replica, request
        raise NotFound(f"no request {request_id!r} in flight")

    def _target(self, source: ReplicaRecord, target: str | None) -> ReplicaRecord:
        candidates = [r for r in self.state.live() if r.state is ReplicaState.READY
                      and r.spec.model == source.spec.model and r.replica_id != source.replica_id]
        if target is not None:
            chosen = self.state.get(target)
            if chosen is None or chosen.state.terminal:
                raise NotFound(f"no live replica {target!r}")
            if chosen not in candidates:
                raise Invalid(f"replica {target} cannot take it: it must be ready, serve {source.spec.model} "
                              f"and not be the source", code="bad_target")
            return chosen
        if not candidates:
            raise Conflict(f"no other ready replica serves {source.spec.model}", code="no_target")
        return min(candidates, key=lambda r: (r.stats.kv_usage if r.stats else 0.0,
                                              r.stats.waiting if r.stats else 0, r.replica_id))

    def _check_bounds(self, source: str, target: str, queued: bool) -> None:
        """KV copies are bounded; re-dispatching a queued request copies nothing and is not."""
        if queued:
            return
        cfg = self.config.migration
        copies = [m for m in self.active.values() if not m.queued]
        if len(copies) >= cfg.max_concurrent:
            raise Conflict(f"{len(copies)} migrations already in flight (max {cfg.max_concurrent})",
                           code="too_many_migrations")
        for replica in (source, target):
            n = sum(replica in (m.source, m.target) for m in copies)
            if n >= cfg.max_per_replica:
                raise Conflict(f"replica {replica} already has {n} migrations (max {cfg.max_per_replica})",
                               code="too_many_migrations")

    def plan(self, view: FleetView) -> MigrationPlan:
        """What the policy would move now, given the fleet view and the migrations in flight."""
        in_flight = [InFlightMigration(m.request_id, m.source, m.target, m.est_bytes, running=not m.queued)
                     for m in self.active.values()]
        kv_bytes = {m.name: m.transformer_spec().kv_bytes_per_token for m in self.config.models}
        settings = self.config.migration.policy_settings(self.config.slo_classes)
        return plan_migrations(view, in_flight, now=self.clock(), settings=settings, kv_bytes_per_token=kv_bytes)

    def carry_out(self, plan: MigrationPlan) -> int:
        """Start the plan's moves; one the fleet has changed under since the view is skipped."""
        started = 0
        for decision in plan.decisions:
            try:
                self.start(decision.request_id, decision.target, reason=decision.reason.value)
                started += 1
            except OperationError as e:
                log.info("planned %s migration of %s skipped: %s", decision.reason.value, decision.request_id, e)
        return started

    # running ----------------------------------------------------------------------------

    async def _run(self, m: MigrationRecord) -> None:
        source, target = self.handles(m.source), self.handles(m.target)
        try:
            await asyncio.wait_for(self._move(m, source, target), self.config.migration.timeout_s)
            if m.state is MigrationState.SWITCHING:
                m.finish(self.clock())
        except UnknownRequest:
            self._abort(m, AbortReason.REQUEST_ENDED)
        except EngineOverloaded as e:
            self._abort(m, AbortReason.TARGET_FULL, str(e))
        except ReplicaUnavailable as e:
            reason = AbortReason.SOURCE_FAILED if e.replica_id == m.source else AbortReason.TARGET_FAILED
            self._abort(m, reason, str(e))
        except (TimeoutError, EngineError) as e:
            self._abort(m, AbortReason.TIMEOUT if isinstance(e, TimeoutError) else AbortReason.TARGET_FAILED,
                        str(e))
        finally:
            self.active.pop(m.request_id, None)
            self.recent.append(m)
            self.metrics["flotilla_migrations_total"].labels(m.reason, m.outcome).inc()
            if m.state is MigrationState.DONE:
                self.metrics["flotilla_migration_bytes_total"].inc(m.est_bytes)

    async def _move(self, m: MigrationRecord, source, target) -> None:
        """Pre-copy rounds (`migration.precopy_rounds`, each warming the target with the
        context so far) until few tokens are uncovered, then the switch. With 0 rounds the
        switch comes at once and the target recomputes the whole context while the client
        waits: the naive move, kept as an option to measure pre-copy against."""
        cfg = self.config.migration
        if not m.queued:
            for _ in range(cfg.precopy_rounds):
                snapshot = await source.snapshot(m.request_id)
                result = await target.prefetch(snapshot.request)
                m.rounds.append(PrefetchRound(result.context_tokens, result.reused_tokens, result.seconds))
                now = await source.snapshot(m.request_id)
                if len(now.request.context_token_ids) - result.context_tokens <= cfg.switch_below_tokens:
                    break
        if self._target_lost(m.target):
            self._abort(m, AbortReason.TARGET_NOT_READY)
            return
        m.switch(self.clock())
        await source.handoff(m.request_id, m.target, target)

    def _target_lost(self, target: str) -> bool:
        record = self.state.get(target)
        return record is None or record.state is not ReplicaState.READY

    def _abort(self, m: MigrationRecord, reason: AbortReason, detail: str = "") -> None:
        if not m.state.terminal:
            log.info("migration %s of %s aborted: %s %s", m.migration_id, m.request_id, reason.value, detail)
            m.abort(self.clock(), reason, detail)

    async def stop_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
