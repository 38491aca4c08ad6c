"""Backoff and circuit breaker for pools that keep failing: a table over literal timelines."""

import pytest

from policies.restart_backoff import BackoffSettings, PoolRestarts, after_failure, circuit_open, launch_gate

S = BackoffSettings(base_s=1, max_s=8, window_s=100, circuit_failures=4, cooldown_s=50)


def failures_at(*times: float) -> PoolRestarts:
    state = PoolRestarts()
    for t in times:
        state = after_failure(state, t, S)
    return state


def test_a_healthy_pool_starts_at_once():
    assert launch_gate(PoolRestarts(), 0.0).allowed


@pytest.mark.parametrize(("times", "now", "allowed", "retry_at"), [
    ((10,), 10.5, False, 11),          # 1st failure: 1 s
    ((10,), 11.0, True, None),
    ((10, 12), 13.0, False, 14),       # 2nd: 2 s
    ((10, 12, 20), 23.9, False, 24),   # 3rd: 4 s
    ((10, 200), 201.0, True, None),    # the first fell out of the window: 1 s again
])
def test_delays_double_per_failure_in_the_window(times, now, allowed, retry_at):
    gate = launch_gate(failures_at(*times), now)
    assert gate.allowed is allowed and gate.retry_at == retry_at


def test_the_delay_is_capped():
    state = PoolRestarts()
    for t in range(3):
        state = after_failure(state, float(t), BackoffSettings(base_s=1, max_s=3, circuit_failures=99))
    assert state.next_start_at == 2 + 3  # 4 s capped to 3


def test_the_circuit_opens_at_the_threshold_and_closes_after_the_cooldown():
    state = failures_at(0, 1, 2, 3)
    assert circuit_open(state, 10) and not launch_gate(state, 10).allowed
    assert "circuit open after 4 failures" in launch_gate(state, 10).reason
    assert launch_gate(state, 53).allowed and not circuit_open(state, 53)
