"""Small scenarios built in code, for the simulator's tests."""

from __future__ import annotations

import copy
from typing import Any

from bench.simulator.scenario import Scenario, parse_scenario


def scenario(**sections: Any) -> Scenario:
    """A two-pool fleet (2 H100 + 2 A40) under 40 s of the conv trace at 4x, with
    `sections` replacing whole top-level sections."""
    data: dict[str, Any] = {
        "name": "test",
        "fleet": {
            "models": [{"name": "m", "arch": "llama-2-7b", "tokenizer": "byte", "max_model_len": 4096}],
            "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 2, "max_replicas": 4},
                      {"name": "a40", "gpu_type": "A40", "model": "m", "replicas": 2, "max_replicas": 4}],
            "controller": {"control_period_s": 0.5},
        },
        "workload": {"trace": {"name": "conv", "window_s": [0, 40], "speedup": 4},
                     "slo_mix": {"interactive": 0.8, "batch": 0.2}},
        "simulation": {"seed": 5, "replica_start_s": 10},
    }
    data.update(copy.deepcopy(sections))
    return parse_scenario(data)
