"""`PowerState` and `SimPowerBackend`: the simulated GPU's draw follows the power model,
caps and clock locks slow the sim core's steps by the same model, and the backend keeps
the `PowerBackend` contract (ranges refused, read-only mode, all-or-nothing actions)."""

from __future__ import annotations

import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.engines.sim_core import SimScheduler
from actors.power import (
    PowerBackend,
    PowerReadOnly,
    PowerSettingRefused,
    PowerState,
    SimPowerBackend,
    apply_action,
)
from policies.perfmodel import MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec
from policies.power_model import GpuSetting, capped_step
from policies.power_snapshot import PowerAction, PowerOp

PREFILL = BatchShape.from_requests([(2048, 0)])
DECODE = BatchShape(decode_seqs=32, decode_context_tokens=32 * 1024)


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def perf(gpu: str = "H100", tp: int = 1, arch: str = "llama-2-7b") -> StepTimeModel:
    return StepTimeModel(gpu_spec(gpu), MODEL_PRESETS[arch], tp=tp)


def state(clock: FakeClock, **kw) -> PowerState:
    return PowerState(kw.pop("model", perf()), clock=clock, **kw)


def request(rid: str, prompt: int = 1024, max_tokens: int = 64) -> GenerationRequest:
    return GenerationRequest(rid, "m", tuple(range(10, 10 + prompt)),
                             SamplingSpec(max_tokens=max_tokens))


def busy_seconds(timer, requests=4) -> float:
    """GPU seconds a live-stepped sim core takes to serve `requests` requests."""
    core = SimScheduler(timer, "m", num_blocks=4096, block_size=16)
    for i in range(requests):
        core.add(request(f"r{i}"))
    total = 0.0
    while core.has_work:
        total += core.step().duration_s
    return total


# -- the seam: PowerState as the sim core's step timer -----------------------------------

def test_uncapped_the_sim_core_runs_exactly_as_with_the_bare_model():
    assert busy_seconds(state(FakeClock())) == busy_seconds(perf())


def test_a_cap_set_through_the_backend_slows_the_sim_cores_steps():
    clock = FakeClock()
    capped = state(clock)
    SimPowerBackend(capped, clock=clock).set_power_limit(0, 350)
    assert busy_seconds(capped) > 1.05 * busy_seconds(perf())


def test_virtual_time_runs_use_the_capped_decode_line():
    def virtual_seconds(timer: PowerState) -> float:
        core = SimScheduler(timer, "m", num_blocks=4096, block_size=16)
        core.use_virtual_time(timer)
        for i in range(4):
            core.add(request(f"r{i}"))
        while (end := core.next_change_s()) is not None:
            core.advance(end)
        return core.clock_s

    locked = state(FakeClock())
    locked.apply(0, GpuSetting(locked_clock_mhz=990))
    free = virtual_seconds(state(FakeClock()))
    assert free == pytest.approx(busy_seconds(perf()), rel=1e-9)  # runs time steps exactly
    assert virtual_seconds(locked) > 1.02 * free


def test_a_tensor_parallel_group_steps_under_its_tightest_gpu():
    s = state(FakeClock(), model=perf("H100", tp=8, arch="llama-2-70b"))
    s.apply(3, GpuSetting(power_limit_w=300))
    s.apply(5, GpuSetting(locked_clock_mhz=1200))
    assert s.gpus == 8 and s.setting == GpuSetting(300, 1200)
    assert s.step_time(PREFILL) == capped_step(s.model, PREFILL, GpuSetting(300, 1200)).seconds
    with pytest.raises(ValueError, match="GPU 8 is not in this replica's group of 8"):
        s.apply(8, GpuSetting())


# -- telemetry ---------------------------------------------------------------------------

