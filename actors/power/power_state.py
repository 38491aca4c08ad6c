"""`PowerState`: the power side of one simulated replica, and the seam between the
simulated engine and the power controls.

It is the sim core's `StepTimer` (`actors.engines.sim_core`): handed to `SimScheduler` in
place of the bare `StepTimeModel`, it times each step under the setting its GPUs are
under now (`policies.power_model.capped_step`) and records what the step drew. A
`SimPowerBackend` changes that setting and reads the recorded draw; the cluster
simulator can drive one directly with its virtual clock. Units: seconds, watts, MHz;
draws are per GPU.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from policies.perfmodel import BatchShape, StepTimeModel
from policies.power_model import (
    DEFAULT_COEFFICIENTS,
    UNCAPPED,
    CappedStep,
    ClockRange,
    GpuSetting,
    PowerCoefficients,
    capped_step,
    clock_range,
    decode_line,
)

_MAX_LINES = 4096  # memoised decode lines: batch sizes times the settings seen


class PowerState:
    """The setting of each of a replica's `model.tp` GPUs and the draw of its recent steps.

    The GPUs of a tensor-parallel group step in lockstep, so a step runs under the
    tightest of their settings. `clock` (seconds) stamps steps; a step occupies
    `seconds × time_scale` of it, as the live engine sleeps; `draw_w` averages the last
    `window_s` of it, idle gaps at the GPU's idle draw. With `time_scale` 0 steps take no
    clock time, and the draw is the time-weighted mean of the steps in the window.
    """

    def __init__(self, model: StepTimeModel, *, clock: Callable[[], float] = time.time,
                 time_scale: float = 1.0, window_s: float = 1.0,
                 coefficients: PowerCoefficients = DEFAULT_COEFFICIENTS):
        if time_scale < 0 or window_s <= 0:
            raise ValueError(f"PowerState: time_scale must be >= 0 and window_s > 0, got "
                             f"{time_scale}, {window_s}")
        self.model = model
        self.coefficients = coefficients
        self._clock, self._time_scale, self._window_s = clock, time_scale, window_s
        self._settings = [UNCAPPED] * model.tp
        self._steps: collections.deque[tuple[float, float, float, float]] = collections.deque()
        self._last: CappedStep | None = None
        self._lines: dict[tuple[int, GpuSetting], tuple[float, float] | None] = {}

    @property
    def gpus(self) -> int:
        return len(self._settings)

    @property
    def clocks(self) -> ClockRange:
        return clock_range(self.model.gpu)

    @property
    def setting(self) -> GpuSetting:
        """The setting steps run under: the tightest over the group's GPUs."""
        tightest = self._settings[0]
        for setting in self._settings[1:]:
            tightest = tightest.tighter(setting)
        return tightest

    def gpu_setting(self, gpu: int) -> GpuSetting:
        return self._settings[self._index(gpu)]

    def apply(self, gpu: int, setting: GpuSetting) -> None:
        """Put GPU `gpu` of the group under `setting`, from the next step on."""
        self._settings[self._index(gpu)] = setting

    # -- StepTimer ---------------------------------------------------------------------

    def step_time(self, batch: BatchShape) -> float:
        """Seconds step `batch` takes under the current setting; records its draw from
        now on (the live engine sleeps the step right after timing it)."""
        step = self.expected(batch)
        self.record(self._clock(), step)
        return step.seconds

    def decode_line(self, batch_size: int) -> tuple[float, float] | None:
        """The sim core's `VirtualTimer` view: `policies.power_model.decode_line` under the
        current setting (memoised: it costs about a millisecond). Records nothing: a
        virtual-time host that runs decode steps in bulk records their span (`record`)."""
        key = (batch_size, self.setting)
        if key not in self._lines:
            if len(self._lines) >= _MAX_LINES:
                self._lines.clear()
            self._lines[key] = decode_line(self.model, batch_size, self.setting,
                                           coefficients=self.coefficients)
        return self._lines[key]

    def expected(self, batch: BatchShape) -> CappedStep:
        """Step `batch` under the current setting, without recording it (for routing)."""
        return capped_step(self.model, batch, self.setting, coefficients=self.coefficients)

    def record(self, start: float, step: CappedStep) -> None:
        """Count `step` as run from `start` (clock seconds) for `step.seconds × time_scale`."""
        self._steps.append((start, start + step.seconds * self._time_scale, step.watts,
                            step.seconds))
        self._last = step
        self._forget(start - self._window_s)

    # -- telemetry ---------------------------------------------------------------------

    def draw_w(self) -> float:
        """Average draw of one GPU over the last `window_s` seconds of the clock."""
        now = self._clock()
        start = now - self._window_s
        self._forget(start)
        idle = self.model.gpu.idle_watts
        if self._time_scale == 0:
            recent = [(w, s) for begun, _, w, s in self._steps if begun >= start]
            busy = sum(s for _, s in recent)
            return sum(w * s for w, s in recent) / busy if busy > 0 else idle
        busy = energy = 0.0
        for begun, ended, watts, _ in self._steps:
            overlap = max(0.0, min(ended, now) - max(begun, start))
            busy, energy = busy + overlap, energy + overlap * watts
        return (energy + (self._window_s - busy) * idle) / self._window_s

    def clock_mhz(self) -> float:
        """The SM clock of the latest step while it is recent, else the idle clock the
        setting allows (the lock, or the maximum)."""
        if self._last is not None and self._steps:
            return self._last.clock_mhz
        locked = self.setting.locked_clock_mhz
        return self.clocks.max_mhz if locked is None else self.clocks.fraction(locked) * self.clocks.max_mhz

    def _forget(self, before: float) -> None:
        while self._steps and self._steps[0][1] < before:  # ended before the window
            self._steps.popleft()

    def _index(self, gpu: int) -> int:
        if not 0 <= gpu < len(self._settings):
            raise ValueError(f"GPU {gpu} is not in this replica's group of {len(self._settings)}")
        return gpu
