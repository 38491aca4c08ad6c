"""Frozen snapshots of the fleet that every policy decides over.

The controller builds a `FleetView` from what it observes; router agents, the
simulator and the unit tests hand the same types to the same policy code.
Units: seconds, tokens, KV blocks, tokens per second, watts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReplicaState(str, enum.Enum):
    """Lifecycle of a model replica, as the controller sees it."""

    STARTING = "starting"  # actor created, engine loading
    READY = "ready"  # serving and accepting new requests
    DRAINING = "draining"  # serving what it has, accepting nothing new
    UNHEALTHY = "unhealthy"  # missed health checks or made no progress; no new requests
    STOPPED = "stopped"  # terminal: shut down on purpose
    DEAD = "dead"  # terminal: died or was declared dead

    @property
    def terminal(self) -> bool:
        return self in (ReplicaState.STOPPED, ReplicaState.DEAD)


@dataclass(frozen=True)
class RequestStatus:
    """One request an engine holds, as the control plane sees it (migration, admin, recovery)."""

    request_id: str
    priority: int
    slo_class: str
    prompt_tokens: int
    output_tokens: int  # emitted so far, those a resumed request arrived with included
    max_tokens: int
    running: bool  # False: still waiting to be scheduled
    arrived_at: float  # wall-clock seconds the engine took it

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - self.output_tokens

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks its context fills (the last partial block counts)."""
        return -(-(self.prompt_tokens + self.output_tokens) // block_size)


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica's identity, speed and load at `observed_at` (wall-clock seconds)."""

    replica_id: str
    model: str
    pool: str
    gpu_type: str
    node_id: str
    state: ReplicaState
    # load, as the replica last reported it
    running: int = 0
    waiting: int = 0
    waiting_prompt_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    block_size: int = 16
    tokens_per_s: float = 0.0
    observed_at: float = 0.0
    # speed of this replica's GPU for its model, from the performance model (or measured)
    prefill_tokens_per_s: float = 1.0  # prompt tokens per second of one large prefill
    decode_step_s: float = 0.02  # one decode step at a typical batch
    max_batch_tokens_per_s: float = 1.0  # output tokens per second at full batch: capacity
    max_queue: int = 256  # waiting requests it accepts before refusing
    # prefix cache: chained block hashes the replica reported holding (see policies.block_hash)
    cached_block_hashes: frozenset[int] = field(default_factory=frozenset)
    requests: tuple[RequestStatus, ...] = ()  # every request it holds, as last reported

    @property
    def accepting(self) -> bool:
        return self.state is ReplicaState.READY and self.waiting < self.max_queue

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return min(1.0, self.kv_blocks_used / self.kv_blocks_total) if self.kv_blocks_total else 1.0


@dataclass(frozen=True)
class SloClass:
    """Latency targets of a class of requests; higher `priority` is more important."""

    name: str
    ttft_s: float
    tpot_s: float
    priority: int = 0


@dataclass(frozen=True)
class StoreSnapshot:
    """One node's KV-cache store: the blocks any replica on that node could load from it."""

    store_id: str
    node_id: str
    cached_block_hashes: frozenset[int] = field(default_factory=frozenset)  # see policies.block_hash
    capacity_bytes: int = 0
    used_bytes: int = 0


@dataclass(frozen=True)
class FleetView:
    """What router agents route over: every replica, one version of the truth.

    `version` grows by one each time the controller publishes; agents ignore views
    older than the one they hold.
    """

    version: int
    created_at: float
    replicas: tuple[ReplicaSnapshot, ...]
    slo_classes: tuple[SloClass, ...] = ()
    stores: tuple[StoreSnapshot, ...] = ()  # the KV-cache stores that answered, one per node at most
    # what a prompt block a replica can load from its node's store counts for, in [0, 1],
    # against one in its own prefix cache (routing's prefix scorer); 0 ignores the stores
    store_hit_weight: float = 0.0

    def replica(self, replica_id: str) -> ReplicaSnapshot | None:
        return next((r for r in self.replicas if r.replica_id == replica_id), None)

    def slo_class(self, name: str) -> SloClass | None:
        return next((c for c in self.slo_classes if c.name == name), None)


@dataclass(frozen=True)
class RoutingRequest:
    """What routing knows of a request: its model, size, prefix and class."""

    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[int, ...] = ()  # of its prompt, see policies.block_hash
    slo_class: str = "default"
    exclude: frozenset[str] = frozenset()  # replica ids not to use (failed, or the migration source)
