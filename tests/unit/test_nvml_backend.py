"""`NvmlBackend` against a fake NVML library: the call sequence, unit conversion,
read-only mode without the privilege, and GPUs left as they were when a call fails."""

from __future__ import annotations

import pynvml
import pytest

from actors.power import (
    NvmlBackend,
    PowerBackend,
    PowerBackendUnavailable,
    PowerControlError,
    PowerReadOnly,
    PowerSettingRefused,
    PowerTelemetryError,
    apply_action,
)
from policies.power_snapshot import PowerAction, PowerOp
from tests.unit import fake_nvml
from tests.unit.fake_nvml import FakeNvml

SET = "nvmlDeviceSetPowerManagementLimit"
LOCK = "nvmlDeviceSetGpuLockedClocks"


def backend(nvml: FakeNvml | None = None, **kw) -> tuple[NvmlBackend, FakeNvml]:
    """A started backend over `nvml`, whose call log is marked where the start ended."""
    nvml = nvml or FakeNvml()
    started = NvmlBackend(nvml=nvml, clock=lambda: 42.0, **kw)
    nvml.mark()
    return started, nvml


def test_the_fake_matches_the_real_library():
    names = [n for n in dir(FakeNvml) if n.startswith("nvml")]
    assert names and all(hasattr(pynvml, n) for n in names)
    for const in ("NVML_CLOCK_SM", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_NOT_SUPPORTED"):
        assert getattr(fake_nvml, const) == getattr(pynvml, const)


def test_start_describes_each_gpu_and_probes_the_privilege_with_a_no_op_write():
    b, nvml = backend()
    assert isinstance(b, PowerBackend) and b.gpus() == (0, 1)
    assert nvml.names()[:2] == ["nvmlInit", "nvmlDeviceGetCount"]
    assert nvml.calls[2:10] == [
        ("nvmlDeviceGetHandleByIndex", 0), ("nvmlDeviceGetName", 0),
        ("nvmlDeviceGetPowerManagementLimitConstraints", 0),
        ("nvmlDeviceGetPowerManagementDefaultLimit", 0), ("nvmlDeviceGetMaxClockInfo", 0, 1),
        ("nvmlDeviceGetSupportedMemoryClocks", 0), ("nvmlDeviceGetSupportedGraphicsClocks", 0, 2619),
        ("nvmlDeviceGetHandleByIndex", 1)]
    # the probe writes each GPU's own limit back to it
    assert [c for c in nvml.calls if c[0] == SET] == [(SET, 0, 700_000), (SET, 1, 700_000)]
    caps = b.capabilities()
    assert not caps.read_only and caps.can_set_power_limit and caps.can_lock_clocks


def test_read_converts_milliwatts_and_reports_ranges():
    b, nvml = backend()
    r = b.read(1)
    assert (r.gpu, r.draw_w, r.limit_w, r.default_limit_w) == (1, 312.0, 700.0, 700.0)
    assert r.limit_range_w == (200.0, 700.0) and r.clock_range_mhz == (345.0, 1980.0)
    assert (r.sm_clock_mhz, r.locked_clock_mhz, r.observed_at, r.headroom_w) == (1980.0, None, 42.0, 388.0)
    assert nvml.since_mark() == [("nvmlDeviceGetPowerUsage", 1), ("nvmlDeviceGetEnforcedPowerLimit", 1),
                                 ("nvmlDeviceGetClockInfo", 1, 1)]


def test_set_power_limit_reads_the_old_limit_then_writes_milliwatts():
    b, nvml = backend()
    b.set_power_limit(0, 350)
    assert nvml.since_mark()[0] == ("nvmlDeviceGetPowerManagementLimit", 0)
    assert nvml.calls[-1] == (SET, 0, 350_000) and nvml.devices[0].limit_mw == 350_000
    b.restore_power_limit(0)
    assert nvml.calls[-1] == (SET, 0, 700_000) and nvml.devices[0].limit_mw == 700_000


def test_lock_sets_a_ceiling_and_unlock_resets():
    b, nvml = backend()
    b.lock_clocks(1, 1386)
    assert nvml.calls[-1] == (LOCK, 1, 345, 1386) and b.read(1).locked_clock_mhz == 1386
    b.unlock_clocks(1)
    assert nvml.calls[-1] == ("nvmlDeviceResetGpuLockedClocks", 1) and nvml.devices[1].locked is None
    assert b.read(1).locked_clock_mhz is None


@pytest.mark.parametrize(("call", "match"), [
    (lambda b: b.set_power_limit(0, 800), "outside NVIDIA H100 80GB HBM3's supported range 200-700 W"),
    (lambda b: b.set_power_limit(0, 150), "150 W is outside"),
    (lambda b: b.lock_clocks(0, 3000), "3000 MHz is outside"),
])
def test_settings_outside_the_gpus_range_are_refused_before_calling_nvml(call, match):
    b, nvml = backend()
    before = len(nvml.calls)
    with pytest.raises(PowerSettingRefused, match=match):
        call(b)
    assert len(nvml.calls) == before


def test_without_the_privilege_the_backend_runs_read_only_and_says_why():
    b, nvml = backend(FakeNvml(failures={SET: fake_nvml.NVML_ERROR_NO_PERMISSION}))
    caps = b.capabilities()
    assert caps.read_only and not caps.can_set_power_limit and not caps.can_lock_clocks
    assert "Insufficient Permissions" in caps.reason and "CAP_SYS_ADMIN" in caps.reason
    assert b.read(0).draw_w == 312.0  # reading still works
    calls = len(nvml.calls)
    with pytest.raises(PowerReadOnly, match="CAP_SYS_ADMIN"):
        b.set_power_limit(0, 350)
    with pytest.raises(PowerReadOnly):
        b.lock_clocks(0, 1000)
    assert len(nvml.calls) == calls  # nothing was attempted


def test_a_permission_refused_later_turns_the_backend_read_only():
    b, nvml = backend()
    nvml.failures[LOCK] = fake_nvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(PowerReadOnly) as caught:
        b.lock_clocks(0, 1386)
    assert caught.value.code == fake_nvml.NVML_ERROR_NO_PERMISSION and caught.value.restored
    assert b.capabilities().read_only


def test_a_failed_limit_write_that_changed_the_gpu_is_put_back():
    nvml = FakeNvml()
    b, _ = backend(nvml)
    nvml.failures[SET] = fake_nvml.NVML_ERROR_UNKNOWN
    nvml.once.add(SET)
    nvml.apply_then_fail.add(SET)  # the driver applied 350 W, then reported an error
    with pytest.raises(PowerControlError) as caught:
        b.set_power_limit(0, 350)
    assert caught.value.restored and caught.value.op == "set_power_limit"
    assert nvml.devices[0].limit_mw == 700_000
    assert nvml.since_mark()[-3:] == [("nvmlDeviceGetPowerManagementLimit", 0), (SET, 0, 700_000),
                                      ("nvmlDeviceGetPowerManagementLimit", 0)]


def test_a_failed_write_that_changed_nothing_writes_nothing_more():
    b, nvml = backend()
    nvml.failures[SET] = fake_nvml.NVML_ERROR_UNKNOWN
    with pytest.raises(PowerControlError, match="NVML error 999") as caught:
        b.set_power_limit(0, 350)
    assert caught.value.restored and nvml.devices[0].limit_mw == 700_000
    assert [c for c in nvml.since_mark() if c[0] == SET] == [(SET, 0, 350_000)]


def test_when_putting_back_fails_too_the_error_says_the_gpu_may_be_changed():
    b, nvml = backend()
    nvml.failures[SET] = fake_nvml.NVML_ERROR_UNKNOWN
    nvml.apply_then_fail.add(SET)
    with pytest.raises(PowerControlError, match="may be left changed") as caught:
        b.set_power_limit(0, 350)
    assert not caught.value.restored


def test_a_failed_lock_re_applies_the_previous_lock():
    b, nvml = backend()
    b.lock_clocks(0, 1410)
    nvml.failures[LOCK] = fake_nvml.NVML_ERROR_UNKNOWN
    nvml.once.add(LOCK)
    with pytest.raises(PowerControlError) as caught:
        b.lock_clocks(0, 990)
    assert caught.value.restored and nvml.devices[0].locked == (345, 1410)
    assert b.read(0).locked_clock_mhz == 1410


def test_unsupported_clock_locks_are_reported_in_the_capabilities():
    b, nvml = backend()
    nvml.failures[LOCK] = fake_nvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(PowerControlError, match="Not Supported"):
        b.lock_clocks(0, 990)
    caps = b.capabilities()
    assert not caps.read_only and not caps.can_lock_clocks and "clock locks" in caps.reason


def test_a_failed_reading_is_a_typed_error():
    b, nvml = backend()
    nvml.failures["nvmlDeviceGetPowerUsage"] = fake_nvml.NVML_ERROR_UNKNOWN
    with pytest.raises(PowerTelemetryError, match="GPU 0: reading power failed") as caught:
        b.read(0)
    assert caught.value.code == fake_nvml.NVML_ERROR_UNKNOWN


def test_no_driver_means_no_backend():
    nvml = FakeNvml(failures={"nvmlInit": fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED})
    with pytest.raises(PowerBackendUnavailable, match="Driver Not Loaded"):
        NvmlBackend(nvml=nvml)


def test_an_unknown_gpu_index_is_refused_and_nvml_shut_down():
    nvml = FakeNvml()
    with pytest.raises(PowerBackendUnavailable, match=r"no GPU with index \[5\]"):
        NvmlBackend([0, 5], nvml=nvml)
    assert nvml.names()[-1] == "nvmlShutdown" and not nvml.initialised


def test_close_shuts_nvml_down_once():
    b, nvml = backend()
    with b as entered:
        assert entered is b
    b.close()
    assert nvml.names().count("nvmlShutdown") == 1
    with pytest.raises(PowerBackendUnavailable, match="closed"):
        b.read(0)


def test_an_action_on_a_replica_is_all_or_nothing_across_its_gpus():
    b, nvml = backend()
    nvml.calls.clear()
    original = nvml.nvmlDeviceSetPowerManagementLimit

    def fail_on_gpu_1(handle, limit):
        if handle is nvml.devices[1]:
            nvml.calls.append((SET, 1, limit))
            raise fake_nvml.NVMLError(fake_nvml.NVML_ERROR_UNKNOWN)
        original(handle, limit)

    nvml.nvmlDeviceSetPowerManagementLimit = fail_on_gpu_1  # GPU 0 takes it, GPU 1 fails
    outcome = apply_action(b, (0, 1), PowerAction("r", PowerOp.SET_POWER_LIMIT, 350, "test"))
    assert not outcome.ok and outcome.restored and "GPU 1" in outcome.error
    assert [d.limit_mw for d in nvml.devices] == [700_000, 700_000]
    assert [c[1:] for c in nvml.calls if c[0] == SET] == [(0, 350_000), (1, 350_000), (0, 700_000)]


def test_a_cap_is_applied_even_when_the_gpu_cannot_be_read():
    b, nvml = backend()
    nvml.failures["nvmlDeviceGetPowerUsage"] = fake_nvml.NVML_ERROR_UNKNOWN
    outcome = apply_action(b, (0, 1), PowerAction("r", PowerOp.SET_POWER_LIMIT, 420, "no telemetry"))
    assert outcome.ok and [d.limit_mw for d in nvml.devices] == [420_000, 420_000]
