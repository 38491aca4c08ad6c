"""When to start a replacement replica in a pool that keeps failing: backoff and a circuit breaker.

Pure: a frozen `PoolRestarts` state per pool, advanced by `after_failure` and read by
`launch_gate`, with the time passed in. Failures are replica deaths, hangs and failed
starts of the pool (a node's death is not the pool's fault and is not counted). The
k-th failure within `window_s` delays the next start by `base_s × 2^(k-1)`, capped at
`max_s`; at `circuit_failures` within the window the circuit opens and nothing starts
for `cooldown_s`, so a pool with a bad image or driver stops burning the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffSettings:
    base_s: float = 1.0
    max_s: float = 60.0
    window_s: float = 120.0
    circuit_failures: int = 5
    cooldown_s: float = 300.0


@dataclass(frozen=True)
class PoolRestarts:
    failures: tuple[float, ...] = ()  # times of failures inside the window, oldest first
    next_start_at: float = 0.0  # no replacement starts before this
    open_until: float | None = None  # circuit open: no replacement until then


@dataclass(frozen=True)
class LaunchGate:
    allowed: bool
    reason: str  # why not, when not allowed
    retry_at: float | None = None


def after_failure(state: PoolRestarts, now: float, settings: BackoffSettings) -> PoolRestarts:
    failures = tuple(t for t in state.failures if now - t < settings.window_s) + (now,)
    delay = min(settings.max_s, settings.base_s * 2 ** (len(failures) - 1))
    opened = now + settings.cooldown_s if len(failures) >= settings.circuit_failures else state.open_until
    return PoolRestarts(failures, now + delay, opened)


def launch_gate(state: PoolRestarts, now: float) -> LaunchGate:
    if state.open_until is not None and now < state.open_until:
        return LaunchGate(False, f"circuit open after {len(state.failures)} failures", state.open_until)
    if now < state.next_start_at:
        return LaunchGate(False, f"backing off after {len(state.failures)} failures", state.next_start_at)
    return LaunchGate(True, "")


def circuit_open(state: PoolRestarts, now: float) -> bool:
    return state.open_until is not None and now < state.open_until
