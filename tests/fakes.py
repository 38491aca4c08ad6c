"""Fake actor handles and a fake clock for driving the controller by hand (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.engines.base import (
    EngineStats,
    GenerationRequest,
    RequestSnapshot,
    RequestStatus,
    SamplingSpec,
    UnknownRequest,
)
from actors.power import ActionOutcome, PowerCapabilities, PowerReading
from actors.replica import PrefetchResult, ReplicaInfo
from actors.replica_client import ReplicaPlacement
from actors.replica_spec import ReplicaSpec
from actors.router import RouterAgentInfo
from orchestrator.fleet_state import NodeObservation
from orchestrator.power_inputs import after
from policies.fleet_view import FleetView
from policies.gpu_catalog import gpu_spec
from policies.power_model import DEFAULT_COEFFICIENTS, UNCAPPED, GpuSetting, clock_range
from policies.power_snapshot import PowerAction


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def idle_stats(now: float, running: int = 0, requests: tuple[RequestStatus, ...] = ()) -> EngineStats:
    used = min(100, sum(r.kv_blocks(16) for r in requests))
    return EngineStats(running=running, waiting=0, waiting_prompt_tokens=0, kv_blocks_used=used, kv_blocks_total=100,
                       block_size=16, tokens_per_s=0.0, batch_size=running, computed_prompt_tokens=0,
                       cached_prompt_tokens=0, finished_requests=0, aborted_requests=0, observed_at=now,
                       requests=requests)


@dataclass
class FakeReplica:
    spec: ReplicaSpec
    placement: ReplicaPlacement
    clock: FakeClock
    start_error: Exception | None = None
    stats_error: Exception | None = None
    running: int = 0
    requests: tuple[RequestStatus, ...] = ()
    killed: bool = False
    shut_down: bool = False
    paused: bool = False
    tokens_per_snapshot: int = 4  # decoding progress between two snapshots
    prefetch_error: Exception | None = None
    prefetched: list[int] = field(default_factory=list)  # context lengths it was asked to warm
    handed_off: list[tuple[str, str]] = field(default_factory=list)
    _outputs: dict[str, int] = field(default_factory=dict)
    # power: `gpus` GPUs of its type, each drawing `draw_w` (None: idle) as its setting allows
    gpus: int = 1
    draw_w: float | None = None
    power_read_only: bool = False
    power_error: Exception | None = None  # raised by power()
    apply_error: Exception | None = None  # raised by apply_power()
    power_setting: GpuSetting = UNCAPPED
    power_actions: list[PowerAction] = field(default_factory=list)  # applied, in order

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    async def start(self, timeout_s: float) -> ReplicaInfo:
        if self.start_error:
            raise self.start_error
        return ReplicaInfo(self.replica_id, self.node_id, 1, 100, self.clock(), 0.1)

    @property
    def node_id(self) -> str:
        """The first node of its GPU type that the placement does not exclude."""
        avoided = dict(self.placement.label_selector).get("ray.io/node-id", "!in()")[4:-1].split(",")
        return next(n for n in (f"node-{self.spec.gpu_type}", f"node-{self.spec.gpu_type}-b") if n not in avoided)

    async def stats(self, timeout_s: float) -> EngineStats:
        if self.stats_error:
            raise self.stats_error
        return idle_stats(self.clock(), self.running, self.requests)

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        self.shut_down = True

    def _held(self, request_id: str) -> RequestStatus:
        held = next((r for r in self.requests if r.request_id == request_id), None)
        if held is None:
            raise UnknownRequest(request_id)
        return held

    async def snapshot(self, request_id: str, timeout_s: float = 5.0) -> RequestSnapshot:
        held = self._held(request_id)
        made = self._outputs[request_id] = self._outputs.get(request_id, held.output_tokens) + self.tokens_per_snapshot
        request = GenerationRequest(request_id, self.spec.model, tuple(range(held.prompt_tokens)),
                                    SamplingSpec(max_tokens=held.max_tokens), output_token_ids=tuple(range(made)))
        return RequestSnapshot(request, ())

    async def prefetch(self, request: GenerationRequest, timeout_s: float = 120.0) -> PrefetchResult:
        if self.prefetch_error:
            raise self.prefetch_error
        reused = self.prefetched[-1] if self.prefetched else 0
        self.prefetched.append(len(request.context_token_ids))
        return PrefetchResult(len(request.context_token_ids), reused, 0.01)

    async def handoff(self, request_id: str, target: str, target_client=None,
                      timeout_s: float = 5.0) -> RequestSnapshot:
        snapshot = await self.snapshot(request_id)
        self.handed_off.append((request_id, target))
        self.requests = tuple(r for r in self.requests if r.request_id != request_id)
        return snapshot

    def kill(self) -> None:
        self.killed = True

    async def pause(self, timeout_s: float = 10.0) -> None:
        self.paused = True

    async def power(self, timeout_s: float) -> tuple[PowerReading, ...]:
        if self.power_error:
            raise self.power_error
        gpu, setting = gpu_spec(self.spec.gpu_type), self.power_setting
        clocks = clock_range(gpu)
        draw = gpu.idle_watts if self.draw_w is None else self.draw_w
        if setting.locked_clock_mhz is not None:  # dynamic power falls with the clock
            scale = DEFAULT_COEFFICIENTS.clock_power_scale(setting.locked_clock_mhz / clocks.max_mhz)
            draw = gpu.idle_watts + (draw - gpu.idle_watts) * scale
        limit = gpu.tdp_watts if setting.power_limit_w is None else setting.power_limit_w
        clock = setting.locked_clock_mhz or clocks.max_mhz
        return tuple(PowerReading(i, f"fake {gpu.name}", min(draw, limit), limit, gpu.tdp_watts,
                                  (gpu.min_power_limit_watts, gpu.tdp_watts), clock, (clocks.min_mhz, clocks.max_mhz),
                                  setting.locked_clock_mhz, self.clock())
                     for i in range(self.gpus))

    async def power_capabilities(self, timeout_s: float = 5.0) -> PowerCapabilities:
        ro = self.power_read_only
        return PowerCapabilities(ro, not ro, not ro, "fake read-only GPU" if ro else "")

    async def apply_power(self, action: PowerAction, timeout_s: float) -> ActionOutcome:
        if self.apply_error:
            raise self.apply_error
        if self.power_read_only:
            return ActionOutcome(action, False, "fake read-only GPU: nothing applied")
        self.power_setting = after(self.power_setting, action)
        self.power_actions.append(action)
        return ActionOutcome(action, True)


@dataclass
class FakeRouter:
    agent_id: str
    views: list[FleetView] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    settings_version: int = 0
    settings: dict = field(default_factory=dict)

    async def update_view(self, view: FleetView, timeout_s: float = 2.0) -> RouterAgentInfo:
        self.views.append(view)
        return RouterAgentInfo(self.agent_id, view.version, len(view.replicas), 0, max(0, len(self.peers) - 1), 0,
                               self.settings_version)

    async def set_peers(self, agent_ids: list[str], timeout_s: float = 5.0) -> None:
        self.peers = list(agent_ids)

    async def configure(self, version: int, settings, timeout_s: float = 5.0) -> RouterAgentInfo:
        self.settings_version, self.settings = version, dict(settings)
        return RouterAgentInfo(self.agent_id, 0, 0, 0, max(0, len(self.peers) - 1), 0, version)


def nodes_for(*gpu_types: str) -> list[NodeObservation]:
    """A head node plus two nodes per GPU type, named as FakeReplica places replicas."""
    nodes = [NodeObservation("node-head", "10.0.0.1", True, (("CPU", 8.0),), is_head=True)]
    for t in gpu_types:
        for suffix in ("", "-b"):
            nodes.append(NodeObservation(f"node-{t}{suffix}", f"10.0.1.{len(nodes)}", True,
                                         (("CPU", 8.0), ("GPU", 8.0), (f"accelerator_type:{t}", 1.0))))
    return nodes


@dataclass
class FakeAutoscaler:
    """Records the resource demand a controller sends Ray's autoscaler (`orchestrator.autoscaler`)."""

    demands: list[tuple[dict[str, float], ...]] = field(default_factory=list)

    def __call__(self, bundles) -> None:
        self.demands.append(tuple(dict(b) for b in bundles))
