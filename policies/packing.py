"""Placing a planned mix of replicas onto nodes: by GPU memory, across failure domains,
within a power budget; what to ask the autoscaler for and which nodes fall idle.

The solver (`policies.placement`) says how many replicas each pool gets; this says where
they go. The algorithm, one pool at a time, largest replicas first:
1. Keep the pool's current replicas where they are (moving one costs a migration). A
   pool that shrinks gives up replicas from its most crowded zone first and, within
   it, from the emptiest node, so whole nodes fall idle and can be released.
2. Place each new replica in the zone that holds the fewest of its pool (spread), and
   there on the node it fills most tightly (best fit by GPU memory; a used node before
   an empty one), so that replicas pack onto few nodes.
3. What fits nowhere goes onto new nodes of the GPU type's `NodeShape` — the nodes to
   ask the autoscaler for. Nodes left with no replica are idle, to be released.
A replica needs `gpus` GPUs with `memory_bytes_per_gpu` free on each; single-GPU
replicas small enough share a GPU. Power counts the TDP of every GPU that hosts a
replica; a replica that would push it past the budget is left unplaced, with the reason.
Replicas of CPU pools (no GPU) are not packed here.

Units: bytes, watts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from policies.gpu_catalog import GPU_CATALOG, gpu_spec
from policies.transformer_spec import TransformerSpec

__all__ = ["CurrentReplica", "NodeRequest", "NodeShape", "NodeSnapshot", "PackingPlan",
           "Placement", "ReplicaShape", "Unplaced", "pack", "replica_shape"]

# Ray needs a positive amount of a resource in a bundle; this much of
# `accelerator_type:<TYPE>` (1 per node) pins a bundle to the type without using it up.
_ACCELERATOR_SHARE = 0.001


@dataclass(frozen=True)
class NodeSnapshot:
    """A live node: its GPUs, their memory, and its failure domain."""

    node_id: str
    gpu_type: str
    gpus: int
    gpu_memory_bytes: int  # per GPU
    zone: str = ""  # failure domain (zone label); "" when unknown


@dataclass(frozen=True)
class NodeShape:
    """What one new node of a GPU type brings (a KubeRay worker group's pod)."""

    gpu_type: str
    gpus: int
    gpu_memory_bytes: int  # per GPU
    group: str = ""  # the worker group that makes such nodes


@dataclass(frozen=True)
class ReplicaShape:
    """What one replica of a pool needs: `gpus` GPUs of `gpu_type`, each with
    `memory_bytes_per_gpu` free (weights + KV budget on that GPU)."""

    pool: str
    gpu_type: str
    gpus: int
    memory_bytes_per_gpu: int

    def __post_init__(self) -> None:
        if self.gpu_type not in GPU_CATALOG:
            raise ValueError(f"pool {self.pool!r}: unknown GPU type {self.gpu_type!r} "
                             f"(known: {', '.join(sorted(GPU_CATALOG))})")
        if self.gpus < 1 or self.memory_bytes_per_gpu < 1:
            raise ValueError(f"pool {self.pool!r}: a packed replica needs gpus >= 1 and "
                             f"memory_bytes_per_gpu >= 1")


def replica_shape(pool: str, spec: TransformerSpec, gpu_type: str, gpus: int, *,
                  kv_budget_tokens: int | None = None, memory_fraction: float = 0.9) -> ReplicaShape:
    """A replica's memory per GPU: its weight shard plus `kv_budget_tokens` of KV, or — with
    no KV budget — `memory_fraction` of the GPU (what vLLM takes by default)."""
    memory = gpu_spec(gpu_type).memory_bytes
    if kv_budget_tokens is None:
        need = int(memory_fraction * memory)
    else:
        need = spec.weight_bytes_per_gpu(gpus) + kv_budget_tokens * spec.kv_bytes_per_token_per_gpu(gpus)
    return ReplicaShape(pool, gpu_type, gpus, need)


@dataclass(frozen=True)
class CurrentReplica:
    """A replica that runs now, and where."""

    replica_id: str
    pool: str
    node_id: str


@dataclass(frozen=True)
class Placement:
    """One replica of the plan on one node (`new`: to start; node_id of a missing node
    starts with "new:")."""

    replica: str  # its id; new ones are named "<pool>+<n>"
    pool: str
    node_id: str
    gpu_indices: tuple[int, ...]
    new: bool


@dataclass(frozen=True)
class NodeRequest:
    """Nodes of one GPU type to ask the autoscaler for."""

    shape: NodeShape
    count: int


@dataclass(frozen=True)
class Unplaced:
    pool: str
    count: int
    reason: str


@dataclass(frozen=True)
class PackingPlan:
    """Where every planned replica goes, what to start, stop, request and release."""

    placements: tuple[Placement, ...]
    remove: tuple[str, ...]  # current replicas to drain (pools that shrink)
    missing_nodes: tuple[NodeRequest, ...]
    idle_nodes: tuple[str, ...]  # live nodes left with no replica
    unplaced: tuple[Unplaced, ...]
    power_watts: float  # Σ TDP of GPUs hosting a replica
    shapes: Mapping[str, ReplicaShape] = field(repr=False, default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.unplaced

    def on_node(self, node_id: str) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.node_id == node_id)

    def resource_bundles(self) -> tuple[dict[str, float], ...]:
        """One Ray resource bundle per planned replica, for `ray.autoscaler.sdk.
        request_resources(bundles=...)` (the whole demand, not an increment)."""
        bundles = []
        for p in self.placements:
            shape = self.shapes[p.pool]
            share = shape.gpus if shape.gpus > 1 else _gpu_share(shape)
            bundles.append({"GPU": share, f"accelerator_type:{shape.gpu_type}": _ACCELERATOR_SHARE})
        return tuple(bundles)


def _gpu_share(shape: ReplicaShape) -> float:
    memory = gpu_spec(shape.gpu_type).memory_bytes
    per_gpu = max(1, memory // shape.memory_bytes_per_gpu)
    return 1.0 if per_gpu == 1 else round(1.0 / per_gpu, 4)


@dataclass
class _Node:
    """A node while packing: free bytes per GPU and what it holds."""

    node_id: str
    gpu_type: str
    zone: str
    free: list[int]
    memory: int
    missing: bool = False
    held: list[str] = field(default_factory=list)

    def fit(self, shape: ReplicaShape) -> tuple[int, ...] | None:
        """The tightest GPUs with room for the replica, or None."""
        if shape.gpu_type != self.gpu_type:
            return None
        room = sorted((f, i) for i, f in enumerate(self.free) if f >= shape.memory_bytes_per_gpu)
        if len(room) < shape.gpus:
            return None
        return tuple(i for _, i in room[:shape.gpus])

    def take(self, gpus: tuple[int, ...], shape: ReplicaShape, replica: str) -> int:
        """Commit the replica; returns how many GPUs it is the first on (for power)."""
        fresh = sum(self.free[i] == self.memory for i in gpus)
        for i in gpus:
            self.free[i] -= shape.memory_bytes_per_gpu
        self.held.append(replica)
        return fresh


def pack(targets: Mapping[str, int], shapes: Mapping[str, ReplicaShape],
         nodes: Sequence[NodeSnapshot], current: Sequence[CurrentReplica] = (),
         node_shapes: Mapping[str, NodeShape] | None = None,
         power_budget_watts: float | None = None) -> PackingPlan:
    """Place `targets` (pool -> replicas) of the pools in `shapes` onto `nodes` (see the
    module's note); `node_shapes` (GPU type -> NodeShape) says what a new node brings."""
    missing_shape = sorted(set(targets) - set(shapes))
    if missing_shape:
        raise ValueError(f"no ReplicaShape for pool(s) {missing_shape}")
    node_shapes = node_shapes or {}
    live = {n.node_id: _Node(n.node_id, n.gpu_type, n.zone, [n.gpu_memory_bytes] * n.gpus,
                             n.gpu_memory_bytes) for n in nodes}
    state = _Packing(live, node_shapes, power_budget_watts)
    remove = state.keep(targets, shapes, current)
    order = sorted(targets, key=lambda p: (-shapes[p].gpus * shapes[p].memory_bytes_per_gpu, p))
    for pool in order:
        state.place_new(pool, shapes[pool], targets[pool])
    used = {p.node_id for p in state.placements}
    return PackingPlan(
        tuple(state.placements), tuple(remove), state.requests(),
        tuple(sorted(n for n in live if n not in used)), tuple(state.unplaced),
        state.power, dict(shapes))


class _Packing:
    """The mutable state of one `pack` call."""

    def __init__(self, live: dict[str, _Node], node_shapes: Mapping[str, NodeShape],
                 budget: float | None) -> None:
        self.live, self.node_shapes, self.budget = live, node_shapes, budget
        self.extra: list[_Node] = []  # nodes to request
        self.placements: list[Placement] = []
        self.unplaced: list[Unplaced] = []
        self.power = 0.0

    def keep(self, targets: Mapping[str, int], shapes: Mapping[str, ReplicaShape],
             current: Sequence[CurrentReplica]) -> list[str]:
        remove = [r.replica_id for r in current if r.pool not in targets]
        for pool, target in targets.items():
            mine = [r for r in current if r.pool == pool and r.node_id in self.live]
            remove += [r.replica_id for r in current if r.pool == pool and r.node_id not in self.live]
            while len(mine) > target:
                zones = Counter(self.live[r.node_id].zone for r in mine)
                per_node = Counter(r.node_id for r in mine)
                victim = max(mine, key=lambda r: (zones[self.live[r.node_id].zone],
                                                  -per_node[r.node_id], r.replica_id))
                mine.remove(victim)
                remove.append(victim.replica_id)
            for r in mine:
                node = self.live[r.node_id]
                gpus = node.fit(shapes[pool]) or tuple(range(min(shapes[pool].gpus, len(node.free))))
                self.power += node.take(gpus, shapes[pool], r.replica_id) * _tdp(node.gpu_type)
                self.placements.append(Placement(r.replica_id, pool, node.node_id, gpus, False))
        return remove

    def place_new(self, pool: str, shape: ReplicaShape, target: int) -> None:
        have = sum(p.pool == pool for p in self.placements)
        for n in range(have, target):
            reason = self._place_one(pool, shape, f"{pool}+{n - have + 1}")
            if reason:
                self.unplaced.append(Unplaced(pool, target - n, reason))
                return

    def _place_one(self, pool: str, shape: ReplicaShape, name: str) -> str:
        spot = self._best(pool, shape, list(self.live.values()) + self.extra)
        if spot is None:
            node = self._new_node(shape)
            if isinstance(node, str):
                return node
            spot = (node, node.fit(shape))
        node, gpus = spot
        fresh = sum(node.free[i] == node.memory for i in gpus)
        if self.budget is not None and self.power + fresh * _tdp(shape.gpu_type) > self.budget + 1e-6:
            return (f"power budget {self.budget:g} W: {self.power:g} W used, a {shape.gpu_type} "
                    f"replica adds {fresh * _tdp(shape.gpu_type):g} W")
        if node.missing and node not in self.extra:
            self.extra.append(node)
        self.power += node.take(gpus, shape, name) * _tdp(shape.gpu_type)
        self.placements.append(Placement(name, pool, node.node_id, gpus, True))
        return ""

    def _best(self, pool: str, shape: ReplicaShape, nodes: list[_Node]):
        zones = Counter(self._zone(p.node_id) for p in self.placements if p.pool == pool)
        best, best_key = None, None
        for node in nodes:
            gpus = node.fit(shape)
            if gpus is None:
                continue
            left = sum(node.free[i] for i in gpus) - shape.gpus * shape.memory_bytes_per_gpu
            key = (zones[node.zone], left, -len(node.held), node.missing, node.node_id)
            if best_key is None or key < best_key:
                best, best_key = (node, gpus), key
        return best

    def _zone(self, node_id: str) -> str:
        node = self.live.get(node_id) or next(n for n in self.extra if n.node_id == node_id)
        return node.zone

    def _new_node(self, shape: ReplicaShape) -> _Node | str:
        ns = self.node_shapes.get(shape.gpu_type)
        if ns is None:
            return (f"no node with room for a {shape.gpu_type} replica and no NodeShape to "
                    f"request one")
        node = _Node(f"new:{shape.gpu_type}:{sum(n.gpu_type == shape.gpu_type for n in self.extra) + 1}",
                     shape.gpu_type, "", [ns.gpu_memory_bytes] * ns.gpus, ns.gpu_memory_bytes, True)
        if node.fit(shape) is None:
            return (f"a replica needs {shape.gpus} GPU(s) with {shape.memory_bytes_per_gpu} bytes "
                    f"each; a new {shape.gpu_type} node has {ns.gpus} of {ns.gpu_memory_bytes} bytes")
        return node

    def requests(self) -> tuple[NodeRequest, ...]:
        counts = Counter(n.gpu_type for n in self.extra)
        return tuple(NodeRequest(self.node_shapes[t], c) for t, c in sorted(counts.items()))


def _tdp(gpu_type: str) -> float:
    return gpu_spec(gpu_type).tdp_watts
