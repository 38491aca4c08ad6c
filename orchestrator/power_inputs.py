"""The power policy's input for one replica (`policies.power.ReplicaPower`), built from what
its GPUs report and the controller's records of it. The live `PowerManager` and the
cluster simulator's power hook both build their snapshots here, so they decide alike.

Units: watts, MHz, seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.power import PowerCapabilities, PowerReading
from orchestrator.config import FleetConfig
from orchestrator.fleet_state import FleetState, ReplicaRecord
from policies.gpu_catalog import gpu_spec
from policies.power import ReplicaPower, replica_priority
from policies.power_model import UNCAPPED, GpuSetting, clock_range
from policies.power_snapshot import PowerAction, PowerOp


def group_setting(readings: Sequence[PowerReading]) -> GpuSetting:
    """What a replica's GPUs run under, from their readings: the weakest over the group
    (the highest limit, no lock if any GPU floats), so a cap that one GPU lacks is applied
    again to all of them rather than taken as done. A limit at the default is None."""
    if not readings:
        return UNCAPPED
    limit = max(readings, key=lambda r: r.limit_w)
    locks = [r.locked_clock_mhz for r in readings]
    return GpuSetting(None if limit.limit_w == limit.default_limit_w else limit.limit_w,
                      None if None in locks else max(locks))


def after(setting: GpuSetting, action: PowerAction) -> GpuSetting:
    """`setting` once `action` has been applied."""
    if action.op is PowerOp.SET_POWER_LIMIT:
        return GpuSetting(action.value, setting.locked_clock_mhz)
    if action.op is PowerOp.RESTORE_POWER_LIMIT:
        return GpuSetting(None, setting.locked_clock_mhz)
    if action.op is PowerOp.LOCK_CLOCKS:
        return GpuSetting(setting.power_limit_w, action.value)
    return GpuSetting(setting.power_limit_w, None)


def priority_of(record: ReplicaRecord, config: FleetConfig) -> int:
    """The replica's power priority: its model's override, else the highest priority of
    the SLO classes of the requests it held at its last poll, else the default class's."""
    classes = {c.name: c.priority for c in config.slo_classes}
    serving = [q.slo_class for q in record.stats.requests] if record.stats is not None else []
    return replica_priority(record.spec.model, serving, classes, config.power.model_priority,
                            classes[config.default_slo_class])


def row_of(state: FleetState, node_id: str, label: str) -> str:
    """The row of racks a node sits in, from its Ray node label ("" when unlabelled)."""
    node = state.nodes.get(node_id)
    return "" if node is None else dict(node.observed.labels).get(label, "")


def replica_power(record: ReplicaRecord, readings: Sequence[PowerReading],
                  capabilities: PowerCapabilities | None, *, setting: GpuSetting, gpus: int,
                  priority: int, row: str, pinned_limit_w: float | None) -> ReplicaPower:
    """One replica for the policy. With `readings` its ranges and draw are theirs (draw:
    the sum over its GPUs; observed_at: the oldest reading); without any (never read),
    the catalog's ranges for `gpus` GPUs and no draw, which the policy counts at the
    limit. `setting` is what is applied now (the last read, or what was set since);
    `capabilities` None means not known yet (assumed controllable: a failed call says)."""
    hw = _hardware(record.spec.gpu_type, readings, gpus)
    (lo, hi), (slow, fast) = hw["limit_range_w"], hw["clock_range_mhz"]
    limit = hw["default_limit_w"] if setting.power_limit_w is None else setting.power_limit_w
    lock = setting.locked_clock_mhz
    return ReplicaPower(
        record.replica_id, record.spec.gpu_type, record.node_id, power_limit_w=_clamp(limit, lo, hi),
        locked_clock_mhz=None if lock is None else _clamp(lock, slow, fast), row=row, priority=priority,
        pinned_limit_w=None if pinned_limit_w is None else _clamp(pinned_limit_w, lo, hi),
        controllable=capabilities is None or not capabilities.read_only,
        can_lock_clocks=capabilities is None or capabilities.can_lock_clocks, **hw,
    )


def _hardware(gpu_type: str, readings: Sequence[PowerReading], gpus: int) -> dict:
    """Ranges, idle draw, GPU count and draw of a replica's GPUs: read, or the catalog's."""
    spec = gpu_spec(gpu_type)
    if not readings:
        clocks = clock_range(spec)
        return dict(default_limit_w=spec.tdp_watts, limit_range_w=(spec.min_power_limit_watts, spec.tdp_watts),
                    clock_range_mhz=(clocks.min_mhz, clocks.max_mhz), idle_w=spec.idle_watts, gpus=max(1, gpus))
    lo, hi = max(r.limit_range_w[0] for r in readings), min(r.limit_range_w[1] for r in readings)
    return dict(default_limit_w=_clamp(readings[0].default_limit_w, lo, hi), limit_range_w=(lo, hi),
                clock_range_mhz=(max(r.clock_range_mhz[0] for r in readings),
                                 min(r.clock_range_mhz[1] for r in readings)),
                idle_w=spec.idle_watts, gpus=len(readings), draw_w=sum(r.draw_w for r in readings),
                observed_at=min(r.observed_at for r in readings))


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)
