"""A fake of the `pynvml` module for tests without a GPU: the same function names and
constants (a test checks them against the real module), devices held in memory, every
call recorded in order, and failures injected per function.

Units as NVML's: milliwatts, MHz.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    """As pynvml's: `value` is the NVML return code."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
                NVML_ERROR_NOT_SUPPORTED: "Not Supported",
                NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded"}.get(self.value,
                                                                       f"NVML error {self.value}")


@dataclass
class FakeDevice:
    """One GPU; defaults are an H100 SXM's."""

    name: str = "NVIDIA H100 80GB HBM3"
    power_mw: int = 312_000
    limit_mw: int = 700_000
    default_limit_mw: int = 700_000
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    sm_clock: int = 1980
    max_sm_clock: int = 1980
    memory_clocks: tuple[int, ...] = (2619,)
    graphics_clocks: tuple[int, ...] = (1980, 1755, 1410, 990, 345)
    locked: tuple[int, int] | None = None


@dataclass
class FakeNvml:
    """Stands in for the `pynvml` module. `failures` maps a function name to the NVML
    error code its calls raise (only the next call's when the name is in `once`);
    `apply_then_fail` names set functions that change the device before raising (a
    driver that half-did the job)."""

    devices: list[FakeDevice] = field(default_factory=lambda: [FakeDevice(), FakeDevice()])
    failures: dict[str, int] = field(default_factory=dict)
    once: set[str] = field(default_factory=set)
    apply_then_fail: set[str] = field(default_factory=set)
    calls: list[tuple] = field(default_factory=list)
    initialised: bool = False

    NVMLError = NVMLError
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED

    def _enter(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name in self.failures and name not in self.apply_then_fail:
            self._fail(name)

    def _leave(self, name: str) -> None:
        if name in self.failures and name in self.apply_then_fail:
            self._fail(name)

    def _fail(self, name: str) -> None:
        code = self.failures[name]
        if name in self.once:
            del self.failures[name]
        raise NVMLError(code)

    def names(self) -> list[str]:
        """The functions called, in order."""
        return [c[0] for c in self.calls]

    def mark(self) -> None:
        """Remember where the call log stands, for `since_mark`."""
        self._mark = len(self.calls)

    def since_mark(self) -> list[tuple]:
        return self.calls[getattr(self, "_mark", 0):]

    # -- the pynvml functions NvmlBackend uses -----------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        self._enter("nvmlDeviceGetName", self._index(handle))
        return handle.name

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerUsage", self._index(handle))
        return handle.power_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerManagementLimit", self._index(handle))
        return handle.limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeDevice) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit", self._index(handle))
        return handle.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerManagementDefaultLimit", self._index(handle))
        return handle.default_limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeDevice) -> list[int]:
        self._enter("nvmlDeviceGetPowerManagementLimitConstraints", self._index(handle))
        return [handle.min_limit_mw, handle.max_limit_mw]

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeDevice, limit: int) -> None:
        self._enter("nvmlDeviceSetPowerManagementLimit", self._index(handle), limit)
        if not handle.min_limit_mw <= limit <= handle.max_limit_mw:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle.limit_mw = limit
        self._leave("nvmlDeviceSetPowerManagementLimit")

    def nvmlDeviceGetClockInfo(self, handle: FakeDevice, clock_type: int) -> int:
        self._enter("nvmlDeviceGetClockInfo", self._index(handle), clock_type)
        return handle.sm_clock

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeDevice, clock_type: int) -> int:
        self._enter("nvmlDeviceGetMaxClockInfo", self._index(handle), clock_type)
        return handle.max_sm_clock

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: FakeDevice) -> list[int]:
        self._enter("nvmlDeviceGetSupportedMemoryClocks", self._index(handle))
        return list(handle.memory_clocks)

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: FakeDevice, memory_mhz: int) -> list[int]:
        self._enter("nvmlDeviceGetSupportedGraphicsClocks", self._index(handle), memory_mhz)
        return list(handle.graphics_clocks)

    def nvmlDeviceSetGpuLockedClocks(self, handle: FakeDevice, lo: int, hi: int) -> None:
        self._enter("nvmlDeviceSetGpuLockedClocks", self._index(handle), lo, hi)
        handle.locked = (lo, hi)
        self._leave("nvmlDeviceSetGpuLockedClocks")

    def nvmlDeviceResetGpuLockedClocks(self, handle: FakeDevice) -> None:
        self._enter("nvmlDeviceResetGpuLockedClocks", self._index(handle))
        handle.locked = None

    def _index(self, handle: FakeDevice) -> int:
        return next(i for i, d in enumerate(self.devices) if d is handle)
