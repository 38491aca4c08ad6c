"""Table tests of the GPU power model: the published facts it is calibrated to, and the
properties every caller relies on (uncapped = the performance model, draws within
[idle, TDP], limits met, monotone in clock and cap)."""

from __future__ import annotations

import pytest

from policies.perfmodel import GPU_CATALOG, MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec
from policies.power_model import (
    CLOCK_CATALOG,
    UNCAPPED,
    GpuSetting,
    PowerCoefficients,
    capped_speed,
    capped_step,
    clock_range,
    decode_line,
    power_draw,
    step_time_at_clock,
    step_time_under_cap,
)


def model(gpu: str = "H100", arch: str = "llama-2-7b", tp: int = 1) -> StepTimeModel:
    return StepTimeModel(gpu_spec(gpu), MODEL_PRESETS[arch], tp=tp)


def decode(batch: int, context_per_seq: int = 1024) -> BatchShape:
    return BatchShape(decode_seqs=batch, decode_context_tokens=batch * context_per_seq)


def prefill(tokens: int, seqs: int = 1) -> BatchShape:
    return BatchShape.from_requests([(tokens, 0)] * seqs)


SHAPES = [prefill(512), prefill(2048), prefill(256, seqs=16), decode(1), decode(64),
          decode(256, 512), BatchShape.from_requests([(512, 0)], [1024] * 32)]
GPUS = sorted(set(GPU_CATALOG) - {"CPU"})


def conversation_batch_seconds(m: StepTimeModel, cap_watts: float | None) -> float:
    """A batch of 16 requests of the Azure conversation trace's median shape (1020-token
    prompts, 129 output tokens): one prefill step, then 129 decode steps."""
    steps = [prefill(1020, seqs=16)] + [decode(16, 1020 + i) for i in range(1, 130)]
    return sum(step_time_under_cap(m, s, cap_watts=cap_watts) for s in steps)


# -- the facts the model is calibrated to ----------------------------------------------

@pytest.mark.parametrize(("arch", "tp", "batch"), [
    ("llama-2-7b", 1, 1), ("llama-2-7b", 1, 16), ("llama-2-7b", 1, 64),
    ("llama-2-70b", 8, 16), ("llama-2-70b", 8, 256),
])
def test_h100_capped_from_700_to_350_w_barely_slows_decode(arch, tp, batch):
    m = model("H100", arch, tp)
    slowdown = step_time_under_cap(m, decode(batch), cap_watts=350) / m.step_time(decode(batch))
    assert 1.0 <= slowdown < 1.05  # Splitwise: the token phase hardly notices a 50 % cap


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_h100_capped_to_350_w_slows_prefill_about_as_its_clock_falls(tokens):
    m = model("H100")
    step = capped_step(m, prefill(tokens), GpuSetting(power_limit_w=350))
    parts = m.breakdown(prefill(tokens))
    clock_ratio = clock_range(m.gpu).max_mhz / step.clock_mhz
    compute_share = parts.compute_s / parts.total_s
    assert step.slowdown > 1.25  # far above decode's
    # the compute-bound share stretches with the clock, the rest hardly at all
    assert step.slowdown == pytest.approx(1 + compute_share * (clock_ratio - 1), rel=0.01)


@pytest.mark.parametrize(("gpu", "arch"), [("A100-80GB", "llama-2-13b"),
                                           ("A100-80GB", "llama-2-7b"),
                                           ("A100-40GB", "llama-2-7b")])
def test_a100_30_percent_power_cut_costs_about_7_percent_latency(gpu, arch):
    m = model(gpu, arch)
    cut = 0.7 * m.gpu.tdp_watts  # 400 W -> 280 W
    slowdown = conversation_batch_seconds(m, cut) / conversation_batch_seconds(m, None)
    assert slowdown == pytest.approx(1.07, abs=0.03)  # Samsi et al. 2023


def test_prefill_draws_about_the_tdp_and_decode_well_below():
    m = model("H100")
    assert power_draw(m, prefill(2048)) >= 0.9 * m.gpu.tdp_watts
    assert power_draw(m, decode(64)) <= 0.75 * m.gpu.tdp_watts
    assert power_draw(model("H100", "llama-2-70b", 8), decode(64)) <= 0.65 * m.gpu.tdp_watts


