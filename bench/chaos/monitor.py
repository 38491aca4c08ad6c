"""Watches the fleet through the admin API while the chaos run breaks it.

Every `period_s` it reads `GET /admin/v1/faults` and `GET /admin/v1/replicas`. Fault
records are merged by id, because a restarted controller starts a fresh fault log:
the monitor keeps what the former one reported. Replica samples give, per pool, how
many replicas were ready and how many were alive at once (more alive than desired
would be a duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Sample:
    at_s: float  # seconds since the load began
    controller_up: bool
    ready: dict[str, int]  # pool -> replicas ready
    live: dict[str, int]  # pool -> replicas not ended (starting, ready, unhealthy, draining)
    replica_ids: frozenset[str]  # live replicas
    why: str = ""  # why the admin API did not answer, when it did not


@dataclass
class Monitor:
    admin_url: str
    token: str
    clock: Callable[[], float]
    period_s: float = 0.5
    faults: dict[str, dict] = field(default_factory=dict)  # fault id -> the fault as the API reports it
    samples: list[Sample] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.admin_url, timeout=10.0,
                                     headers={"Authorization": f"Bearer {self.token}"}) as http:
            while not stop.is_set():
                await self.poll(http)
                with contextlib.suppress(TimeoutError):  # the period passed without a stop
                    await asyncio.wait_for(stop.wait(), self.period_s)
            await self.poll(http)

    async def poll(self, http: httpx.AsyncClient) -> None:
        at = self.clock()
        try:
            faults, replicas = await asyncio.gather(http.get("/faults"), http.get("/replicas"))
        except httpx.HTTPError as e:
            self.samples.append(Sample(at, False, {}, {}, frozenset(), type(e).__name__))
            return
        if faults.status_code != 200 or replicas.status_code != 200:
            self.samples.append(Sample(at, False, {}, {}, frozenset(),
                                       f"HTTP {faults.status_code}/{replicas.status_code}"))
            return
        for f in faults.json():
            self.faults[f["fault_id"]] = f
        ready: dict[str, int] = {}
        live: dict[str, int] = {}
        ids = set()
        for r in replicas.json():
            if r["state"] in ("dead", "stopped"):
                continue
            live[r["pool"]] = live.get(r["pool"], 0) + 1
            ids.add(r["replica_id"])
            if r["state"] == "ready":
                ready[r["pool"]] = ready.get(r["pool"], 0) + 1
        self.samples.append(Sample(at, True, ready, live, frozenset(ids)))

    def whole_again(self, after_s: float, desired: dict[str, int]) -> float | None:
        """The first time after `after_s` when every pool had its desired ready replicas."""
        for s in self.samples:
            if s.at_s > after_s and s.controller_up and all(s.ready.get(p, 0) >= n for p, n in desired.items()):
                return s.at_s
        return None
