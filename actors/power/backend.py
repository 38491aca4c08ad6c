"""One interface over a node's GPU power telemetry and controls, and the typed errors of
its backends (`NvmlBackend` on real GPUs, `SimPowerBackend` for simulated ones).

GPUs are named by their index on the node (NVML's index, the one `nvidia-smi` and Ray's
GPU ids use). Units: watts, MHz, seconds (wall clock of the reading's host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from policies.power_snapshot import PowerAction, PowerOp


@dataclass(frozen=True)
class PowerReading:
    """One GPU's power state at `observed_at`."""

    gpu: int
    name: str  # the device's name, e.g. "NVIDIA H100 80GB HBM3"
    draw_w: float  # average draw over the device's sampling window
    limit_w: float  # the power limit enforced now
    default_limit_w: float
    limit_range_w: tuple[float, float]  # (min, max) power limit the device accepts
    sm_clock_mhz: float  # current SM clock
    clock_range_mhz: tuple[float, float]  # (min, max) SM clock it can be locked to
    locked_clock_mhz: float | None  # the lock this backend applied (NVML cannot read it back)
    observed_at: float

    @property
    def headroom_w(self) -> float:
        """Watts the GPU may still draw before its limit bites."""
        return self.limit_w - self.draw_w


@dataclass(frozen=True)
class PowerCapabilities:
    """What a backend may do on this node; `reason` says why something is missing."""

    read_only: bool
    can_set_power_limit: bool
    can_lock_clocks: bool
    reason: str = ""


class PowerControlError(RuntimeError):
    """A power call on `gpu` failed. `restored` says whether the GPU was left (or put back)
    as it was before the call; `code` is the NVML error code where there is one."""

    def __init__(self, gpu: int, op: str, message: str, *, code: int | None = None,
                 restored: bool = True):
        super().__init__(f"GPU {gpu}: {op} failed: {message}"
                         + ("" if restored else " (the GPU may be left changed)"))
        self.gpu, self.op, self.code, self.restored = gpu, op, code, restored


class PowerReadOnly(PowerControlError):
    """The process may read power but not change it (no privilege), so nothing was done."""


class PowerSettingRefused(PowerControlError, ValueError):
    """The requested limit or clock is outside what the GPU supports; nothing was called."""


class PowerTelemetryError(RuntimeError):
    """A power reading failed."""

    def __init__(self, gpu: int, message: str, *, code: int | None = None):
        super().__init__(f"GPU {gpu}: reading power failed: {message}")
        self.gpu, self.code = gpu, code


class PowerBackendUnavailable(RuntimeError):
    """The backend cannot start here (no driver, no NVML library, no such GPU)."""


@runtime_checkable
class PowerBackend(Protocol):
    """Power telemetry and controls of some GPUs. Write calls either take effect or raise
    a `PowerControlError` with the GPU as it was (`restored`), never half-done silently."""

    def gpus(self) -> tuple[int, ...]:
        """The GPU indices this backend reads and controls."""

    def capabilities(self) -> PowerCapabilities:
        """What this process may do (read-only without the privilege)."""

    def read(self, gpu: int) -> PowerReading:
        """The GPU's draw, limit and clock now; raises `PowerTelemetryError`."""

    def set_power_limit(self, gpu: int, watts: float) -> None:
        """Limit the GPU's board power to `watts`."""

    def restore_power_limit(self, gpu: int) -> None:
        """Put the GPU's power limit back to its default."""

    def lock_clocks(self, gpu: int, mhz: float) -> None:
        """Keep the GPU's SM clock at or below `mhz`."""

    def unlock_clocks(self, gpu: int) -> None:
        """Let the SM clock float again."""

    def close(self) -> None:
        """Release the backend (NVML's handle); it is unusable afterwards."""


@dataclass(frozen=True)
class ActionOutcome:
    """How one `PowerAction` went on one replica's GPUs."""

    action: PowerAction
    ok: bool
    error: str = ""  # why not, when not ok
    restored: bool = True  # every GPU is as before the action when not ok


def apply_action(backend: PowerBackend, gpus: tuple[int, ...], action: PowerAction) -> ActionOutcome:
    """Apply `action` to every GPU in `gpus`, all or nothing: when one GPU fails, those
    already changed are put back, and the outcome reports the first failure. A GPU whose
    state cannot be read first is still acted on (a cap for a replica without telemetry
    is exactly the fail-safe), but cannot be put back."""
    before = {gpu: _read_or_none(backend, gpu) for gpu in gpus}
    done: list[int] = []
    try:
        for gpu in gpus:
            _call(backend, gpu, action)
            done.append(gpu)
    except PowerControlError as exc:
        restored = exc.restored and all([before[g] is not None and _undo(backend, before[g], action.op)
                                         for g in reversed(done)])
        return ActionOutcome(action, False, str(exc), restored)
    return ActionOutcome(action, True)


def _read_or_none(backend: PowerBackend, gpu: int) -> PowerReading | None:
    try:
        return backend.read(gpu)
    except PowerTelemetryError:
        return None


def _call(backend: PowerBackend, gpu: int, action: PowerAction) -> None:
    if action.op is PowerOp.SET_POWER_LIMIT:
        backend.set_power_limit(gpu, action.value)
    elif action.op is PowerOp.RESTORE_POWER_LIMIT:
        backend.restore_power_limit(gpu)
    elif action.op is PowerOp.LOCK_CLOCKS:
        backend.lock_clocks(gpu, action.value)
    else:
        backend.unlock_clocks(gpu)


def _undo(backend: PowerBackend, before: PowerReading, op: PowerOp) -> bool:
    """Put back what `op` changed on one GPU, as `before` read it; False if that failed."""
    try:
        if op in (PowerOp.SET_POWER_LIMIT, PowerOp.RESTORE_POWER_LIMIT):
            backend.set_power_limit(before.gpu, before.limit_w)
        elif before.locked_clock_mhz is None:
            backend.unlock_clocks(before.gpu)
        else:
            backend.lock_clocks(before.gpu, before.locked_clock_mhz)
    except PowerControlError:
        return False
    return True
