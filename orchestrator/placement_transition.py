"""One move of the live fleet to a new GPU mix, as the placement manager carries it out.

The order keeps every request served: first every pool that grows is raised to its
target and the transition waits until the replicas of the models it touches are READY
(`SCALING_OUT`); then the replicas to remove are drained (`DRAINING`): they take no new
requests, their requests move off by live migration or finish where they are, and they
stop once empty. The transition is `DONE` when every drained replica has stopped. It is
`ABANDONED` when the new replicas do not come up in time, or someone else changes the
pools' sizes meanwhile; nothing has been drained then, so no capacity was lost (a change
made for cost gives back the replicas it added; one made for missing capacity keeps them).

Times are wall-clock seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from orchestrator.fleet_state import InvalidTransition
from policies.replanning import Transition


class TransitionState(Enum):
    SCALING_OUT = "scaling_out"
    DRAINING = "draining"
    DONE = "done"
    ABANDONED = "abandoned"

    @property
    def terminal(self) -> bool:
        return self in (TransitionState.DONE, TransitionState.ABANDONED)


@dataclass
class PlacementTransition:
    transition_id: str
    trigger: str  # "cost" (a cheaper mix), "capacity" (the fleet lacked it) or "operator" (an apply)
    reason: str  # the decision's
    started_at: float
    steps: Transition
    before: Mapping[str, int]  # pool -> desired replicas before the transition
    urgent: bool = False  # the fleet lacked capacity: abandoning keeps the replicas it added
    prefer_drain: tuple[str, ...] = ()  # replicas whose removal empties nodes (the packing's choice)
    state: TransitionState = TransitionState.SCALING_OUT
    drained: list[str] = field(default_factory=list)
    draining_at: float | None = None
    ended_at: float | None = None
    detail: str = ""

    @property
    def target(self) -> dict[str, int]:
        """Desired replicas per pool once it is carried out (pools it does not touch: as before)."""
        out = dict(self.before)
        out.update({c.pool: c.target for c in self.steps.scale_out + self.steps.drain})
        return out

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(c.pool for c in self.steps.scale_out + self.steps.drain)

    def _move(self, to: TransitionState, *allowed_from: TransitionState) -> None:
        if self.state not in allowed_from:
            raise InvalidTransition(f"placement transition {self.transition_id}: "
                                    f"{self.state.value} -> {to.value} not allowed")
        self.state = to

    def mark_draining(self, now: float, drained: list[str]) -> None:
        self._move(TransitionState.DRAINING, TransitionState.SCALING_OUT)
        self.draining_at, self.drained = now, list(drained)

    def finish(self, now: float) -> None:
        self._move(TransitionState.DONE, TransitionState.DRAINING)
        self.ended_at = now

    def abandon(self, now: float, why: str) -> None:
        self._move(TransitionState.ABANDONED, TransitionState.SCALING_OUT)
        self.ended_at, self.detail = now, why
