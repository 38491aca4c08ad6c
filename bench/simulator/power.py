"""Power in the cluster simulator: each simulated replica's GPUs under their own
`PowerState` (the seam the live sim engine steps through), step times and draws from
`policies.power_model`, and what the replicas drew over time.

`PowerKind` memoises one replica kind's (GPU, model) capped step times, decode lines and
draws by setting; uncapped times are exactly the simulator's without power (the kind's
`LinearDecodeTimer`). `ReplicaPowerTimer` is a replica's `VirtualTimer`: it times steps
under the replica's current setting and, whenever the host `account`s after an
`advance`, records what the replica drew up to the host's present into its
`PowerState`. Steps timed one by one are known from their start (the scheduler's clock
when it asks) and length. A decode run is applied in bulk without asking the timer: the
decode time it ran (the busy time less the steps timed one by one) lies between the
timer's decode-line calls, each starting a run of that batch size, and idle time only
ever ends an advance. Units: seconds (virtual), watts per GPU, joules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from actors.engines.sim_core import Progress
from actors.power import PowerState
from bench.simulator.timing import LinearDecodeTimer
from policies.perfmodel import BatchShape, StepTimeModel
from policies.power_model import UNCAPPED, CappedStep, GpuSetting, capped_step, decode_line

_DECODE_CONTEXT = 1024  # tokens per sequence at which a decode step's draw is taken (it barely varies)


class PowerKind:
    """Capped step times and draws of every replica of one (GPU, model) kind, memoised."""

    def __init__(self, model: StepTimeModel, max_context: int):
        self.model = model
        self.uncapped = LinearDecodeTimer(model, max_context)
        self._steps: dict[tuple[BatchShape, GpuSetting], CappedStep] = {}
        self._lines: dict[tuple[int, GpuSetting], tuple[float, float] | None] = {}
        self._decodes: dict[tuple[int, GpuSetting], CappedStep] = {}
        self._calls = 0

    @property
    def model_calls(self) -> int:
        """Evaluations of the performance model, for the simulator's profile."""
        return self._calls + self.uncapped.model_calls

    def step(self, batch: BatchShape, setting: GpuSetting) -> CappedStep:
        """One step timed one by one (prefill shapes repeat in traces: memoised)."""
        key = (batch, setting)
        step = self._steps.get(key)
        if step is None:
            self._calls += 1
            step = capped_step(self.model, batch, setting)
            if batch.decode_seqs == 0:
                self._steps[key] = step
        return step

    def line(self, batch_size: int, setting: GpuSetting) -> tuple[float, float] | None:
        """The decode line under `setting` (uncapped: the simulator's own, exactly)."""
        if setting == UNCAPPED:
            return self.uncapped.decode_line(batch_size)
        key = (batch_size, setting)
        if key not in self._lines:
            self._calls += 3
            self._lines[key] = decode_line(self.model, batch_size, setting)
        return self._lines[key]

    def decode(self, batch_size: int, setting: GpuSetting) -> CappedStep:
        """A typical decode step of `batch_size` sequences: its draw is the run's."""
        key = (batch_size, setting)
        if key not in self._decodes:
            self._calls += 1
            shape = BatchShape(decode_seqs=batch_size, decode_context_tokens=batch_size * _DECODE_CONTEXT)
            self._decodes[key] = capped_step(self.model, shape, setting)
        return self._decodes[key]


class _Stepped:
    """A step the scheduler timed one by one (under `setting`), recorded up to `done_to`."""

    __slots__ = ("batch", "done_to", "end", "setting", "step")

    def __init__(self, start: float, batch: BatchShape, setting: GpuSetting, step: CappedStep):
        self.batch, self.setting, self.step = batch, setting, step
        self.done_to, self.end = start, start + step.seconds


class ReplicaPowerTimer:
    """A simulated replica's `VirtualTimer` under its GPUs' `state`; `clock` is its
    scheduler's (the start of the step being timed when the scheduler asks).

    What the steps drew is recorded into `state` up to the host's present at each
    `account`, at the draw of the setting in force: a setting changed mid-step (the host
    accounts first) bites from then on, as a GPU's power controller does within
    milliseconds, though the step keeps its planned length (the scheduler cannot re-time
    a step in flight; later steps run at the new speed)."""

    def __init__(self, kind: PowerKind, state: PowerState, clock: Callable[[], float]):
        self.kind, self.state, self._clock = kind, state, clock
        self.busy_j = 0.0  # energy of one GPU over what was recorded
        self._stepped: deque[_Stepped] = deque()  # timed one by one, not yet recorded to their end
        self._marks: list[tuple[float, int | None]] = []  # (clock, decode batch or None) of each call
        self._open: tuple[float, int] | None = None  # a decode run recorded up to this time
        self._ahead = 0.0  # decode seconds recorded past the scheduler's last completed step

    def step_time(self, batch: BatchShape) -> float:
        setting, start = self.state.setting, self._clock()
        step = self.kind.step(batch, setting)
        self._stepped.append(_Stepped(start, batch, setting, step))
        self._marks.append((start, None))
        return step.seconds

    def decode_line(self, batch_size: int) -> tuple[float, float] | None:
        line = self.kind.line(batch_size, self.state.setting)
        if line is not None:  # else the scheduler times the step one by one, through step_time
            self._marks.append((self._clock(), batch_size))
        return line

    def account(self, progress: Progress, working: bool, now: float) -> None:
        """Record what the replica drew up to `now`, the host's present, after an `advance`
        to it that made `progress`; `working`: a step is in flight."""
        done = self._record_stepped(now) if self._stepped else 0.0
        marks = self._marks
        if self._open is not None:
            marks.insert(0, self._open)
        elif not marks:  # no decode time to record (an idle replica, or steps timed one by one)
            self._ahead = 0.0
            return
        self._marks, self._open = [], None
        budget = progress.busy_s - done - self._ahead  # decode seconds completed, not yet recorded
        running = working and marks[-1][1] is not None
        ahead = now - self._clock() if running else 0.0  # the decode step in flight, so far
        runs = [(t, (marks[i + 1][0] if i + 1 < len(marks) else now) - t, b)
                for i, (t, b) in enumerate(marks) if b is not None]
        excess = sum(d for _, d, _ in runs) - max(0.0, budget + ahead)
        for t, seconds, batch in reversed(runs):  # idle time only ever ends an advance
            cut = min(seconds, max(0.0, excess))
            excess -= cut
            if seconds - cut > 0:
                self._record(t, self.kind.decode(batch, self.state.setting), seconds - cut)
        self._ahead = ahead
        if running:
            self._open = (now, marks[-1][1])

    def _record_stepped(self, now: float) -> float:
        """Record the steps timed one by one up to `now`; the seconds of those completed."""
        done, setting = 0.0, self.state.setting
        for st in self._stepped:
            upto = min(st.end, now)
            if upto > st.done_to:
                step = st.step if st.setting == setting else self.kind.step(st.batch, setting)
                self._record(st.done_to, step, upto - st.done_to)
                st.done_to = upto
        while self._stepped and self._stepped[0].end <= now:
            done += self._stepped.popleft().step.seconds
        return done

    def _record(self, start: float, step: CappedStep, seconds: float) -> None:
        # built field by field: `dataclasses.replace` costs several times more, once per sync
        self.state.record(start, CappedStep(seconds, step.watts, step.clock_mhz, step.slowdown, step.limit_binds))
        self.busy_j += seconds * step.watts
