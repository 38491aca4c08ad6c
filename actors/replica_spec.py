"""What a `ModelReplica` is asked to be: its identity, its model and its engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.perfmodel import TransformerSpec


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to build its engine; the controller fills it from config.

    `engine` names the implementation ("vllm" or "sim"); only `actors.engines.make_engine`
    looks at it, so nothing else in the control plane depends on which engine runs.
    """

    replica_id: str
    pool: str
    model: str
    gpu_type: str
    engine: str
    arch: TransformerSpec
    tokenizer: str  # "byte" or a tokenizer directory
    model_path: str | None = None  # checkpoint directory (vllm)
    max_model_len: int = 2048  # tokens
    block_size: int = 16  # tokens per KV block
    max_queue: int = 256  # waiting requests accepted before refusing
    engine_args: dict[str, Any] = field(default_factory=dict)
    # "nvml": read and cap the replica's GPUs through NVML; "sim": simulated GPUs only (a
    # sim engine's always are; a vLLM replica then reports no power)
    power_backend: str = "sim"

    @property
    def actor_name(self) -> str:
        return replica_actor_name(self.replica_id)


def replica_actor_name(replica_id: str) -> str:
    """The Ray actor name of a replica, in the fleet's namespace."""
    return f"replica:{replica_id}"
