"""`Simulation`: one scenario variant, wired up and run to the end in virtual time.

The pieces and who plays whom: `SimFleet` is the replica manager and the replicas,
`RouterPool` the router agents, `SimIngress` the OpenAI ingress, the control tick the
controller, `bench.simulator.hooks` the policies to come. Every random draw comes from
generators seeded by `simulation.seed` (workload and baseline scorers apart, so the same
seed gives every variant the same requests); event order is total; so a run is a pure
function of its scenario.

The run ends when the workload is exhausted and every request has ended (or at
`simulation.max_duration_s`).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from actors.engines.sim_core import Progress
from actors.power import ActionOutcome, PowerReading
from bench.simulator.baselines import scorers_for
from bench.simulator.events import EventLoop, Priority
from bench.simulator.fleet import PoolUsage, SimFleet
from bench.simulator.hooks import HOOKS, ControlHook, Tick
from bench.simulator.ingress import Disruption, SimIngress
from bench.simulator.prompts import PromptNamer
from bench.simulator.records import RecordBook
from bench.simulator.replica import SimulatedReplica
from bench.simulator.routers import RouterPool
from bench.simulator.scenario import Scenario, ScenarioError, TimelineEvent
from bench.simulator.workload import Arrival, LogNormal, PrefixGroups, SyntheticWorkload, TraceWorkload
from policies.fleet_view import FleetView, ReplicaState
from policies.power_snapshot import PowerAction
from policies.routing import Router


@dataclass(frozen=True)
class Sample:
    """The fleet at one control tick, from the view just published."""

    t: float
    ready: int  # READY replicas
    running: int  # requests in running batches
    waiting: int  # requests queued on replicas
    kv_usage: float  # mean over serving replicas, in [0, 1]
    tokens_per_s: float  # output tokens per second, fleet-wide
    in_flight: int  # requests the ingress holds (queued for admission included)
    power_w: float | None = None  # the fleet's GPUs' draw over the last control period (when tracked)
    budget_w: float | None = None  # the cluster power budget in force


@dataclass
class FaultRecord:
    """One fault of the timeline and how the fleet got over it."""

    event: TimelineEvent
    replicas_lost: tuple[str, ...]
    disruption: Disruption
    pools: tuple[str, ...]
    restored_at: float | None = None  # every pool hit is back at its desired READY size


@dataclass(frozen=True)
class SimPerf:
    """How the simulator itself ran (wall-clock seconds, this machine)."""

    wall_s: float
    cpu_s: float  # this process's CPU time over the run (the machine may be shared)
    events: int
    virtual_s: float
    steps: int  # engine steps simulated
    model_calls: int  # performance-model evaluations (the rest were memoised or closed-form)
    peak_rss_mib: float
    replicas: int  # launched over the run

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        """Virtual seconds simulated per wall second."""
        return self.virtual_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_speedup(self) -> float:
        """Virtual seconds simulated per CPU second (what the run would reach alone on a core)."""
        return self.virtual_s / self.cpu_s if self.cpu_s > 0 else 0.0


@dataclass(frozen=True)
class SimResult:
    scenario: Scenario
    variant: str
    records: RecordBook
    samples: tuple[Sample, ...]
    usage: tuple[PoolUsage, ...]
    faults: tuple[FaultRecord, ...]
    migrations: tuple[Disruption, ...]
    preemptions: int
    clipped: int  # workload requests shortened to fit the model's context
    perf: SimPerf


class Simulation:
    """One scenario variant. `hooks` are added after the scenario's own."""

    def __init__(self, scenario: Scenario, variant: str = "base", hooks: Sequence[ControlHook] = ()):
        self.scenario, self.variant = scenario, variant
        config = scenario.fleet
        self.loop = EventLoop()
        self.records = RecordBook()
        seed = scenario.simulation.seed
        routing = scenario.routing or config.routing
        router = Router(routing.weights, routing.load_guard,
                        scorers=scorers_for(np.random.default_rng([seed, 1])))
        self.routers = RouterPool(self.loop, router, config.routing.agents,
                                  config.routing.share_interval_s, config.routing.booking_ttl_s)
        self._cached_hashes = routing.weights.get("prefix", 0) > 0
        # Without shared prefixes every prompt block is the request's own; then, unless
        # the prefix scorer reads the engines' caches, they may name blocks lazily.
        unique = scenario.workload.prefixes is None and not self._cached_hashes
        self.fleet = SimFleet(config, self.loop, self._on_progress,
                              start_s=scenario.simulation.replica_start_s,
                              gpus_per_node=scenario.simulation.gpus_per_node, unique_prompts=unique)
        namers = {m.name: PromptNamer(m.name, m.block_size) for m in config.models}
        self.ingress = SimIngress(self.loop, self.fleet, self.routers, namers, self.records,
                                  admission_timeout_s=config.server.admission_timeout_s,
                                  retry_pause_s=scenario.simulation.retry_pause_s,
                                  max_resumes=scenario.simulation.max_resumes)
        self.workload = build_workload(scenario, np.random.default_rng([seed, 0]))
        self.hooks = [HOOKS[h.name](h.settings, config) for h in scenario.hooks] + list(hooks)
        self._requests = any(h.observes_requests for h in self.hooks)
        self._arrivals = iter(self.workload.arrivals())
        self.budget_w = config.power.cluster_budget_w  # power events may change it
        self._power = (self.budget_w is not None or any(e.power for e in scenario.timeline)
                       or any(h.name == "power" for h in scenario.hooks))  # sample the fleet's draw
        self._exhausted = False
        self._version = 0
        self._tick_state: Tick | None = None
        self._migration_wave: Disruption | None = None
        self.samples: list[Sample] = []
        self.faults: list[FaultRecord] = []
        self.migrations: list[Disruption] = []
        self.actions = _Actions(self)

    def run(self) -> SimResult:
        began, began_cpu = time.perf_counter(), time.process_time()
        with _rare_collections():
            self.fleet.start()
            self.loop.at(0.0, self._tick, Priority.CONTROL)
            for event in self.scenario.timeline:
                self.loop.at(event.at, lambda e=event: self._apply(e), Priority.FAULT)
            self._next_arrival()
            limit = self.scenario.simulation.max_duration_s
            self.loop.run(until=limit if limit is not None else float("inf"))
        self.routers.stop_sharing()
        for replica in self.fleet.replicas.values():
            replica.sync()
        wall, cpu = time.perf_counter() - began, time.process_time() - began_cpu
        replicas = self.fleet.replicas.values()
        perf = SimPerf(wall, cpu, self.loop.handled, self.loop.now, sum(r.steps for r in replicas),
                       sum(t.model_calls for t in self.fleet.timers),
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(replicas))
        return SimResult(self.scenario, self.variant, self.records, tuple(self.samples),
                         self.fleet.usage(), tuple(self.faults), tuple(self.migrations),
                         sum(r.preemptions for r in replicas), self.workload.clipped, perf)

    # arrivals and progress -------------------------------------------------------------------

    def _next_arrival(self) -> None:
        arrival = next(self._arrivals, None)
        if arrival is None:
            self._exhausted = True
            return
        self.loop.at(arrival.time_s, lambda: self._arrive(arrival), Priority.ARRIVAL)

    def _arrive(self, arrival: Arrival) -> None:
        self.ingress.arrive(arrival, self.scenario.model_name)
        self._next_arrival()

    def _on_progress(self, replica: SimulatedReplica, progress: Progress) -> None:
        self.ingress.on_progress(replica, progress)

    @property
    def finished(self) -> bool:
        return self._exhausted and self.ingress.in_flight == 0

    # the control tick --------------------------------------------------------------------------

    def _tick(self) -> None:
        self.fleet.observe(self._cached_hashes, self._requests)
        self.fleet.reconcile()
        self._version += 1
        view = self.fleet.view(self._version)
        self.routers.publish(view)
        self._tick_state = Tick(self.loop.now, view, self.fleet.state, self.scenario.fleet)
        self._migration_wave = None
        for hook in self.hooks:
            hook.on_tick(self._tick_state, self.actions)
        self.samples.append(self._sample(view))
        self._check_restored()
        if self.finished:
            self.routers.stop_sharing()
        else:
            self.loop.after(self.scenario.fleet.controller.control_period_s, self._tick, Priority.CONTROL)

    def _sample(self, view: FleetView) -> Sample:
        serving = view.replicas
        return Sample(self.loop.now, sum(r.state is ReplicaState.READY for r in serving),
                      sum(r.running for r in serving), sum(r.waiting for r in serving),
                      float(np.mean([r.kv_usage for r in serving])) if serving else 0.0,
                      sum(r.tokens_per_s for r in serving), self.ingress.in_flight,
                      self.fleet.draw_w() if self._power else None, self.budget_w)

    def _check_restored(self) -> None:
        for fault in self.faults:
            if fault.restored_at is None and all(
                    sum(r.state is ReplicaState.READY for r in self.fleet.state.in_pool(p))
                    >= self.fleet.desired[p] for p in fault.pools):
                fault.restored_at = self.loop.now

    # the timeline ------------------------------------------------------------------------------

    def _apply(self, event: TimelineEvent) -> None:
        try:
            if event.kill_replica is not None:
                self._lose({event.kill_replica: self.fleet.kill_replica(event.kill_replica, "killed")}, event)
            elif event.kill_node is not None:
                self._lose(self.fleet.kill_node(event.kill_node), event)
            elif event.set_replicas is not None:
                self.fleet.set_desired(event.set_replicas.pool, event.set_replicas.replicas)
            elif event.drain is not None:
                self.fleet.drain(event.drain)
            elif event.power is not None and event.power.budget_watts is not None:
                self.budget_w = event.power.budget_watts  # what the hooks defend from now on
        except (KeyError, ValueError) as e:
            raise ScenarioError(f"timeline event at {event.at}s ({event.kind}): {e}") from None
        if self._tick_state is not None:
            for hook in self.hooks:
                hook.on_event(event, self._tick_state, self.actions)

    def _lose(self, lost: dict, event: TimelineEvent) -> None:
        disruption = Disruption(self.loop.now)
        pools = tuple(sorted({self.fleet.replicas[rid].record.pool for rid in lost}))
        self.faults.append(FaultRecord(event, tuple(lost), disruption, pools))
        died_at = self.loop.now
        for replica_id, snapshots in lost.items():
            self.loop.after(event.detect_s, lambda s=snapshots, r=replica_id:
                            self.ingress.replica_lost(s, r, died_at, disruption), Priority.FAULT)

    def migration_wave(self) -> Disruption:
        """The migrations of this tick, counted together."""
        if self._migration_wave is None:
            self._migration_wave = Disruption(self.loop.now)
            self.migrations.append(self._migration_wave)
        return self._migration_wave


