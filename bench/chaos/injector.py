"""Faults on a timeline: what the chaos run breaks, when, and how.

The plan is a pure function of the fault count, the kinds available and the seed.
Each kind is carried out the way it happens for real, or through the operator's drill:
- `kill_replica`: the admin API's drill (`POST /admin/v1/faults/inject`);
- `ray_kill_replica`: `ray.kill` on the replica actor, behind the controller's back;
- `hang_replica`: the admin drill that freezes a replica's engine (alive, no progress);
- `remove_node`: `Cluster.remove_node` of a whole GPU node, processes killed at once,
  and a fresh node of the same kind added back a few seconds later;
- `kill_router`: the admin drill that crashes a router agent (Ray restarts it);
- `kill_controller`: `ray.kill(no_restart=False)` on the detached controller actor;
- `kill_store`: `ray.kill` on a node's KV-cache store actor.
Targets are drawn when the fault fires, among pools that keep another ready replica,
so the fleet keeps serving each model while it recovers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
import ray

from actors.replica_spec import replica_actor_name
from bench.chaos.cluster import ChaosCluster
from orchestrator.controller_client import CONTROLLER_NAME

ALL_KINDS = ("kill_replica", "ray_kill_replica", "hang_replica", "kill_router", "remove_node", "kill_store",
             "kill_controller")  # also the order of the first round: each kind once
# the order faults come in after the first round; replica kills are the most frequent, every kind recurs
_CYCLE = ("kill_replica", "ray_kill_replica", "hang_replica", "kill_router", "kill_replica", "ray_kill_replica",
          "remove_node", "kill_controller", "kill_store")
STORE_PREFIX = "kvstore:"
READD_AFTER_S = 8.0  # a removed node's replacement joins this much later


@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # seconds since the load began
    kind: str


@dataclass
class Injection:
    """One fault as carried out. `at_s` is on the run's clock, `at_wall` is wall-clock seconds."""

    kind: str
    at_s: float
    at_wall: float
    target: str = ""
    detail: str = ""
    skipped: str | None = None  # why nothing was broken
    took_s: float = 0.0  # from asking to done (an admin drill waits for the controller)


def plan_faults(n: int, kinds: Sequence[str], duration_s: float, rng: np.random.Generator) -> list[PlannedFault]:
    """`n` faults spread over the middle of the load (8%..85% of it): first each kind in `kinds`
    once (as many as `n` allows), then a fixed interleaving; times jittered by `rng`."""
    first = [k for k in ALL_KINDS if k in kinds]
    cycle = [k for k in _CYCLE if k in kinds]
    if not cycle:
        raise ValueError(f"no known fault kind among {list(kinds)} (known: {', '.join(ALL_KINDS)})")
    order = (first + [cycle[i % len(cycle)] for i in range(max(0, n - len(first)))])[:n]
    step = 0.77 * duration_s / max(n, 1)
    times = 0.08 * duration_s + step * (np.arange(n) + rng.uniform(-0.2, 0.2, size=n))
    return [PlannedFault(float(t), k) for t, k in zip(times, order)]


