"""The power capability's seams: a sim replica's GPUs read and capped through the replica,
routing speeds under a cap, the spec carrying the backend, and placement's default budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from actors.engines.base import GenerationRequest, SamplingSpec
from actors.replica import ModelReplica, _power_backend
from orchestrator.config import parse_config
from orchestrator.replica_manager import spec_for
from orchestrator.view_builder import replica_speed
from policies.perfmodel import MODEL_PRESETS
from policies.power_model import UNCAPPED, GpuSetting
from policies.power_snapshot import PowerAction, PowerOp

CONFIG = {
    "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte"}],
    "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "engine_args": {"time_scale": 0.0}}],
}


def sim_spec(**power):
    config = parse_config(CONFIG | {"power": power})
    return spec_for(config, config.pools[0], "h100-0a1b2c3d")


def test_the_spec_carries_the_fleets_power_backend():
    assert sim_spec().power_backend == "sim" and sim_spec(backend="nvml").power_backend == "nvml"


async def test_a_sim_replica_reports_its_gpu_and_a_cap_slows_its_steps():
    replica = ModelReplica(sim_spec())
    await replica.start()
    try:
        [reading] = replica.power()
        assert reading.limit_w == reading.default_limit_w == 700 and reading.limit_range_w == (200, 700)
        assert replica.power_capabilities().can_lock_clocks
        request = GenerationRequest("r", "m", tuple(97 + i % 26 for i in range(1500)), SamplingSpec(max_tokens=1))
        before = replica.engine.power.expected(_prefill(request)).seconds
        outcome = replica.apply_power(PowerAction("h100-0a1b2c3d", PowerOp.SET_POWER_LIMIT, 350, "test"))
        assert outcome.ok and replica.power()[0].limit_w == 350
        assert replica.engine.power.expected(_prefill(request)).seconds > 1.2 * before
        async for _ in replica.generate(request):
            pass
        assert replica.power()[0].draw_w > reading.draw_w  # the prefill it ran shows in the draw
    finally:
        await replica.shutdown()


def _prefill(request):
    from policies.perfmodel import BatchShape

    return BatchShape.from_requests([(len(request.prompt_token_ids), 0)])


def test_a_vllm_replica_without_nvml_reports_no_power_and_says_why():
    spec = replace(sim_spec(), engine="vllm")
    backend, why = _power_backend(spec, engine=None)
    assert backend is None and "nvml power backend" in why


def test_routing_speeds_follow_the_cap_and_are_unchanged_uncapped():
    arch = MODEL_PRESETS["llama-2-7b"]
    free = replica_speed("H100", arch, 1)
    assert replica_speed("H100", arch, 1, UNCAPPED) == free
    capped = replica_speed("H100", arch, 1, GpuSetting(power_limit_w=300))
    assert capped[0] < 0.8 * free[0] and capped[1] > free[1] and capped[2] < free[2]
    assert capped[1] / free[1] == pytest.approx(free[2] / capped[2])


def test_placement_defaults_its_power_budget_to_the_oversubscribed_cluster_budget():
    base = CONFIG | {"power": {"cluster_budget_w": 7000, "oversubscription": 1.3}}
    assert parse_config(base).placement_power_budget_w() == pytest.approx(9100)
    assert parse_config(base | {"placement": {"power_budget_watts": 8000}}).placement_power_budget_w() == 8000
    assert parse_config(CONFIG).placement_power_budget_w() is None
