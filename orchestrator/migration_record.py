"""One live migration's lifecycle: stages, timings and, when it stops early, why.

PREFETCHING (the target warms its cache with the request's context while the source
keeps decoding, repeated for what arrived meanwhile) → SWITCHING (the source stops the
request; its stream names the target, where the ingress resumes it) → DONE. Any
failure before the switch ABORTS the migration and the request simply stays on the
source. Each transition is one method that checks where it starts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MigrationState(str, enum.Enum):
    PREFETCHING = "prefetching"
    SWITCHING = "switching"
    DONE = "done"  # terminal
    ABORTED = "aborted"  # terminal

    @property
    def terminal(self) -> bool:
        return self in (MigrationState.DONE, MigrationState.ABORTED)


class AbortReason(str, enum.Enum):
    REQUEST_ENDED = "request_ended"  # it finished on the source, or its client left
    SOURCE_FAILED = "source_failed"  # the source died or stopped answering (recovery takes over)
    TARGET_FAILED = "target_failed"  # the target died or stopped answering: only time was lost
    TARGET_FULL = "target_full"  # the target refused the warm-up
    TARGET_NOT_READY = "target_not_ready"  # it was drained, or left, before the switch
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class PrefetchRound:
    context_tokens: int
    reused_tokens: int  # already on the target: only the rest was loaded or computed
    seconds: float


@dataclass
class MigrationRecord:
    migration_id: str
    request_id: str
    source: str
    target: str
    reason: str  # why it was started: manual, drain, balance, ...
    created_at: float  # wall-clock seconds
    queued: bool  # not yet decoding when it started: moved by re-dispatch, no pre-copy
    est_bytes: int  # KV bytes the move would carry
    state: MigrationState = MigrationState.PREFETCHING
    rounds: list[PrefetchRound] = field(default_factory=list)
    switched_at: float | None = None
    ended_at: float | None = None
    abort_reason: AbortReason | None = None
    detail: str = ""

    def _move(self, to: MigrationState, *allowed_from: MigrationState) -> None:
        if self.state not in allowed_from:
            raise RuntimeError(f"migration {self.migration_id}: {self.state.value} -> {to.value} not allowed")
        self.state = to

    def switch(self, now: float) -> None:
        self._move(MigrationState.SWITCHING, MigrationState.PREFETCHING)
        self.switched_at = now

    def finish(self, now: float) -> None:
        self._move(MigrationState.DONE, MigrationState.SWITCHING)
        self.ended_at = now

    def abort(self, now: float, reason: AbortReason, detail: str = "") -> None:
        self._move(MigrationState.ABORTED, MigrationState.PREFETCHING, MigrationState.SWITCHING)
        self.ended_at, self.abort_reason, self.detail = now, reason, detail

    @property
    def outcome(self) -> str:
        """For metrics: "done", or the abort reason, or "in_flight"."""
        if self.state is MigrationState.DONE:
            return "done"
        return self.abort_reason.value if self.abort_reason else "in_flight"
