"""The event engine: total order (time, priority, scheduling order), cancellation, the
clock's accounting, and determinism."""

from __future__ import annotations

import pytest

from bench.simulator.events import EventLoop, Priority


def test_events_run_by_time_then_priority_then_scheduling_order():
    loop, seen = EventLoop(), []
    for name, t, p in (("replica@1", 1.0, Priority.REPLICA), ("arrival@1", 1.0, Priority.ARRIVAL),
                       ("fault@2", 2.0, Priority.FAULT), ("arrival@0.5", 0.5, Priority.ARRIVAL),
                       ("second arrival@1", 1.0, Priority.ARRIVAL), ("control@1", 1.0, Priority.CONTROL)):
        loop.at(t, lambda n=name: seen.append((n, loop.now)), p)
    assert loop.run() == 6
    assert seen == [("arrival@0.5", 0.5), ("control@1", 1.0), ("arrival@1", 1.0),
                    ("second arrival@1", 1.0), ("replica@1", 1.0), ("fault@2", 2.0)]


def test_actions_schedule_more_and_the_clock_follows_events():
    loop, ticks = EventLoop(), []

    def tick():
        ticks.append(loop.now)
        if loop.now < 2.0:
            loop.after(0.5, tick, Priority.CONTROL)

    loop.at(0.0, tick, Priority.CONTROL)
    loop.run()
    assert ticks == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert loop.now == 2.0 and loop.handled == 5 and len(loop) == 0


def test_cancelled_events_are_skipped_and_not_counted():
    loop, seen = EventLoop(), []
    keep = loop.at(1.0, lambda: seen.append("keep"), Priority.ARRIVAL)
    drop = loop.at(0.5, lambda: seen.append("drop"), Priority.ARRIVAL)
    drop.cancel()
    assert loop.run() == 1 and seen == ["keep"] and not keep.cancelled


def test_run_until_stops_before_later_events_and_resumes_them():
    loop, seen = EventLoop(), []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, lambda t=t: seen.append(t), Priority.ARRIVAL)
    assert loop.run(until=2.5) == 2
    assert seen == [1.0, 2.0] and loop.now == 2.5
    loop.run()
    assert seen == [1.0, 2.0, 3.0] and loop.handled == 3


@pytest.mark.parametrize("when", [0.5, float("nan")])
def test_scheduling_in_the_past_is_refused(when):
    loop = EventLoop()
    loop.at(1.0, lambda: None, Priority.ARRIVAL)
    loop.run()
    with pytest.raises(ValueError, match="cannot schedule"):
        loop.at(when, lambda: None, Priority.ARRIVAL)


def test_the_same_schedule_runs_the_same_way_twice():
    def trace():
        loop, seen = EventLoop(), []
        for i in range(50):
            loop.at((i * 7919 % 13) / 4, lambda i=i: seen.append(i), Priority(i % 4))
        loop.run()
        return seen

    assert trace() == trace()
