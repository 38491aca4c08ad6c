"""Keeps one KV-cache store on every alive node and the cluster-wide index of what they hold.

One `update()` per controller tick: start a store on each alive node that has none
(adopting one a former controller started), forget the stores of dead nodes, and
poll every store's report in parallel (the held hashes come as changes since the
last poll). A store that is dead, or silent for `MISSED_POLLS_DEAD` polls, loses its
entry in the index at once (requests carry on with recompute) and a new one is
started on its node. The index goes into the fleet view (`snapshots`), so routing
can count blocks loadable from a replica's own node; the admin API reads `status`.

Replicas learn how to reach the stores from `KVLinkSettings`, which
`replica_launcher` puts in the environment of every replica it starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from actors.kv_link import ENV_VAR, KVLinkSettings
from actors.kvstore import StoreReport, StoreSettings
from actors.kvstore_client import KVStoreClient, KVStoreUnavailable
from actors.replica_client import ReplicaPlacement
from actors.replica_spec import ReplicaSpec
from orchestrator.config import FleetConfig, KVStoreConfig, resolve_path
from orchestrator.fault_log import FaultLog
from orchestrator.fleet_state import FleetState
from orchestrator.metrics import MetricsRegistry
from orchestrator.replica_manager import Launcher
from policies.fleet_view import StoreSnapshot

log = logging.getLogger(__name__)

MISSED_POLLS_DEAD = 8  # consecutive unanswered polls of a store that once answered
START_GRACE_POLLS = 120  # polls a new store may take to answer for the first time
# Of a node's Ray object store, the most a KV store may fill: writers `ray.put` into it,
# and a full object store would make them wait (or spill) instead of the KV store evicting.
OBJECT_STORE_SHARE = 0.8


class StoreHandle(Protocol):
    """What the manager needs of a store; `KVStoreClient` in production, a fake in tests."""

    node_id: str
    store_id: str

    async def report(self, since_version: int = -1, timeout_s: float = 2.0) -> StoreReport: ...
    def kill(self) -> None: ...


StoreLauncher = Callable[[str, StoreSettings], StoreHandle]


def ray_store_launcher(namespace: str) -> StoreLauncher:
    """Adopt the store already running on the node (a restarted controller), else start one."""
    def launch(node_id: str, settings: StoreSettings) -> StoreHandle:
        found = KVStoreClient.lookup(node_id, namespace)
        if found is not None:
            return found
        try:
            return KVStoreClient.create(node_id, namespace, settings)
        except ValueError:  # its name is still taken by a store on its way out: adopt or retry next tick
            found = KVStoreClient.lookup(node_id, namespace)
            if found is None:
                raise
            return found
    return launch


@dataclass(frozen=True)
class KVStoreStatus:
    """One store as the admin API shows it. Bytes; counters since the store started."""

    store_id: str
    node_id: str
    alive: bool  # answered its last poll
    capacity_bytes: int
    used_bytes: int
    blocks: int
    spill_capacity_bytes: int
    spill_used_bytes: int
    spill_blocks: int
    pinned_blocks: int
    hits: int
    misses: int
    hit_rate: float  # hits / (hits + misses), 0 before any lookup
    evictions: int
    corrupt_blocks: int
    saved_bytes: int
    loaded_bytes: int
    restarts: int  # stores started on this node after the first
    started_at: float  # wall-clock seconds


@dataclass
class _Store:
    handle: StoreHandle
    report: StoreReport | None = None
    hashes: set[int] = field(default_factory=set)
    frozen: frozenset[int] = frozenset()  # `hashes` as of `frozen_version`
    frozen_version: int = -1
    missed: int = 0
    polls: int = 0

    @property
    def alive(self) -> bool:
        return self.report is not None and self.missed == 0


class StoreManager:
    def __init__(self, config: FleetConfig, state: FleetState, launcher: StoreLauncher | None,
                 metrics: MetricsRegistry, clock: Callable[[], float], faults: FaultLog | None = None):
        self.config = config
        self.faults = faults  # a store's death is a fault (cause "died"), mended when its successor answers
        self.state = state
        self.launcher = launcher
        self.metrics = metrics
        self.clock = clock
        self.stores: dict[str, _Store] = {}  # node id -> its store
        self.restarts: dict[str, int] = {}  # node id -> stores started there after the first
        self._counted: dict[str, StoreReport] = {}  # node id -> report whose counters are exported

    @property
    def enabled(self) -> bool:
        return self.config.kv_store.enabled and self.launcher is not None

    # ---- replicas ------------------------------------------------------------------

    def link_settings(self) -> KVLinkSettings:
        return link_settings_of(self.config)

    def replica_launcher(self, launcher: Launcher) -> Launcher:
        """`launcher`, giving each replica the link settings when the fleet has stores."""
        if not self.enabled:
            return launcher
        env = (ENV_VAR, self.link_settings().to_env())

        def launch(spec: ReplicaSpec, placement: ReplicaPlacement):
            return launcher(spec, replace(placement, env=tuple(sorted(dict(placement.env + (env,)).items()))))
        return launch

    # ---- reconcile -----------------------------------------------------------------

    async def update(self) -> None:
        if not self.enabled:
            return
        alive = {n.node_id for n in self.state.nodes.values() if n.alive}
        for node_id in set(self.stores) - alive:
            log.warning("KV store of node %s is gone with its node", node_id[:8])
            self._forget(node_id)
        for node_id in sorted(alive - set(self.stores)):
            self._launch(node_id)
        nodes = list(self.stores)
        results = await asyncio.gather(*(self._poll(n) for n in nodes), return_exceptions=True)
        for node_id, result in zip(nodes, results):
            self._observe(node_id, result)

    def _launch(self, node_id: str) -> None:
        settings = store_settings_of(self.config.kv_store)
        room = dict(self.state.nodes[node_id].observed.resources).get("object_store_memory")
        if room and settings.capacity_bytes > OBJECT_STORE_SHARE * room:
            log.warning("KV store of node %s: capacity %d bytes exceeds %.0f%% of the node's object store "
                        "(%d bytes); using that", node_id[:8], settings.capacity_bytes, 100 * OBJECT_STORE_SHARE, room)
            settings = replace(settings, capacity_bytes=int(OBJECT_STORE_SHARE * room))
        try:
            handle = self.launcher(node_id, settings)
        except Exception as e:  # noqa: BLE001 — retried next tick
            log.warning("could not start the KV store of node %s: %s", node_id[:8], e)
            return
        self.stores[node_id] = _Store(handle)

    async def _poll(self, node_id: str) -> StoreReport:
        store = self.stores[node_id]
        since = store.report.version if store.report is not None else -1
        return await store.handle.report(since, self.config.controller.stats_timeout_s)

    def _observe(self, node_id: str, result: StoreReport | BaseException) -> None:
        store = self.stores[node_id]
        store.polls += 1
        if isinstance(result, StoreReport):
            self._apply(node_id, store, result)
            self._export(node_id, result)
            return
        dead = isinstance(result, KVStoreUnavailable) and result.dead
        store.missed += 1
        limit = MISSED_POLLS_DEAD if store.report is not None else START_GRACE_POLLS
        if dead or store.missed >= limit:
            log.warning("KV store of node %s is dead (%s): dropping its index, starting a new one",
                        node_id[:8], result)
            store.handle.kill()
            self._forget(node_id)
            if self.faults is not None:
                self.faults.report("kvstore", node_id, "died" if dead else "unresponsive", str(result))
            self.restarts[node_id] = self.restarts.get(node_id, 0) + 1
            self.metrics["flotilla_kvstore_restarts_total"].labels(node_id).inc()

    def _apply(self, node_id: str, store: _Store, report: StoreReport) -> None:
        if store.report is not None and report.started_at != store.report.started_at:
            store.hashes.clear()  # a different incarnation answered under the same name
            if self.faults is not None:  # Ray restarted it between two polls: its cache was lost
                self.faults.report("kvstore", node_id, "restarted", "a new incarnation answered")
        if self.faults is not None and (store.report is None or report.started_at != store.report.started_at):
            self.faults.recovered("kvstore", node_id)  # a store answers on the node again
        if report.hashes is not None:
            store.hashes = set(report.hashes)
        else:
            store.hashes.difference_update(report.removed)
            store.hashes.update(report.added)
        store.report, store.missed = report, 0

    def _forget(self, node_id: str) -> None:
        self.stores.pop(node_id, None)
        self._counted.pop(node_id, None)

    # ---- views ---------------------------------------------------------------------

    def snapshots(self) -> tuple[StoreSnapshot, ...]:
        """The index for the fleet view: stores that answered, with what they hold."""
        out = []
        for node_id, store in sorted(self.stores.items()):
            r = store.report
            if r is None or not store.alive:
                continue
            if store.frozen_version != r.version:
                store.frozen, store.frozen_version = frozenset(store.hashes), r.version
            out.append(StoreSnapshot(r.store_id, node_id, store.frozen, r.capacity_bytes, r.used_bytes))
        return tuple(out)

    def status(self) -> tuple[KVStoreStatus, ...]:
        out = []
        for node_id, store in sorted(self.stores.items()):
            r = store.report
            if r is None:  # started, not answered yet
                out.append(KVStoreStatus(store.handle.store_id, node_id, False, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0,
                                         0, 0, 0, 0, self.restarts.get(node_id, 0), 0.0))
                continue
            out.append(KVStoreStatus(
                r.store_id, node_id, store.alive, r.capacity_bytes, r.used_bytes, r.blocks,
                r.spill_capacity_bytes, r.spill_used_bytes, r.spill_blocks, r.pinned_blocks, r.hits, r.misses,
                r.hit_rate, r.evictions, r.corrupt, r.saved_bytes, r.loaded_bytes,
                self.restarts.get(node_id, 0), r.started_at))
        return tuple(out)

    # ---- metrics -------------------------------------------------------------------

    def _export(self, node_id: str, r: StoreReport) -> None:
        m, labels = self.metrics, (r.store_id, node_id)
        for tier, capacity, used, blocks in (("memory", r.capacity_bytes, r.used_bytes, r.blocks),
                                             ("disk", r.spill_capacity_bytes, r.spill_used_bytes, r.spill_blocks)):
            m["flotilla_kvstore_capacity_bytes"].labels(*labels, tier).set(capacity)
            m["flotilla_kvstore_used_bytes"].labels(*labels, tier).set(used)
            m["flotilla_kvstore_blocks"].labels(*labels, tier).set(blocks)
        before = self._counted.get(node_id)
        if before is not None and before.started_at != r.started_at:
            before = None  # a new incarnation counts from zero
        for name, attr in _COUNTERS:
            delta = getattr(r, attr) - (getattr(before, attr) if before else 0)
            if delta > 0:
                m[name].labels(*labels).inc(delta)
        for seconds in r.load_latencies_s:
            m["flotilla_kvstore_load_seconds"].labels(*labels).observe(seconds)
        for seconds in r.save_latencies_s:
            m["flotilla_kvstore_save_seconds"].labels(*labels).observe(seconds)
        self._counted[node_id] = r


_COUNTERS = (
    ("flotilla_kvstore_hits_total", "hits"),
    ("flotilla_kvstore_misses_total", "misses"),
    ("flotilla_kvstore_evictions_total", "evictions"),
    ("flotilla_kvstore_corrupt_blocks_total", "corrupt"),
    ("flotilla_kvstore_load_bytes_total", "loaded_bytes"),
    ("flotilla_kvstore_save_bytes_total", "saved_bytes"),
)


def store_settings_of(cfg: KVStoreConfig) -> StoreSettings:
    spill_dir = str(resolve_path(cfg.spill_dir)) if cfg.spill_dir else None
    return StoreSettings(cfg.capacity_bytes, spill_dir, cfg.spill_capacity_bytes if spill_dir else 0,
                         cfg.max_pin_ttl_s)


def link_settings_of(config: FleetConfig) -> KVLinkSettings:
    cfg = config.kv_store
    return KVLinkSettings(
        namespace=config.namespace,
        checksum=cfg.checksum,
        kv_bytes_scale=cfg.kv_bytes_scale,
        same_node_bytes_per_s=cfg.same_node_bytes_per_s,
        cross_node_bytes_per_s=cfg.cross_node_bytes_per_s,
        lookup_timeout_s=cfg.lookup_timeout_s,
        load_timeout_s=cfg.load_timeout_s,
        min_load_tokens=cfg.min_load_tokens,
        checkpoint_interval_s=cfg.checkpoint_interval_s,
        checkpoint_min_new_tokens=cfg.checkpoint_min_new_tokens,
    )

