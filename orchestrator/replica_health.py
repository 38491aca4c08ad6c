"""Judging a replica from one poll: fine, suspect, unhealthy, or dead (and why).

Pings are not enough: a replica can answer its stats while its engine makes no
progress (a stuck kernel, a wedged scheduler). So besides unanswered polls, the
watchdog follows each replica's emitted-token counter: requests to serve (running or
queued) and no new token for `recovery.hang_timeout_s` means hung. Per Ray, an actor
call that fails with `ActorUnavailableError` "may or may not have been executed": that
makes a replica suspect (unhealthy, no new requests), not dead, until
`unresponsive_timeout_s` passes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from actors.engines.base import EngineStats
from actors.replica_client import ReplicaUnavailable
from orchestrator.config import RecoveryConfig
from orchestrator.fleet_state import ReplicaRecord
from policies.fleet_view import ReplicaState

MISSED_POLLS_UNHEALTHY = 3  # consecutive unanswered polls before a replica is unhealthy


class Health(enum.Enum):
    FINE = "fine"
    RECOVERED = "recovered"  # was unhealthy, answers again
    SUSPECT = "suspect"  # missed a poll; nothing changes yet
    UNHEALTHY = "unhealthy"  # no new requests until it answers again
    DEAD = "dead"


@dataclass(frozen=True)
class Verdict:
    health: Health
    cause: str = ""  # for DEAD: died, hung, unresponsive
    detail: str = ""


def judge(record: ReplicaRecord, result: EngineStats | BaseException, now: float,
          settings: RecoveryConfig) -> Verdict:
    """What one poll's answer (stats, or the error instead) says of `record`; updates its marks."""
    if isinstance(result, EngineStats):
        record.observe(result, now)
        # queued counts: a frozen engine admits nothing, so what reaches it waits with 0 running
        if result.output_tokens_total != record.progress_mark or result.running + result.waiting == 0:
            record.progress_mark, record.progress_at = result.output_tokens_total, now
        elif now - record.progress_at > settings.hang_timeout_s:
            return Verdict(Health.DEAD, "hung", f"{result.running} running, {result.waiting} waiting, no token "
                                                f"for {now - record.progress_at:.1f}s")
        return Verdict(Health.RECOVERED if record.state is ReplicaState.UNHEALTHY else Health.FINE)
    if isinstance(result, ReplicaUnavailable) and result.dead:
        return Verdict(Health.DEAD, "died", str(result))
    record.missed_polls += 1
    if record.state is ReplicaState.UNHEALTHY and record.unhealthy_since is not None \
            and now - record.unhealthy_since > settings.unresponsive_timeout_s:
        return Verdict(Health.DEAD, "unresponsive", f"no answer for {now - record.unhealthy_since:.1f}s: {result}")
    if record.missed_polls >= MISSED_POLLS_UNHEALTHY and record.state is ReplicaState.READY:
        return Verdict(Health.UNHEALTHY, detail=str(result))
    return Verdict(Health.SUSPECT, detail=str(result))
