"""GPU power telemetry and controls behind one interface (`backend.PowerBackend`):
`NvmlBackend` on real NVIDIA GPUs, `SimPowerBackend` over a simulated replica's
`PowerState`."""

from __future__ import annotations

from actors.power.backend import (
    ActionOutcome,
    PowerBackend,
    PowerBackendUnavailable,
    PowerCapabilities,
    PowerControlError,
    PowerReading,
    PowerReadOnly,
    PowerSettingRefused,
    PowerTelemetryError,
    apply_action,
)
from actors.power.nvml import NvmlBackend
from actors.power.power_state import PowerState
from actors.power.sim import SimPowerBackend

__all__ = [
    "ActionOutcome", "NvmlBackend", "PowerBackend", "PowerBackendUnavailable",
    "PowerCapabilities", "PowerControlError", "PowerReadOnly", "PowerReading",
    "PowerSettingRefused", "PowerState", "PowerTelemetryError", "SimPowerBackend",
    "apply_action",
]