def store_names(namespace: str) -> list[str]:
    """The KV-cache store actors alive in the fleet's namespace."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(STORE_PREFIX))


class Injector:
    def __init__(self, cluster: ChaosCluster, admin_url: str, token: str, namespace: str,
                 rng: np.random.Generator, clock: Callable[[], float]):
        self.cluster = cluster
        self.namespace = namespace
        self.rng = rng
        self.clock = clock
        self.http = httpx.AsyncClient(base_url=admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=20)
        self.injections: list[Injection] = []
        self.readded: list[Injection] = []
        self.broken: set[str] = set()  # replicas already killed or hung: not picked again
        self._background: set[asyncio.Task] = set()

    async def run(self, plan: Sequence[PlannedFault], began: float) -> list[Injection]:
        for fault in plan:
            delay = began + fault.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            injection = Injection(fault.kind, self.clock(), time.time())
            try:
                await getattr(self, f"_{fault.kind}")(injection)
            except Exception as e:  # noqa: BLE001 — a fault that could not be injected is reported, not fatal
                injection.skipped = f"{type(e).__name__}: {e}"
            injection.took_s = self.clock() - injection.at_s
            self.injections.append(injection)
            print(f"  t={injection.at_s:6.1f}s {fault.kind:<17} {injection.target[:40]:<40} "
                  f"{injection.skipped or injection.detail}", flush=True)
        await asyncio.gather(*self._background)
        return self.injections

    async def close(self) -> None:
        await self.http.aclose()

    # one method per kind ----------------------------------------------------------------

    async def _kill_replica(self, injection: Injection) -> None:
        injection.target = await self._pick_replica(busy=False)
        injection.detail = await self._drill("kill_replica", injection.target)

    async def _hang_replica(self, injection: Injection) -> None:
        injection.target = await self._pick_replica(busy=True)
        injection.detail = await self._drill("hang_replica", injection.target)

    async def _kill_router(self, injection: Injection) -> None:
        injection.target = f"agent-{self.rng.integers(0, 2)}"
        injection.detail = await self._drill("kill_router", injection.target)

    async def _ray_kill_replica(self, injection: Injection) -> None:
        injection.target = await self._pick_replica(busy=False)
        name = replica_actor_name(injection.target)
        await asyncio.to_thread(lambda: ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True))
        injection.detail = "ray.kill"

    async def _kill_controller(self, injection: Injection) -> None:
        injection.target = CONTROLLER_NAME
        await asyncio.to_thread(
            lambda: ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=self.namespace), no_restart=False))
        injection.detail = "ray.kill(no_restart=False)"

    async def _kill_store(self, injection: Injection) -> None:
        stores = store_names(self.namespace)
        if not stores:
            injection.skipped = "no KV-cache store actors in this fleet"
            return
        injection.target = stores[self.rng.integers(0, len(stores))]
        await asyncio.to_thread(lambda: ray.kill(ray.get_actor(injection.target, namespace=self.namespace),
                                                 no_restart=False))
        injection.detail = "ray.kill(no_restart=False)"

    async def _remove_node(self, injection: Injection) -> None:
        candidates = self.cluster.removable()
        if not candidates:
            injection.skipped = "no removable node (each GPU kind is down to one)"
            return
        # the node holding the most ready replicas (it breaks the most streams), ties at random
        hosted = [r["node_id"] for r in await self._ready_replicas()]
        most = max(hosted.count(n) for n in candidates)
        busiest = [n for n in candidates if hosted.count(n) == most]
        injection.target = busiest[self.rng.integers(0, len(busiest))]
        kind = await self.cluster.main.call(self.cluster.remove, injection.target)
        injection.detail = f"removed a {kind} node holding {most} ready replicas"
        task = asyncio.create_task(self._readd(kind))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _readd(self, kind: str) -> None:
        await asyncio.sleep(READD_AFTER_S)
        record = Injection("add_node", self.clock(), time.time(), detail=f"added a fresh {kind} node")
        try:
            record.target = await self.cluster.main.call(self.cluster.add, kind)
        except Exception as e:  # noqa: BLE001
            record.skipped = f"{type(e).__name__}: {e}"
        self.readded.append(record)

    # pieces -----------------------------------------------------------------------------

    async def _drill(self, kind: str, target: str) -> str:
        """The admin API's inject endpoint; retried while the controller is restarting (503)."""
        deadline = time.monotonic() + 30.0
        while True:
            r = await self.http.post("/faults/inject", json={"kind": kind, "target": target})
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if r.status_code != 200:
            raise RuntimeError(f"inject {kind} {target}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()["done"]

    async def _pick_replica(self, busy: bool) -> str:
        """A random ready replica of a pool with another ready one; with `busy`, one that is
        generating (waiting up to 10 s for one): a replica frozen while idle may get no traffic
        for long (routing prefers replicas holding the prompts' prefixes), and an idle replica
        is not a hung one."""
        deadline = time.monotonic() + 10.0
        while True:
            ready = [r for r in await self._ready_replicas() if r["replica_id"] not in self.broken]
            pools = Counter(r["pool"] for r in ready)
            safe = [r for r in ready if pools[r["pool"]] >= 2 and (r["running"] > 0 or not busy)]
            if safe or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if not safe:
            raise RuntimeError("no pool has two ready replicas" + (", one of them generating" if busy else ""))
        picked = safe[self.rng.integers(0, len(safe))]["replica_id"]
        self.broken.add(picked)
        return picked

    async def _ready_replicas(self) -> list[dict]:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                r = await self.http.get("/replicas", params={"state": "ready"})
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass  # the admin API may be down mid-fault: ask again until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError("the admin API gave no replica list for 30s")
            await asyncio.sleep(0.5)