# -- properties ------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_uncapped_steps_are_the_performance_models_own(gpu, shape):
    m = model(gpu)
    step = capped_step(m, shape)
    assert step.seconds == m.step_time(shape)
    assert step_time_under_cap(m, shape) == m.step_time(shape)
    assert not step.limit_binds and step.slowdown == 1.0
    assert m.gpu.idle_watts < step.watts <= m.gpu.tdp_watts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_draw_rises_with_the_clock(shape):
    m, clocks = model("A100-80GB"), CLOCK_CATALOG["A100-80GB"]
    mhz = [clocks.min_mhz + i * (clocks.max_mhz - clocks.min_mhz) / 20 for i in range(21)]
    draws = [power_draw(m, shape, f) for f in mhz]
    times = [step_time_at_clock(m, shape, f) for f in mhz]
    assert draws == sorted(draws)
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize("limit", [200, 250, 300, 350, 450, 600, 700])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_power_limit_is_met_and_never_speeds_a_step_up(limit, shape):
    m = model("H100")
    step = capped_step(m, shape, GpuSetting(power_limit_w=limit))
    assert step.watts <= limit + 1e-6
    assert step.seconds >= m.step_time(shape)
    looser = capped_step(m, shape, GpuSetting(power_limit_w=limit + 50))
    assert looser.seconds <= step.seconds


def test_a_limit_above_the_draw_changes_nothing():
    m = model("H100")
    step = capped_step(m, decode(16), GpuSetting(power_limit_w=650))
    assert step.seconds == m.step_time(decode(16)) and not step.limit_binds


def test_a_limit_below_what_the_lowest_clock_draws_stretches_the_step():
    m = model("H100")
    floor = capped_step(m, decode(64), GpuSetting(locked_clock_mhz=clock_range(m.gpu).min_mhz))
    step = capped_step(m, decode(64), GpuSetting(power_limit_w=200))
    assert floor.watts > 200  # HBM keeps drawing at the lowest SM clock
    assert step.watts == 200 and step.seconds > floor.seconds and step.limit_binds


def test_a_clock_lock_slows_compute_with_the_clock_and_a_limit_still_applies():
    m = model("H100")
    half = step_time_at_clock(m, prefill(2048), 990)
    parts = m.breakdown(prefill(2048))
    assert half - m.step_time(prefill(2048)) == pytest.approx(parts.compute_s, rel=0.1)
    both = capped_step(m, prefill(2048), GpuSetting(power_limit_w=250, locked_clock_mhz=1500))
    assert both.watts <= 250 + 1e-6 and both.clock_mhz < 1500 and both.limit_binds
    # a clock beyond the range is clamped into it
    assert step_time_at_clock(m, decode(8), 5000) == m.step_time(decode(8))


def test_an_empty_step_takes_no_time_and_draws_idle():
    m = model("L4")
    step = capped_step(m, BatchShape(), GpuSetting(power_limit_w=50))
    assert step.seconds == 0.0 and step.watts == m.gpu.idle_watts


def test_tensor_parallel_draw_is_per_gpu():
    one, eight = model("H100", "llama-2-70b", 8), model("H100")
    assert one.gpu.idle_watts < power_draw(one, decode(16)) <= one.gpu.tdp_watts
    assert power_draw(eight, prefill(2048)) > power_draw(one, decode(16))


@pytest.mark.parametrize("setting", [UNCAPPED, GpuSetting(power_limit_w=350),
                                     GpuSetting(locked_clock_mhz=1200)], ids=str)
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_line_times_decode_runs_like_capped_step(setting, batch):
    m = model("H100")
    a, b = decode_line(m, batch, setting)
    for per_seq in (16, 256, 1024, 4096):
        exact = capped_step(m, decode(batch, per_seq), setting).seconds
        assert a + b * batch * per_seq == pytest.approx(exact, rel=0.01)


def test_capped_speed_is_slower_under_a_cap_the_way_routing_needs():
    m = model("H100")
    prefill_tps, decode_s = capped_speed(m)
    capped_tps, capped_decode_s = capped_speed(m, GpuSetting(power_limit_w=350))
    assert prefill_tps == pytest.approx(2048 / m.step_time(prefill(2048)))
    assert capped_tps < 0.8 * prefill_tps  # prefill pays
    assert decode_s < capped_decode_s < 1.05 * decode_s  # decode barely


# -- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"power_limit_w": 0}, "power_limit_w"), ({"locked_clock_mhz": -1}, "locked_clock_mhz"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GpuSetting(**kwargs)


def test_a_limit_at_or_below_idle_is_refused():
    with pytest.raises(ValueError, match="idle draw"):
        capped_step(model("H100"), decode(1), GpuSetting(power_limit_w=60))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"voltage_exponent": 0.5}, "voltage_exponent"),
    ({"hbm_activity": 0.7, "memory_sm_activity": 0.5}, "must not exceed 1"),
    ({"wait_activity": 1.5}, "wait_activity"),
])
def test_bad_coefficients_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PowerCoefficients(**kwargs)


def test_tighter_takes_the_stricter_of_each_field():
    a = GpuSetting(power_limit_w=300, locked_clock_mhz=None)
    b = GpuSetting(power_limit_w=450, locked_clock_mhz=1200)
    assert a.tighter(b) == GpuSetting(300, 1200) == b.tighter(a)
    assert UNCAPPED.tighter(UNCAPPED) == UNCAPPED