class _Actions:
    """`hooks.Actions` over a simulation."""

    def __init__(self, sim: Simulation):
        self._sim = sim

    def migrate(self, request_id: str, to_replica: str, copy_s: float | None = None) -> bool:
        return self._sim.ingress.migrate(request_id, to_replica, self._sim.migration_wave(), copy_s)

    def set_replicas(self, pool: str, replicas: int) -> None:
        self._sim.fleet.set_desired(pool, replicas)

    def drain(self, replica_id: str) -> None:
        self._sim.fleet.drain(replica_id)

    def read_power(self, replica_id: str) -> tuple[PowerReading, ...]:
        return self._sim.fleet.replicas[replica_id].read_power()

    def apply_power(self, action: PowerAction) -> ActionOutcome:
        return self._sim.fleet.apply_power(action.replica_id, action)


@contextlib.contextmanager
def _rare_collections(young: int = 100_000) -> Iterator[None]:
    """Run the body with Python's cyclic garbage collector triggered every `young` new
    container objects (not 700) and blind to those built before. A run allocates millions
    of short-lived objects and hardly any cycles; with the default thresholds collections
    took about a tenth of it. Changes no result."""
    threshold, froze = gc.get_threshold(), gc.get_freeze_count() == 0  # (never thaw a caller's)
    if froze:
        gc.freeze()
    gc.set_threshold(young, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if froze:
            gc.unfreeze()


def build_workload(scenario: Scenario, rng: np.random.Generator) -> TraceWorkload | SyntheticWorkload:
    """The scenario's workload source, seeded with `rng`."""
    w, config = scenario.workload, scenario.fleet
    model = config.model(scenario.model_name)
    prefixes = None
    if w.prefixes is not None:
        p = w.prefixes
        lo, hi = (p.tokens, p.tokens) if isinstance(p.tokens, int) else p.tokens
        lengths = tuple(int(x) for x in rng.integers(lo, hi + 1, size=p.groups))
        prefixes = PrefixGroups(lengths, p.share, p.zipf)
    common = dict(max_model_len=model.max_model_len, rng=rng, prefixes=prefixes,
                  slo_mix=w.slo_mix or {config.default_slo_class: 1.0})
    if w.trace is not None:
        t = w.trace
        return TraceWorkload(t.name, window_s=t.window_s, speedup=t.speedup, max_requests=t.max_requests,
                             duration_s=t.duration_s, jitter_s=t.jitter_s, **common)
    s = w.synthetic

    def law(c):
        return LogNormal(c.median, c.sigma, c.max) if c is not None else None

    return SyntheticWorkload(s.rate, duration_s=s.duration_s, max_requests=s.max_requests,
                             burst_every_s=s.burst_every_s, burst_s=s.burst_s,
                             burst_factor=s.burst_factor, lengths_trace=s.lengths_trace,
                             prompt=law(s.prompt), output=law(s.output), **common)
