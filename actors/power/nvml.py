"""`NvmlBackend`: GPU power telemetry and controls through NVML (`pynvml`, from the
`nvidia-ml-py` package).

Reading power needs nothing special; setting power limits and locking clocks needs root
or CAP_SYS_ADMIN in the container (on Kubernetes: a privileged container or that
capability, see the chart's notes). At start the backend writes each GPU's current
power limit back to it, a change of nothing: when NVML answers NO_PERMISSION the backend
runs read-only and says why, instead of failing on the first cap in an emergency.

A failed write leaves the GPU as it was: the previous limit is read before each
`set_power_limit` and written back if the device changed anyway; a failed clock lock
re-applies the lock this backend had set (NVML cannot read locks back, so a GPU it had
not locked is left alone). Either way the failure is raised as a `PowerControlError`.
NVML's units are milliwatts; this interface's are watts.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from actors.power.backend import (
    PowerBackendUnavailable,
    PowerCapabilities,
    PowerControlError,
    PowerReading,
    PowerReadOnly,
    PowerSettingRefused,
    PowerTelemetryError,
)

_PRIVILEGE_HINT = ("setting power limits and clocks needs root or CAP_SYS_ADMIN (on "
                   "Kubernetes a privileged container or that capability); reading power "
                   "does not, so the backend runs read-only")


@dataclass(frozen=True)
class _Device:
    handle: Any
    name: str
    default_limit_w: float
    limit_range_w: tuple[float, float]
    clock_range_mhz: tuple[float, float]
    clocks_lockable: bool


class NvmlBackend:
    """Power of the node's GPUs `gpus` (default: all) through NVML. `nvml` is the pynvml
    module (a fake in tests); `clock` stamps readings (wall-clock seconds)."""

    def __init__(self, gpus: Sequence[int] | None = None, *, nvml: Any = None,
                 clock: Callable[[], float] = time.time, probe: bool = True):
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        self._clock = clock
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise PowerBackendUnavailable(f"NVML could not start: {exc} (is the NVIDIA driver "
                                          "installed and the GPU visible here?)") from None
        try:
            count = self._nvml.nvmlDeviceGetCount()
            indices = list(range(count)) if gpus is None else list(gpus)
            missing = [i for i in indices if not 0 <= i < count]
            if missing:
                raise PowerBackendUnavailable(f"no GPU with index {missing} (this node has {count})")
            self._devices = {i: self._describe(i) for i in indices}
        except (self._nvml.NVMLError, PowerBackendUnavailable) as exc:
            self._nvml.nvmlShutdown()
            raise PowerBackendUnavailable(f"NVML: {exc}") from None
        self._locks: dict[int, float] = {}
        self._read_only_reason = self._probe() if probe else ""
        lockable = all(d.clocks_lockable for d in self._devices.values())
        self._clocks_reason = "" if lockable else "the GPU lists no lockable clocks"
        self._closed = False

    def _describe(self, index: int) -> _Device:
        n = self._nvml
        handle = n.nvmlDeviceGetHandleByIndex(index)
        name = n.nvmlDeviceGetName(handle)
        lo, hi = n.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        default = n.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        max_clock = n.nvmlDeviceGetMaxClockInfo(handle, n.NVML_CLOCK_SM)
        try:
            memory = max(n.nvmlDeviceGetSupportedMemoryClocks(handle))
            min_clock, lockable = min(n.nvmlDeviceGetSupportedGraphicsClocks(handle, memory)), True
        except n.NVMLError:
            min_clock, lockable = max_clock, False
        return _Device(handle, name.decode() if isinstance(name, bytes) else str(name),
                       default / 1000, (lo / 1000, hi / 1000), (float(min_clock), float(max_clock)),
                       lockable)

    def _probe(self) -> str:
        """Write each GPU's own limit back to it; the reason it is refused, or ""."""
        n = self._nvml
        for device in self._devices.values():
            try:
                current = n.nvmlDeviceGetPowerManagementLimit(device.handle)
                n.nvmlDeviceSetPowerManagementLimit(device.handle, current)
            except n.NVMLError as exc:
                if exc.value == n.NVML_ERROR_NO_PERMISSION:
                    return f"NVML refused a power-limit write ({exc}): {_PRIVILEGE_HINT}"
                if exc.value == n.NVML_ERROR_NOT_SUPPORTED:
                    return f"{device.name} does not support power limits ({exc}): read-only"
                raise PowerBackendUnavailable(f"NVML power-limit probe failed: {exc}") from None
        return ""

    # -- PowerBackend ------------------------------------------------------------------

    def gpus(self) -> tuple[int, ...]:
        return tuple(self._devices)

    def capabilities(self) -> PowerCapabilities:
        read_only = bool(self._read_only_reason)
        return PowerCapabilities(read_only, not read_only,
                                 not read_only and not self._clocks_reason,
                                 self._read_only_reason or self._clocks_reason)

    def read(self, gpu: int) -> PowerReading:
        n, device = self._nvml, self._device(gpu)
        try:
            draw = n.nvmlDeviceGetPowerUsage(device.handle) / 1000
            limit = n.nvmlDeviceGetEnforcedPowerLimit(device.handle) / 1000
            clock = float(n.nvmlDeviceGetClockInfo(device.handle, n.NVML_CLOCK_SM))
        except n.NVMLError as exc:
            raise PowerTelemetryError(gpu, str(exc), code=exc.value) from None
        return PowerReading(gpu, device.name, draw, limit, device.default_limit_w,
                            device.limit_range_w, clock, device.clock_range_mhz,
                            self._locks.get(gpu), self._clock())

    def set_power_limit(self, gpu: int, watts: float) -> None:
        device = self._writable(gpu, "set_power_limit")
        lo, hi = device.limit_range_w
        if not lo <= watts <= hi:
            raise PowerSettingRefused(gpu, "set_power_limit", f"{watts:g} W is outside "
                                      f"{device.name}'s supported range {lo:g}-{hi:g} W")
        self._write_limit(gpu, device, round(watts * 1000), "set_power_limit")

    def restore_power_limit(self, gpu: int) -> None:
        device = self._writable(gpu, "restore_power_limit")
        self._write_limit(gpu, device, round(device.default_limit_w * 1000), "restore_power_limit")

    def lock_clocks(self, gpu: int, mhz: float) -> None:
        device = self._writable(gpu, "lock_clocks")
        lo, hi = device.clock_range_mhz
        if not device.clocks_lockable:
            raise PowerSettingRefused(gpu, "lock_clocks", f"{device.name} lists no lockable clocks")
        if not lo <= mhz <= hi:
            raise PowerSettingRefused(gpu, "lock_clocks", f"{mhz:g} MHz is outside "
                                      f"{device.name}'s clock range {lo:g}-{hi:g} MHz")
        n = self._nvml
        try:
            # a ceiling, not a pin: an idle GPU may still drop below it
            n.nvmlDeviceSetGpuLockedClocks(device.handle, int(lo), int(mhz))
        except n.NVMLError as exc:
            if exc.value == n.NVML_ERROR_NOT_SUPPORTED:
                self._clocks_reason = f"{device.name} does not support clock locks ({exc})"
            restored = self._relock(device, gpu)
            raise self._failure(exc, gpu, "lock_clocks", restored) from None
        self._locks[gpu] = float(mhz)

    def unlock_clocks(self, gpu: int) -> None:
        device, n = self._writable(gpu, "unlock_clocks"), self._nvml
        try:
            n.nvmlDeviceResetGpuLockedClocks(device.handle)
        except n.NVMLError as exc:
            raise self._failure(exc, gpu, "unlock_clocks", True) from None
        self._locks.pop(gpu, None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _device(self, gpu: int) -> _Device:
        if self._closed:
            raise PowerBackendUnavailable("NvmlBackend is closed")
        try:
            return self._devices[gpu]
        except KeyError:
            raise PowerBackendUnavailable(f"GPU {gpu} is not one of this backend's "
                                          f"{sorted(self._devices)}") from None

    def _writable(self, gpu: int, op: str) -> _Device:
        device = self._device(gpu)
        if self._read_only_reason:
            raise PowerReadOnly(gpu, op, self._read_only_reason)
        return device

    def _write_limit(self, gpu: int, device: _Device, milliwatts: int, op: str) -> None:
        n = self._nvml
        try:
            before = n.nvmlDeviceGetPowerManagementLimit(device.handle)
        except n.NVMLError as exc:
            raise self._failure(exc, gpu, op, True) from None
        try:
            n.nvmlDeviceSetPowerManagementLimit(device.handle, milliwatts)
        except n.NVMLError as exc:
            raise self._failure(exc, gpu, op, self._put_back_limit(device, before)) from None

    def _put_back_limit(self, device: _Device, before: int) -> bool:
        """After a failed write: the limit as it was, written back if it moved anyway."""
        n = self._nvml
        try:
            if n.nvmlDeviceGetPowerManagementLimit(device.handle) != before:
                n.nvmlDeviceSetPowerManagementLimit(device.handle, before)
            return n.nvmlDeviceGetPowerManagementLimit(device.handle) == before
        except n.NVMLError:
            return False

    def _relock(self, device: _Device, gpu: int) -> bool:
        """After a failed lock: re-apply this backend's previous lock, if it had one."""
        if gpu not in self._locks:
            return True
        n = self._nvml
        try:
            n.nvmlDeviceSetGpuLockedClocks(device.handle, int(device.clock_range_mhz[0]),
                                           int(self._locks[gpu]))
        except n.NVMLError:
            return False
        return True

    def _failure(self, exc: Any, gpu: int, op: str, restored: bool) -> PowerControlError:
        """The typed error of a failed write; NO_PERMISSION turns the backend read-only."""
        if exc.value == self._nvml.NVML_ERROR_NO_PERMISSION:
            self._read_only_reason = f"NVML refused {op} ({exc}): {_PRIVILEGE_HINT}"
            return PowerReadOnly(gpu, op, self._read_only_reason, code=exc.value,
                                 restored=restored)
        return PowerControlError(gpu, op, str(exc), code=exc.value, restored=restored)
