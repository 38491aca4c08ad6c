"""Build the `FleetView` the router agents route over from the controller's records."""

from __future__ import annotations

from functools import lru_cache

from orchestrator.fleet_state import FleetState, ReplicaRecord
from policies.fleet_view import FleetView, ReplicaSnapshot, SloClass
from policies.perfmodel import StepTimeModel, TransformerSpec, gpu_spec
from policies.power_model import UNCAPPED, GpuSetting, capped_speed

_TYPICAL_CONTEXT = 1024  # tokens per sequence assumed when stating a replica's speed
_TYPICAL_BATCH = 16  # sequences in the decode step whose time routing uses for TPOT


@lru_cache(maxsize=1024)
def replica_speed(gpu_type: str, arch: TransformerSpec, gpus: int,
                  setting: GpuSetting = UNCAPPED) -> tuple[float, float, float]:
    """(prefill tokens/s, decode step seconds at a typical batch, max output tokens/s) of one
    replica whose GPUs run under the power `setting`: the uncapped speeds scaled by what
    the cap costs (`policies.power_model.capped_speed`), capacity with the decode step."""
    model = StepTimeModel(gpu_spec(gpu_type), arch, tp=max(1, gpus))
    prefill_tps = model.prefill_tokens_per_s()
    decode_s = model.decode_time(_TYPICAL_BATCH, _TYPICAL_BATCH * _TYPICAL_CONTEXT)
    max_tps = model.max_decode_tokens_per_s(_TYPICAL_CONTEXT)
    if setting == UNCAPPED:
        return prefill_tps, decode_s, max_tps
    free = capped_speed(model, decode_batch=_TYPICAL_BATCH, context_per_seq=_TYPICAL_CONTEXT)
    capped = capped_speed(model, setting, decode_batch=_TYPICAL_BATCH, context_per_seq=_TYPICAL_CONTEXT)
    decode_slowdown = capped[1] / free[1]
    return prefill_tps * capped[0] / free[0], decode_s * decode_slowdown, max_tps / decode_slowdown


def snapshot_of(record: ReplicaRecord, gpus: int) -> ReplicaSnapshot:
    spec, stats = record.spec, record.stats
    prefill_tps, decode_step_s, max_tps = replica_speed(spec.gpu_type, spec.arch, gpus, record.power_setting)
    load = {}
    if stats is not None:
        load = dict(
            running=stats.running,
            waiting=stats.waiting,
            waiting_prompt_tokens=stats.waiting_prompt_tokens,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_total=stats.kv_blocks_total,
            block_size=stats.block_size,
            tokens_per_s=stats.tokens_per_s,
            observed_at=stats.observed_at,
            cached_block_hashes=stats.cached_block_hashes,
            requests=stats.requests,
        )
    return ReplicaSnapshot(
        replica_id=record.replica_id,
        model=spec.model,
        pool=spec.pool,
        gpu_type=spec.gpu_type,
        node_id=record.node_id,
        state=record.state,
        prefill_tokens_per_s=prefill_tps,
        decode_step_s=decode_step_s,
        max_batch_tokens_per_s=max_tps,
        max_queue=spec.max_queue,
        **load,
    )


def build_view(
    state: FleetState, version: int, now: float, slo_classes: tuple[SloClass, ...], gpus_per_replica: dict[str, int]
) -> FleetView:
    """Every replica that holds or may take requests; `gpus_per_replica` is keyed by pool."""
    replicas = tuple(
        snapshot_of(r, gpus_per_replica.get(r.pool, 1)) for r in state.live() if r.serving
    )
    return FleetView(version=version, created_at=now, replicas=replicas, slo_classes=slo_classes)
