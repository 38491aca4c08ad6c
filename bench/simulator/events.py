"""The discrete-event engine: a virtual clock and a heap of timed actions.

Order is total and deterministic: by time, then by `Priority` (inputs from outside a
replica land before the replicas step at the same instant, so requests arriving at the
time a step ends join the next step, as in the live engine), then first scheduled
first. The clock never runs backwards; scheduling in the past is a bug and raises.
Times are virtual seconds from the start of the simulation.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable


class Priority(enum.IntEnum):
    """Which of several events at the same instant goes first (lower first)."""

    FAULT = 0  # the world changes: replicas and nodes die, power events land
    CONTROL = 1  # the control loop observes and acts
    ARRIVAL = 2  # requests arrive or are retried
    REPLICA = 3  # replicas start their next steps, seeing everything above


class Event:
    """One scheduled action; `cancel()` makes the loop skip it."""

    __slots__ = ("action", "cancelled", "time")

    def __init__(self, time: float, action: Callable[[], None]):
        self.time = time
        self.action = action
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Runs actions in virtual time. `now` is the time of the event being handled."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handled = 0  # events run (cancelled ones are not counted)
        self._heap: list[tuple[float, int, int, Event]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        """Events waiting, cancelled ones included until they reach the top."""
        return len(self._heap)

    def at(self, time: float, action: Callable[[], None], priority: Priority) -> Event:
        """Run `action` at virtual `time` (seconds, not before `now`)."""
        if not time >= self.now:  # also refuses NaN
            raise ValueError(f"cannot schedule at {time!r}: the clock reads {self.now}")
        event = Event(time, action)
        heapq.heappush(self._heap, (time, int(priority), next(self._order), event))
        return event

    def after(self, delay_s: float, action: Callable[[], None], priority: Priority) -> Event:
        return self.at(self.now + delay_s, action, priority)

    def run(self, until: float = float("inf")) -> int:
        """Handle events in order until none is left or the next is after `until`;
        returns how many ran. The clock ends at the last event handled (or `until`,
        when events remain beyond it)."""
        heap, ran = self._heap, 0
        while heap and heap[0][0] <= until:
            time, _, _, event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self.now = time
            event.action()
            ran += 1
        if heap and until != float("inf"):
            self.now = max(self.now, until)
        self.handled += ran
        return ran
