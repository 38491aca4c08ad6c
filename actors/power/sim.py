"""`SimPowerBackend`: the power interface over a simulated replica's `PowerState`.

Its draw is what `policies.power_model` says the replica's recent steps drew; its caps
and clock locks change the step times the sim engine runs at, by the same model. Limit
and clock ranges are the catalog's (`policies.gpu_catalog`, `policies.power_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from actors.power.backend import (
    PowerCapabilities,
    PowerReading,
    PowerReadOnly,
    PowerSettingRefused,
)
from actors.power.power_state import PowerState


class SimPowerBackend:
    """The GPUs 0..tp-1 of one simulated replica. `read_only` makes it refuse writes as
    an unprivileged NVML process does; `clock` stamps readings (seconds)."""

    def __init__(self, state: PowerState, *, read_only: bool = False,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self._read_only = read_only
        self._clock = clock

    def gpus(self) -> tuple[int, ...]:
        return tuple(range(self.state.gpus))

    def capabilities(self) -> PowerCapabilities:
        reason = "simulated read-only GPU" if self._read_only else ""
        return PowerCapabilities(self._read_only, not self._read_only, not self._read_only, reason)

    def read(self, gpu: int) -> PowerReading:
        gpu_spec, clocks = self.state.model.gpu, self.state.clocks
        setting = self.state.gpu_setting(gpu)
        limit = gpu_spec.tdp_watts if setting.power_limit_w is None else setting.power_limit_w
        return PowerReading(gpu, f"simulated {gpu_spec.name}", self.state.draw_w(), limit,
                            gpu_spec.tdp_watts, self.limit_range_w, self.state.clock_mhz(),
                            (clocks.min_mhz, clocks.max_mhz), setting.locked_clock_mhz,
                            self._clock())

    @property
    def limit_range_w(self) -> tuple[float, float]:
        gpu = self.state.model.gpu
        return gpu.min_power_limit_watts, gpu.tdp_watts

    def set_power_limit(self, gpu: int, watts: float) -> None:
        self._writable(gpu, "set_power_limit")
        lo, hi = self.limit_range_w
        if not lo <= watts <= hi:
            raise PowerSettingRefused(gpu, "set_power_limit", f"{watts:g} W is outside "
                                      f"{self.state.model.gpu.name}'s supported range "
                                      f"{lo:g}-{hi:g} W")
        self.state.apply(gpu, replace(self.state.gpu_setting(gpu), power_limit_w=float(watts)))

    def restore_power_limit(self, gpu: int) -> None:
        self._writable(gpu, "restore_power_limit")
        self.state.apply(gpu, replace(self.state.gpu_setting(gpu), power_limit_w=None))

    def lock_clocks(self, gpu: int, mhz: float) -> None:
        self._writable(gpu, "lock_clocks")
        clocks = self.state.clocks
        if not clocks.min_mhz <= mhz <= clocks.max_mhz:
            raise PowerSettingRefused(gpu, "lock_clocks", f"{mhz:g} MHz is outside "
                                      f"{self.state.model.gpu.name}'s clock range "
                                      f"{clocks.min_mhz:g}-{clocks.max_mhz:g} MHz")
        self.state.apply(gpu, replace(self.state.gpu_setting(gpu), locked_clock_mhz=float(mhz)))

    def unlock_clocks(self, gpu: int) -> None:
        self._writable(gpu, "unlock_clocks")
        self.state.apply(gpu, replace(self.state.gpu_setting(gpu), locked_clock_mhz=None))

    def close(self) -> None:
        """Nothing to release: the state belongs to the engine."""

    def _writable(self, gpu: int, op: str) -> None:
        self.state.gpu_setting(gpu)  # names a GPU outside the group
        if self._read_only:
            raise PowerReadOnly(gpu, op, "simulated read-only GPU: nothing applied")