def test_draw_averages_steps_and_idle_over_the_window():
    clock = FakeClock()
    s = state(clock, window_s=1.0)
    assert s.draw_w() == s.model.gpu.idle_watts  # nothing ran yet
    seconds = s.step_time(PREFILL)  # runs from 100.0 for `seconds`
    clock.now = 100.0 + seconds
    assert s.draw_w() == pytest.approx(seconds * capped_step(s.model, PREFILL).watts
                                       + (1 - seconds) * s.model.gpu.idle_watts)
    clock.now = 102.0
    assert s.draw_w() == s.model.gpu.idle_watts  # the step left the window


def test_back_to_back_steps_draw_what_the_model_says():
    clock = FakeClock()
    s = state(clock, window_s=0.5)
    while clock.now < 101.0:
        clock.now += s.step_time(DECODE)
    assert s.draw_w() == pytest.approx(capped_step(s.model, DECODE).watts)
    s.apply(0, GpuSetting(power_limit_w=300))
    while clock.now < 102.0:
        clock.now += s.step_time(DECODE)
    assert s.draw_w() == pytest.approx(300, abs=0.5)


def test_without_clock_time_the_draw_is_the_mean_of_recent_steps():
    clock = FakeClock()
    s = state(clock, time_scale=0.0)
    s.step_time(PREFILL)
    s.step_time(DECODE)
    p, d = capped_step(s.model, PREFILL), capped_step(s.model, DECODE)
    assert s.draw_w() == pytest.approx((p.watts * p.seconds + d.watts * d.seconds)
                                       / (p.seconds + d.seconds))


# -- the backend contract --------------------------------------------------------------

def test_the_backend_reads_draw_limit_and_clocks():
    clock = FakeClock()
    s = state(clock)
    b = SimPowerBackend(s, clock=clock)
    assert isinstance(b, PowerBackend) and b.gpus() == (0,)
    clock.now += s.step_time(PREFILL)
    r = b.read(0)
    assert r.name == "simulated H100" and r.limit_w == r.default_limit_w == 700
    assert r.limit_range_w == (200, 700) and r.clock_range_mhz == (345, 1980)
    assert r.observed_at == clock.now and s.model.gpu.idle_watts < r.draw_w < 700
    b.lock_clocks(0, 1200)
    b.set_power_limit(0, 400)
    r = b.read(0)
    assert (r.limit_w, r.locked_clock_mhz) == (400, 1200)
    b.restore_power_limit(0)
    b.unlock_clocks(0)
    assert s.setting == GpuSetting()


@pytest.mark.parametrize(("call", "match"), [
    (lambda b: b.set_power_limit(0, 100), "100 W is outside H100's supported range 200-700 W"),
    (lambda b: b.lock_clocks(0, 100), "100 MHz is outside H100's clock range 345-1980 MHz"),
])
def test_the_backend_refuses_settings_outside_the_gpus_range(call, match):
    s = state(FakeClock())
    with pytest.raises(PowerSettingRefused, match=match):
        call(SimPowerBackend(s))
    assert s.setting == GpuSetting()


def test_a_read_only_backend_reads_but_changes_nothing():
    s = state(FakeClock())
    b = SimPowerBackend(s, read_only=True)
    assert b.capabilities().read_only and b.read(0).limit_w == 700
    with pytest.raises(PowerReadOnly, match="nothing applied"):
        b.set_power_limit(0, 400)
    assert s.setting == GpuSetting()


def test_actions_apply_to_every_gpu_of_the_replica():
    s = state(FakeClock(), model=perf("A100-80GB", tp=2, arch="llama-2-13b"))
    b = SimPowerBackend(s)
    outcome = apply_action(b, b.gpus(), PowerAction("r", PowerOp.SET_POWER_LIMIT, 250, "test"))
    assert outcome.ok and [s.gpu_setting(g).power_limit_w for g in (0, 1)] == [250, 250]
    refused = apply_action(b, b.gpus(), PowerAction("r", PowerOp.LOCK_CLOCKS, 5000, "test"))
    assert not refused.ok and refused.restored and "outside" in refused.error
    assert s.setting == GpuSetting(power_limit_w=250)
